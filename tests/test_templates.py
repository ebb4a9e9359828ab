"""Hand-written templates match their reference rendering and work with answer-only labels."""

from __future__ import annotations

import pytest

from tunelab.data import Conversation, encode
from tunelab.data.render import IGNORE_INDEX
from tunelab.errors import TunelabError
from tunelab.models.templates import ALPACA_PREAMBLE, TEMPLATES, apply_template

EOS = "<|endoftext|>"


@pytest.fixture()
def stablelm_like(make_tiny_tokenizer):
    """Like a base StableLM tokenizer: eos <|endoftext|>, no chat template."""
    return make_tiny_tokenizer(chat_template=None, eos_token=EOS)


def supervised_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_human_assistant_prompt_is_the_seed_string(stablelm_like):
    apply_template(stablelm_like, "human-assistant")
    prompt = "What is the capital of France?"
    text = stablelm_like.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    assert text == f"Human: {prompt} \nAssistant:"  # seed 000/001, verbatim


def test_human_assistant_labels_cover_answer_and_eos(stablelm_like):
    apply_template(stablelm_like, "human-assistant")
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "发烧怎么办?"}, {"role": "assistant", "content": "多喝水。"}]
    example = encode(stablelm_like, Conversation.from_openai(messages))
    text = stablelm_like.apply_chat_template(messages, tokenize=False)
    assert text == ("Human: What is the capital of France? \nAssistant: Paris." + EOS + "\n"
                    "Human: 发烧怎么办? \nAssistant: 多喝水。" + EOS + "\n")
    assert example["input_ids"] == stablelm_like(text, add_special_tokens=False)["input_ids"]
    assert supervised_text(stablelm_like, example) == " Paris." + EOS + " 多喝水。" + EOS
    assert example["labels"][-1] == IGNORE_INDEX  # the newline after eos is not learned


def test_alpaca_template_reference_and_labels(stablelm_like):
    apply_template(stablelm_like, "alpaca")
    messages = [{"role": "user", "content": "Translate: hello"}, {"role": "assistant", "content": "你好"}]
    prompt = stablelm_like.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"{ALPACA_PREAMBLE}\n\n### Instruction:\nTranslate: hello\n\n### Response:\n"
    with_system = [{"role": "system", "content": "You translate."}] + messages
    text = stablelm_like.apply_chat_template(with_system, tokenize=False)
    assert text.startswith("You translate.\n\n### Instruction:") and ALPACA_PREAMBLE not in text
    example = encode(stablelm_like, Conversation.from_openai(with_system))
    assert supervised_text(stablelm_like, example) == "你好" + EOS


def test_chatml_template_on_a_base_tokenizer(stablelm_like):
    apply_template(stablelm_like, "chatml")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    example = encode(stablelm_like, Conversation.from_openai(messages))
    assert supervised_text(stablelm_like, example) == "hello<|im_end|>"


def test_unknown_template_lists_names_and_jinja_files_work(stablelm_like, tmp_path):
    with pytest.raises(TunelabError, match="unknown template 'vicuna' \\(known: " + ", ".join(TEMPLATES)):
        apply_template(stablelm_like, "vicuna")
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    apply_template(stablelm_like, str(path))
    assert stablelm_like.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "user> x\n"


def test_template_needing_eos_refuses_a_tokenizer_without_one(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template=None)
    tokenizer.eos_token = None
    with pytest.raises(TunelabError, match="no eos token"):
        apply_template(tokenizer, "human-assistant")
