"""Rendering: input_ids are exactly the chat template's; labels cover exactly answer + end-of-turn.

The expected labels come from an independent oracle: character offsets of each
``answer<|im_end|>`` in the rendered text, mapped to tokens with the fast tokenizer's
offset mapping. Checked on the tiny ChatML BPE and on the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json

import pytest

from tunelab.data import Conversation, ImagePart, Message, TextPart, encode, encode_all, load_dataset
from tunelab.data.render import IGNORE_INDEX, mark_supervised, prompt_ids, render_text
from tunelab.errors import TunelabError

SINGLE = [{"role": "user", "content": "Hello, how are you?"}, {"role": "assistant", "content": "I am fine."}]
SYSTEM = [{"role": "system", "content": "你是一名医生。"}] + SINGLE
MULTI = [{"role": "user", "content": "你好!"}, {"role": "assistant", "content": "你好!有什么可以帮你的吗?"},
         {"role": "user", "content": "孕妇感冒发烧38度应该怎么办呢?"},
         {"role": "assistant", "content": "可以物理降温,多喝水。"}]
MULTI_SYSTEM = [{"role": "system", "content": "You are a doctor."}] + MULTI
CASES = {"single": SINGLE, "system": SYSTEM, "multi": MULTI, "multi_system": MULTI_SYSTEM}


@pytest.fixture(scope="module")
def smollm2(smollm2_tokenizer_path):
    from transformers import AutoTokenizer

    folder, name = smollm2_tokenizer_path
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_tokenizer):
    return tiny_tokenizer if request.param == "tiny" else request.getfixturevalue("smollm2")


def template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def oracle_labels(tokenizer, messages, only_last: bool = False) -> list[int]:
    """Labels from character offsets: answer text + the <|im_end|> right after it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ranges, cursor = [], 0
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    for answer in answers[-1:] if only_last else answers:
        target = "<|im_start|>assistant\n" + answer + "<|im_end|>"
        at = text.index(target, cursor)
        start = at + len("<|im_start|>assistant\n")
        ranges.append((start, at + len(target)))
        cursor = at + len(target)
    if only_last:
        ranges = ranges[-1:]
    return [tok if any(s <= a and b <= e for s, e in ranges) else IGNORE_INDEX
            for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]


