"""The terminal chat loop: history, clear, /system, exit, fallback, trimming, Ctrl-C, stdin pipes."""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab.chat as chat
from tunelab.chat import chat_loop
from tunelab.generation import FALLBACK_REPLY, GenerationSettings, generate

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture
def seen(monkeypatch):
    """Records the messages each turn sends, then lets the real ``stream`` generate."""
    calls = []
    real = chat.stream

    def spy(model, tokenizer, messages, settings):
        calls.append(copy.deepcopy(messages))
        return real(model, tokenizer, messages, settings)

    monkeypatch.setattr(chat, "stream", spy)
    return calls


def _answer(model, tokenizer, messages, settings=SETTINGS):
    return generate(model, tokenizer, [messages], settings, progress=False)[0].text


def test_two_turns_clear_and_exit(tiny_llama, tiny_tokenizer, seen):
    script = "  Hello   there, doctor \nHow are you?\nclear\n孕妇感冒发烧\nexit\nnever read\n"
    out = io.StringIO()
    session = chat_loop(tiny_llama, tiny_tokenizer, SETTINGS, system="You are a doctor.",
                        input=io.StringIO(script), output=out)
    first, second, third = seen
    system = {"role": "system", "content": "You are a doctor."}
    # Spaces inside and around the message survive (seed 004 deleted them).
    assert first == [system, {"role": "user", "content": "  Hello   there, doctor "}]
    answer1 = _answer(tiny_llama, tiny_tokenizer, first)
    assert second == first + [{"role": "assistant", "content": answer1 if answer1.strip() else FALLBACK_REPLY},
                              {"role": "user", "content": "How are you?"}]
    assert third == [system, {"role": "user", "content": "孕妇感冒发烧"}], "clear forgets the history"
    text = out.getvalue()
    assert "(history cleared)" in text
    assert answer1 in text and _answer(tiny_llama, tiny_tokenizer, third) in text
    assert len(session.history) == 2
    assert "never read" not in str(session.history)


def test_system_command_and_quit(tiny_llama, tiny_tokenizer, seen):
    script = "/system Answer in French.\nBonjour\n/system\nHi\nQUIT\n"
    out = io.StringIO()
    chat_loop(tiny_llama, tiny_tokenizer, SETTINGS, input=io.StringIO(script), output=out)
    assert seen[0][0] == {"role": "system", "content": "Answer in French."}
    assert seen[1][0]["role"] == "user", "/system with no text removes the system prompt"
    assert "(system prompt set)" in out.getvalue() and "(system prompt removed)" in out.getvalue()


def test_empty_answer_gets_the_fallback_reply(tiny_llama, tiny_tokenizer):
    import torch

    model = copy.deepcopy(tiny_llama)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tiny_tokenizer.eos_token_id] = 1e4  # the model now ends every answer at once
    model.lm_head = head
    out = io.StringIO()
    session = chat_loop(model, tiny_tokenizer, SETTINGS, input=io.StringIO("Hello\n"), output=out)
    assert out.getvalue() == FALLBACK_REPLY + "\n"
    assert session.history[-1] == {"role": "assistant", "content": FALLBACK_REPLY}


def test_history_is_trimmed_from_the_oldest_turn(tiny_llama, tiny_tokenizer, seen):
    model = copy.deepcopy(tiny_llama)
    model.config.max_position_embeddings = 80  # small context so three turns overflow
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=8)
    lines = [f"turn {i}: the patient has a fever" for i in range(4)]
    out = io.StringIO()
    chat_loop(model, tiny_tokenizer, settings, input=io.StringIO("\n".join(lines) + "\n"), output=out)
    assert "(history trimmed: dropped the 1 oldest turn(s)" in out.getvalue()
    last = seen[-1]
    assert last[-1]["content"] == lines[-1]
    assert last[0]["content"] != lines[0], "the oldest turn went first"
    assert len(last) < 2 * len(lines) - 1


def test_message_too_long_is_refused_not_crashed(tiny_llama, tiny_tokenizer):
    model = copy.deepcopy(tiny_llama)
    model.config.max_position_embeddings = 32
    out = io.StringIO()
    chat_loop(model, tiny_tokenizer, SETTINGS, input=io.StringIO("word " * 40 + "\nexit\n"), output=out)
    assert "(message too long for the model's context; not sent)" in out.getvalue()


