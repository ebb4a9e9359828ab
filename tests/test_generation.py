"""The generation core: settings, batching, order, stop strings, streaming, cancellation."""

from __future__ import annotations

import threading

import pytest

from tunelab.errors import TunelabError
from tunelab.generation import (
    FALLBACK_REPLY,
    GenerationSettings,
    from_preset,
    generate,
    generate_ids,
    render_prompt,
    stream,
    with_fallback,
)
from tunelab.stops import StopFilter, cut_at_stop

PROMPTS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are a doctor."},
     {"role": "user", "content": "The patient has a fever and a cough. What should he do?"}],
    "The capital of France is",
    [{"role": "user", "content": "孕妇感冒发烧38度应该怎么办呢?"}],
    [{"role": "user", "content": "thank you"}],
]


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


def test_settings_validation_names_the_field():
    with pytest.raises(TunelabError, match="generation.temperature"):
        GenerationSettings(temperature=-1)
    with pytest.raises(TunelabError, match="generation.top_p"):
        GenerationSettings(top_p=0)
    with pytest.raises(TunelabError, match="generation.max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(TunelabError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(TunelabError, match="generation.stop"):
        GenerationSettings(stop=["ok", ""])
    with pytest.raises(TunelabError, match="generation.num_beams"):
        GenerationSettings(num_beams=1.5)


def test_presets_and_overrides():
    assert from_preset("greedy").greedy
    sampling = from_preset("sampling", seed=3, max_new_tokens=None)
    assert sampling.temperature > 0 and sampling.seed == 3 and sampling.max_new_tokens == 256
    assert from_preset("beam", stop=["\n"]).num_beams > 1
    assert from_preset("beam").stop == ()
    with pytest.raises(TunelabError, match="preset 'nope'"):
        from_preset("nope")
    with pytest.raises(TunelabError, match="unknown setting 'temprature'"):
        from_preset("greedy", temprature=1.0)
    assert GenerationSettings(stop="END").stop == ("END",)
    assert GenerationSettings().replace(max_new_tokens=5).max_new_tokens == 5


def test_stop_filter_holds_back_prefixes_and_cuts():
    f = StopFilter(["</s>", "\nUser:"])
    shown = [f.feed(p) for p in ["Hel", "lo <", "/", "x and \nUs", "er: more"]]
    assert shown == [("Hel", False), ("lo ", False), ("", False), ("</x and ", False), ("", True)]
    assert f.text == "Hello </x and "
    assert f.flush() == ""
    assert cut_at_stop("a STOP b STOP", ["STOP"]) == ("a ", True)
    assert cut_at_stop("你好。再见", ["。"]) == ("你好", True)
    tail = StopFilter(["END"])
    assert tail.feed("abcE") == ("abc", False)
    assert tail.flush() == "E"


def test_fallback_reply():
    assert with_fallback("  \n") == FALLBACK_REPLY
    assert with_fallback(" ok ") == " ok "


def test_render_prompt_uses_chat_template(tiny_tokenizer):
    ids = render_prompt(tiny_tokenizer, [{"role": "user", "content": "Hello"}])
    assert tiny_tokenizer.decode(ids) == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TunelabError, match="list of"):
        render_prompt(tiny_tokenizer, [["user", "Hello"]])


def test_render_prompt_without_template_says_what_to_do(make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer(chat_template=None)
    with pytest.raises(TunelabError, match="no chat template"):
        render_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
    assert render_prompt(tokenizer, "Hello") == tokenizer("Hello")["input_ids"]


def test_batched_equals_one_at_a_time_and_order_is_kept(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=12)
    batched = generate(model, tiny_tokenizer, PROMPTS, settings, batch_size=4, progress=False)
    single = [generate(model, tiny_tokenizer, [p], settings, progress=False)[0] for p in PROMPTS]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in single]
    for prompt, result in zip(PROMPTS, batched):
        assert result.prompt_tokens == len(render_prompt(tiny_tokenizer, prompt))
        assert result.finish_reason in ("stop", "length")
        assert 1 <= result.completion_tokens <= 12
    assert len({r.text for r in batched}) > 1, "different prompts should give different answers"


def test_length_finish_and_token_count(model, tiny_tokenizer):
    (result,) = generate(model, tiny_tokenizer, ["Hello, how are you?"],
                         GenerationSettings(max_new_tokens=5, min_new_tokens=5), progress=False)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5


def test_stop_string_cuts_answer(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=24, min_new_tokens=24)
    (full,) = generate(model, tiny_tokenizer, PROMPTS[1:2], settings, progress=False)
    assert len(full.text) > 8
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    (cut,) = generate(model, tiny_tokenizer, PROMPTS[1:2], settings.replace(stop=(stop,)), progress=False)
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_per_row_limits_in_one_batch(model, tiny_tokenizer):
    ids = [render_prompt(tiny_tokenizer, p) for p in PROMPTS[:3]]
    settings = GenerationSettings(max_new_tokens=10, min_new_tokens=3)
    results = generate_ids(model, tiny_tokenizer, ids, settings, limits=[3, 10, 6])
    assert [r.completion_tokens for r in results][0] == 3
    assert all(r.completion_tokens <= limit for r, limit in zip(results, [3, 10, 6]))