@pytest.mark.parametrize("case", list(CASES))
def test_ids_equal_chat_template_and_labels_cover_answers(tokenizer, case):
    messages = CASES[case]
    example = encode(tokenizer, Conversation.from_openai(messages))
    assert example["input_ids"] == template_ids(tokenizer, messages)
    assert example["labels"] == oracle_labels(tokenizer, messages)
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    supervised = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert supervised[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the newline ChatML writes after <|im_end|> is not supervised
    assert example["labels"][-1] == IGNORE_INDEX


def test_chinese_survives_read_render_decode(tokenizer, tmp_path):
    path = tmp_path / "zh.jsonl"
    row = {"instruction": "孕妇感冒发烧38度应该怎么办呢", "input": "", "output": "可以物理降温,多喝生姜和大枣熬的热水。"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    (conv,) = load_dataset(str(path))
    example = encode(tokenizer, conv)
    assert tokenizer.decode(example["input_ids"]) == render_text(tokenizer, conv)
    answer = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(answer) == row["output"] + "<|im_end|>"
    assert "[[可以物理降温,多喝生姜和大枣熬的热水。<|im_end|>]]" in mark_supervised(tokenizer, example)


def test_mask_history_and_train_on_prompt(tiny_tokenizer):
    conv = Conversation.from_openai(MULTI_SYSTEM)
    last_only = encode(tiny_tokenizer, conv, mask_history=True)
    assert last_only["labels"] == oracle_labels(tiny_tokenizer, MULTI_SYSTEM, only_last=True)
    everything = encode(tiny_tokenizer, conv, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def test_per_message_learn_flags_are_honoured(tiny_tokenizer):
    conv = Conversation([Message("user", "Hello"), Message("assistant", "fine", learn=False),
                         Message("user", "and?"), Message("assistant", "rest")])
    example = encode(tiny_tokenizer, conv)
    learned = tiny_tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    assert learned == "rest<|im_end|>"


def test_truncation_policies_and_counts(tiny_tokenizer):
    long_answer = Conversation.from_openai([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "The patient has a fever. " * 20}])
    long_prompt = Conversation.from_openai([{"role": "user", "content": "Drink water and rest. " * 30},
                                            {"role": "assistant", "content": "ok"}])
    short = Conversation.from_openai(SINGLE)
    full = encode(tiny_tokenizer, long_answer, cutoff_len=10_000)
    cut = encode(tiny_tokenizer, long_answer, cutoff_len=32)
    assert cut["input_ids"] == full["input_ids"][:32] and cut["labels"] == full["labels"][:32]
    assert encode(tiny_tokenizer, long_answer, cutoff_len=32, truncation="drop") is None
    assert encode(tiny_tokenizer, long_prompt, cutoff_len=32) is None  # no answer token left

    examples, stats = encode_all(tiny_tokenizer, [short, long_answer, long_prompt], cutoff_len=32)
    assert (stats.kept, stats.truncated, stats.dropped_no_target, stats.dropped_too_long) == (2, 1, 1, 0)
    assert all(len(e["input_ids"]) <= 32 for e in examples)
    _, stats = encode_all(tiny_tokenizer, [short, long_answer, long_prompt], cutoff_len=32, truncation="drop")
    assert (stats.kept, stats.dropped_too_long) == (1, 2)
    with pytest.raises(TunelabError, match="truncation"):
        encode(tiny_tokenizer, short, truncation="cut")


def test_prompt_ids_end_with_the_generation_prompt(tiny_tokenizer):
    conv = Conversation.from_openai(MULTI)
    ids = prompt_ids(tiny_tokenizer, conv)
    assert ids == template_ids(tiny_tokenizer, MULTI)[: len(ids)]
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_images_become_placeholders(tiny_tokenizer):
    conv = Conversation([Message("user", [ImagePart("cat.png"), TextPart("What is it?")]), Message("assistant", "A cat.")])
    assert "<|im_start|>user\n<image>What is it?<|im_end|>" in render_text(tiny_tokenizer, conv)


def test_missing_or_unstable_template_is_a_clear_error(make_tiny_tokenizer):
    conv = Conversation.from_openai(MULTI)
    with pytest.raises(TunelabError, match="no chat template"):
        encode(make_tiny_tokenizer(chat_template=None), conv)
    # A template that renders earlier answers differently once more turns follow.
    unstable = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ 'A: (old)\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(TunelabError, match="renders message 2 differently"):
        encode(make_tiny_tokenizer(chat_template=unstable), conv)


def test_a_template_refusing_the_data_names_the_row(make_tiny_tokenizer):
    # Like Gemma's template, which raises on a system message.
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    conv = Conversation.from_openai(SYSTEM, source="d.jsonl:4")
    with pytest.raises(TunelabError, match=r"^d\.jsonl:4: the chat template refused a conversation "
                                           r"\(system/user/assistant\): System role not supported$"):
        encode(make_tiny_tokenizer(chat_template=strict), conv)


def test_labels_give_the_loss_over_answer_tokens_only(tiny_tokenizer, tiny_llama):
    import torch

    example = encode(tiny_tokenizer, Conversation.from_openai(MULTI_SYSTEM))
    ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor([example["labels"]])
    with torch.no_grad():
        out = tiny_llama(input_ids=ids, labels=labels)
    # the model predicts token t+1 from position t: score only positions whose next token is supervised
    logits = out.logits[0, :-1]
    targets = ids[0, 1:]
    keep = labels[0, 1:] != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert keep.sum() == sum(t != IGNORE_INDEX for t in example["labels"][1:])
    assert torch.allclose(out.loss, manual, atol=1e-6)


def test_errors_name_the_row(make_tiny_tokenizer):
    unstable = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ 'A: (old)\n' }}{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    conv = Conversation.from_openai(MULTI, source="d.jsonl:9")
    with pytest.raises(TunelabError, match=r"^d\.jsonl:9: the chat template renders message 2 differently"):
        encode(make_tiny_tokenizer(chat_template=unstable), conv)
    with pytest.raises(TunelabError, match=r"^d\.jsonl:9: the tokenizer has no chat template"):
        encode(make_tiny_tokenizer(chat_template=None), conv)