def test_beam_search_is_refused_up_front(tiny_llama, tiny_tokenizer):
    from tunelab.errors import TunelabError
    from tunelab.generation import from_preset

    with pytest.raises(TunelabError, match="beam search"):
        chat_loop(tiny_llama, tiny_tokenizer, from_preset("beam"), input=io.StringIO("hi\n"), output=io.StringIO())


class _CtrlCOnFirstAnswer(io.StringIO):
    """Output whose first write raises KeyboardInterrupt, as Ctrl-C during an answer does."""

    fired = False

    def write(self, text):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_but_keeps_the_session(tiny_llama, tiny_tokenizer, seen):
    settings = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    out = _CtrlCOnFirstAnswer()
    session = chat_loop(tiny_llama, tiny_tokenizer, settings, input=io.StringIO("Hello\nAgain\n"), output=out)
    assert "(stopped)" in out.getvalue()
    assert len(seen) == 2, "the session went on to the next message"
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Hello", "Again"]


def test_cli_chat_reads_a_pipe(tiny_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", str(folder), "--max-new-tokens", "5", "--system", "Be kind."],
        input="Hi there\nclear\nHello again\nexit\n", capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    expected = [_answer(tiny_llama, tiny_tokenizer, [{"role": "system", "content": "Be kind."},
                                                      {"role": "user", "content": text}],
                        GenerationSettings(max_new_tokens=5))
                for text in ("Hi there", "Hello again")]
    assert "(history cleared)" in proc.stdout
    for answer in expected:
        assert (answer if answer.strip() else FALLBACK_REPLY) in proc.stdout
    assert "User  >>>" not in proc.stdout, "no prompts when stdin is a pipe"


def test_cli_chat_bad_model_is_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(tmp_path / "missing")],
                          input="", capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_builtin_model_chats():
    from tunelab.config import DEFAULT_MODEL
    from tunelab.models import load_model

    model, tokenizer = load_model(DEFAULT_MODEL)
    out = io.StringIO()
    session = chat_loop(model, tokenizer, GenerationSettings(max_new_tokens=24),
                        input=io.StringIO("What is the capital of France?\nexit\n"), output=out)
    assert "Paris" in out.getvalue()
    assert session.history[0] == {"role": "user", "content": "What is the capital of France?"}


def test_template_errors_are_reported_and_the_session_goes_on(tiny_llama, make_tiny_tokenizer):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    out = io.StringIO()
    session = chat_loop(tiny_llama, make_tiny_tokenizer(chat_template=strict), SETTINGS, system="Be brief.",
                        input=io.StringIO("hi\n/system\nhi again\n"), output=out)
    assert "(error: chat template failed" in out.getvalue() and "System role not supported" in out.getvalue()
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["hi again"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_mode_shows_prompts_and_help(tiny_llama, tiny_tokenizer):
    out = io.StringIO()
    chat_loop(tiny_llama, tiny_tokenizer, SETTINGS, input=_Terminal("Hello\nexit\n"), output=out)
    text = out.getvalue()
    assert text.startswith("chatting with the model; commands: exit | quit | clear")
    assert text.count("User  >>> ") == 2 and text.count("Assistant >>> ") == 1


def test_real_ctrl_c_in_the_cli_stops_only_the_answer(make_tiny_tokenizer, tmp_path):
    import signal
    import threading
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Wider and deeper than tiny_llama so 480 tokens take seconds: Ctrl-C must land mid-answer.
    # Built from scratch (fresh tokenizer, fresh config, fixed seed): nothing another test
    # did to the shared fixtures can change how long the answer runs.
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "chat", str(folder), "--max-new-tokens", "480", "--min-new-tokens", "480",
         "--threads", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # A shell's background job (`make test &`) ignores SIGINT and children inherit that;
        # give the chat the default disposition a user's terminal has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    proc.stdin.write("Hello\n")
    proc.stdin.flush()
    deadline = time.time() + 90
    while len(seen) < 3:  # the answer has started streaming
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("exit\n")
    proc.stdin.close()
    assert proc.wait(60) == 0, proc.stderr.read()
    reader.join(10)
    assert "(stopped)" in "".join(seen)