def test_sampling_with_seed_is_reproducible(model, tiny_tokenizer):
    settings = from_preset("sampling", max_new_tokens=10, seed=7, temperature=1.5)
    first = generate(model, tiny_tokenizer, PROMPTS[:2], settings, progress=False)
    again = generate(model, tiny_tokenizer, PROMPTS[:2], settings, progress=False)
    assert [r.text for r in first] == [r.text for r in again]


def test_beam_search_runs_and_applies_stops(model, tiny_tokenizer):
    settings = from_preset("beam", max_new_tokens=8, num_beams=2)
    (result,) = generate(model, tiny_tokenizer, PROMPTS[:1], settings, progress=False)
    assert result.completion_tokens <= 8 and result.finish_reason in ("stop", "length")
    with pytest.raises(TunelabError, match="cannot stream"):
        stream(model, tiny_tokenizer, PROMPTS[0], settings)


def test_stream_matches_generate(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=16)
    (expected,) = generate(model, tiny_tokenizer, PROMPTS[3:4], settings, progress=False)
    pieces = stream(model, tiny_tokenizer, PROMPTS[3], settings)
    text = "".join(pieces)
    assert text == expected.text
    assert pieces.result.completion_tokens == expected.completion_tokens


def test_stream_cancel_stops_generation(model, tiny_tokenizer):
    settings = GenerationSettings(max_new_tokens=200, min_new_tokens=200)
    cancel = threading.Event()
    pieces = stream(model, tiny_tokenizer, PROMPTS[0], settings, cancel=cancel)
    for count, _ in enumerate(pieces):
        if count == 2:
            cancel.set()
    assert pieces.result.finish_reason == "cancelled"
    assert pieces.result.completion_tokens < 200


def test_context_overflow_is_a_user_error(model, tiny_tokenizer):
    long_prompt = "Hello " * 600
    with pytest.raises(TunelabError, match="context of 512 tokens"):
        generate(model, tiny_tokenizer, [long_prompt], GenerationSettings(max_new_tokens=4), progress=False)


def test_hand_written_templates_bring_their_stop_strings(make_tiny_tokenizer):
    from tunelab.stops import template_stops
    from tunelab.models.templates import apply_template

    tokenizer = apply_template(make_tiny_tokenizer(chat_template=None), "human-assistant")
    assert template_stops(tokenizer) == ("\nHuman:",)
    assert template_stops(make_tiny_tokenizer(chat_template="{{ messages[0]['content'] }}")) == ()


def test_one_conversation_instead_of_a_list_is_explained(model, tiny_tokenizer):
    with pytest.raises(TunelabError, match="pass a list of prompts"):
        generate(model, tiny_tokenizer, PROMPTS[0], progress=False)


# ---------------------------------------------------------------- the greedy fast path

SYSTEM = {"role": "system", "content": "You are a doctor. Answer the patient in one short sentence, please."}
SHARED_PREFIX_PROMPTS = [
    [SYSTEM, {"role": "user", "content": "Hello"}],
    [SYSTEM, {"role": "user", "content": "The patient has a fever and a cough. What should he do?"}],
    [SYSTEM, {"role": "user", "content": "孕妇感冒发烧38度应该怎么办呢?"}],
    [SYSTEM, {"role": "user", "content": "thank you"}],
    [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
]


def _reference(model, ids, max_new_tokens, eos_id, min_new_tokens=0):
    """transformers' greedy generate for one unpadded prompt, cut after eos."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                             eos_token_id=eos_id, pad_token_id=eos_id)
    new = out[0, len(ids):].tolist()
    return new[:new.index(eos_id) + 1] if eos_id in new else new


def _fast(model, prompt_ids, max_new_tokens, eos_id, min_new_tokens=0):
    """greedy_decode's tokens per row, and the batch size of every forward pass."""
    import torch

    from tunelab.greedy import greedy_decode

    tokens = [[] for _ in prompt_ids]
    sizes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].shape),
                                           with_kwargs=True)

    def push(row, token):
        tokens[row].append(token)
        return token == eos_id or len(tokens[row]) >= max_new_tokens

    try:
        with torch.inference_mode():
            greedy_decode(model, prompt_ids, push, max_new_tokens=max_new_tokens, pad_id=0,
                          eos_ids={eos_id}, min_new_tokens=min_new_tokens)
    finally:
        hook.remove()
    return tokens, sizes


def _eos_that_ends_rows_early(model, prompt_ids, max_new_tokens):
    """A token id the model emits mid-answer in some rows (not all): declared eos, rows end at different steps."""
    free = [_reference(model, ids, max_new_tokens, eos_id=-1) for ids in prompt_ids]
    firsts = {}
    for answer in free:
        for step, token in enumerate(answer[1:max_new_tokens - 2], start=1):
            firsts.setdefault(token, set()).add(step)
    token = max(firsts, key=lambda t: (len(firsts[t]), -min(firsts[t])))
    assert len(firsts[token]) > 1, "the fixture should give rows that end at different steps"
    return token


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def attention_model(request, model):
    """The tiny Llama with sdpa attention, and a copy with eager attention (the CPU default,
    where the loop swaps in ``grouped_eager_attention``)."""
    import copy

    if request.param == "sdpa":
        return model
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def test_fast_greedy_gives_model_generate_tokens(attention_model, tiny_tokenizer):
    model = attention_model
    from tunelab.greedy import shared_prefix_length

    prompt_ids = [render_prompt(tiny_tokenizer, p) for p in SHARED_PREFIX_PROMPTS]
    assert len({len(ids) for ids in prompt_ids}) == len(prompt_ids), "mixed prompt lengths"
    shared = shared_prefix_length(prompt_ids)
    assert shared > 10, "the system prompt is encoded once"
    eos_id = _eos_that_ends_rows_early(model, prompt_ids, 16)
    expected = [_reference(model, ids, 16, eos_id) for ids in prompt_ids]
    assert len({len(answer) for answer in expected}) > 1, "rows finish at different steps"

    tokens, sizes = _fast(model, prompt_ids, 16, eos_id)
    assert tokens == expected
    # prefix once (1 row), then every row's own tokens, then one token per running row
    assert sizes[0] == (1, shared) and sizes[1][0] == len(prompt_ids)
    rows_per_step = [size[0] for size in sizes[2:]]
    assert rows_per_step == sorted(rows_per_step, reverse=True) and rows_per_step[-1] < len(prompt_ids)
    assert len(sizes) == 1 + max(len(answer) for answer in expected), "the batch ends with its longest row"


def test_fast_greedy_min_new_tokens_and_single_row(attention_model, tiny_tokenizer):
    model = attention_model
    prompt_ids = [render_prompt(tiny_tokenizer, p) for p in SHARED_PREFIX_PROMPTS]
    eos_id = _eos_that_ends_rows_early(model, prompt_ids, 16)
    expected = [_reference(model, ids, 16, eos_id, min_new_tokens=6) for ids in prompt_ids]
    assert all(len(answer) >= 6 for answer in expected)
    assert _fast(model, prompt_ids, 16, eos_id, min_new_tokens=6)[0] == expected
    for ids, answer in zip(prompt_ids[:2], expected):  # one row: no prefix pass, no padding
        tokens, sizes = _fast(model, [ids], 16, eos_id, min_new_tokens=6)
        assert tokens == [answer] and sizes[0] == (1, len(ids))


def test_generate_fast_path_equals_transformers_path(attention_model, tiny_tokenizer):
    model = attention_model
    full = generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS, GenerationSettings(max_new_tokens=20, min_new_tokens=20),
                    progress=False)
    stops = tuple(r.text[len(r.text) // 2:len(r.text) // 2 + 2] for r in full[:2])
    for settings in [GenerationSettings(max_new_tokens=12),
                     GenerationSettings(max_new_tokens=20, min_new_tokens=3, stop=stops)]:
        fast = generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS + PROMPTS, settings, batch_size=4,
                        progress=False)
        slow = generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS + PROMPTS, settings, batch_size=4,
                        progress=False, fast_greedy=False)
        assert [dataclass_tuple(r) for r in fast] == [dataclass_tuple(r) for r in slow]
    assert {r.finish_reason for r in fast} == {"stop", "length"}, "stop strings cut some rows, others run out"


def dataclass_tuple(result):
    return result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason


def test_batches_of_a_call_share_one_prefix_pass(model, tiny_tokenizer):
    from tunelab.greedy import shared_prefix_length

    settings = GenerationSettings(max_new_tokens=10)
    shared = shared_prefix_length([render_prompt(tiny_tokenizer, p) for p in SHARED_PREFIX_PROMPTS])
    sizes = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        fast = generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS, settings, batch_size=2, progress=False)
    finally:
        hook.remove()
    slow = generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS, settings, batch_size=2, progress=False,
                    fast_greedy=False)
    assert [dataclass_tuple(r) for r in fast] == [dataclass_tuple(r) for r in slow]
    assert sizes[0] == (1, shared) and sizes.count((1, shared)) == 1
    assert max(rows for rows, _ in sizes) == 2
    assert sum(1 for rows, width in sizes if width > 1) == 1 + 3, "the prefix, then one prefill per batch"


def test_fast_path_per_row_limits_and_callbacks(model, tiny_tokenizer):
    ids = [render_prompt(tiny_tokenizer, p) for p in SHARED_PREFIX_PROMPTS[:3]]
    settings = GenerationSettings(max_new_tokens=10)
    done_order, texts = [], {0: "", 1: "", 2: ""}
    results = generate_ids(model, tiny_tokenizer, ids, settings, limits=[3, 10, 6],
                           on_text=lambda row, piece: texts.__setitem__(row, texts[row] + piece),
                           on_done=lambda row, result: done_order.append(row))
    slow = generate_ids(model, tiny_tokenizer, ids, settings, limits=[3, 10, 6], fast_greedy=False)
    assert [dataclass_tuple(r) for r in results] == [dataclass_tuple(r) for r in slow]
    assert [r.completion_tokens for r in results] == [3, 10, 6]
    assert done_order == [0, 2, 1] and [texts[i] for i in range(3)] == [r.text for r in results]


def test_settings_the_fast_path_cannot_honour_use_transformers(model, tiny_tokenizer, monkeypatch):
    import copy

    from tunelab import generation
    from tunelab.greedy import fast_greedy_applies

    assert fast_greedy_applies(model)
    assert not fast_greedy_applies(model, repetition_penalty=1.2)
    banned = copy.deepcopy(model)
    banned.generation_config.no_repeat_ngram_size = 2
    assert not fast_greedy_applies(banned)

    def no_fast_path(*args, **kwargs):
        raise AssertionError("greedy_decode must not run here")

    monkeypatch.setattr(generation, "greedy_decode", no_fast_path)
    for settings in [GenerationSettings(max_new_tokens=6, repetition_penalty=1.3),
                     from_preset("sampling", max_new_tokens=6, seed=1), from_preset("beam", max_new_tokens=6)]:
        (result,) = generate(model, tiny_tokenizer, PROMPTS[:1], settings, progress=False)
        assert 1 <= result.completion_tokens <= 6
    (result,) = generate(banned, tiny_tokenizer, PROMPTS[:1], GenerationSettings(max_new_tokens=6), progress=False)
    assert 1 <= result.completion_tokens <= 6


def test_fast_path_with_a_lora_adapter_and_prefix_tuning_falls_back(model, tiny_tokenizer):
    import copy

    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from tunelab.greedy import fast_greedy_applies

    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
    assert fast_greedy_applies(lora)
    settings = GenerationSettings(max_new_tokens=10)
    fast = generate(lora, tiny_tokenizer, SHARED_PREFIX_PROMPTS, settings, batch_size=3, progress=False)
    slow = generate(lora, tiny_tokenizer, SHARED_PREFIX_PROMPTS, settings, batch_size=3, progress=False,
                    fast_greedy=False)
    assert [dataclass_tuple(r) for r in fast] == [dataclass_tuple(r) for r in slow]
    assert [r.text for r in fast] != [r.text for r in generate(model, tiny_tokenizer, SHARED_PREFIX_PROMPTS,
                                                               settings, progress=False)], "the adapter counts"
    prefix = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not fast_greedy_applies(prefix)


def test_grouped_eager_attention_equals_transformers_eager():
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from tunelab.greedy import grouped_eager_attention

    torch.manual_seed(0)

    class Module(torch.nn.Module):
        num_key_value_groups = 3

    module = Module().eval()
    for length in (1, 5):  # one decode step; a prefill
        query, key, value = torch.randn(2, 6, length, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
        mask = torch.zeros(2, 1, length, 7)
        mask[0, :, :, :3] = torch.finfo(torch.float32).min  # padding of the first row
        mask[:, :, :, 7 - length:] += torch.triu(torch.full((length, length), torch.finfo(torch.float32).min), 1)
        expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.35)
        got, _ = grouped_eager_attention(module, query, key, value, mask, scaling=0.35)
        assert got.shape == expected.shape == (2, length, 6, 8)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_eager_models_decode_with_grouped_attention_and_get_it_back(model, tiny_tokenizer, monkeypatch):
    import copy

    from tunelab import greedy

    calls, grouped = [], greedy.grouped_eager_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return grouped(*args, **kwargs)

    monkeypatch.setattr(greedy, "grouped_eager_attention", counting)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    for candidate, implementation in [(model, "sdpa"), (eager, "eager")]:
        calls.clear()
        assert candidate.config._attn_implementation == implementation
        generate(candidate, tiny_tokenizer, SHARED_PREFIX_PROMPTS[:2], GenerationSettings(max_new_tokens=3),
                 progress=False)
        assert candidate.config._attn_implementation == implementation
        # 2 layers x (shared prefix, prefill, 2 decode steps)
        assert len(calls) == (2 * 4 if implementation == "eager" else 0)
