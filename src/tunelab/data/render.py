"""Turn a Conversation into token ids and labels with the tokenizer's own chat template.

Where an answer sits in the token stream is found by rendering, never by a token id:
for assistant message ``i`` we tokenize ``messages[:i]`` with the generation prompt and
``messages[:i+1]``; the longest common prefix ends where the answer starts, and the
second rendering ends after the answer and the template's end-of-turn marker.

What is supervised for an answer: its tokens plus whatever the template puts right
after it up to the last special token (``<|im_end|>`` for ChatML, eos for
``human-assistant``); trailing whitespace-only tokens after that (ChatML's ``\\n``) are
not supervised, because the model never needs to produce them to stop.

Truncation (``cutoff_len``): ``truncate`` keeps the first ``cutoff_len`` tokens and drops
the example only if no supervised token survives; ``drop`` skips every example longer
than ``cutoff_len``. ``encode_all`` counts both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from tunelab.data.conversation import Conversation, ImagePart
from tunelab.errors import TunelabError

IGNORE_INDEX = -100
TRUNCATION = ("truncate", "drop")


@dataclass
class EncodeStats:
    """How many conversations were kept as they were, truncated, or dropped (and why)."""

    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_too_long + self.dropped_no_target

    def summary(self) -> str:
        return (f"{self.kept} kept ({self.truncated} truncated), {self.dropped} dropped "
                f"({self.dropped_too_long} too long, {self.dropped_no_target} with no answer token left)")


def chat_messages(conv: Conversation, image_token: str = "<image>") -> list[dict[str, str]]:
    """Messages as ``{role, content}`` with text content; images become ``image_token``.

    Text-only chat templates concatenate ``content`` as a string, so image parts are
    flattened to a placeholder the vision side later replaces with image features.
    """
    out = []
    for m in conv.messages:
        text = "".join(image_token if isinstance(p, ImagePart) else p.text for p in m.content)
        out.append({"role": m.role, "content": text})
    return out


def token_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendering, whatever container this transformers version returns."""
    if not messages:
        return []
    _require_template(tokenizer)
    out = _apply(tokenizer, messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:  # BatchEncoding / dict in transformers 5
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def _apply(tokenizer: Any, messages: list[dict], **kwargs: Any) -> Any:
    """``apply_chat_template``; a template that refuses the data (``raise_exception``) is a user error."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateError as exc:
        roles = "/".join(m["role"] for m in messages)
        raise TunelabError(f"the chat template refused a conversation ({roles}): {exc}") from None


def _require_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        from tunelab.models.templates import TEMPLATES  # only on this error path

        raise TunelabError(
            "the tokenizer has no chat template: pick a hand-written one with --template / "
            f"model.template ({', '.join(TEMPLATES)}, or a .jinja file)")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(token_id)
    return ids


def _answer_end(tokenizer: Any, ids: list[int], start: int, special: set[int]) -> int:
    """End of the answer span: drop whitespace-only tokens the template adds after the last special."""
    end = len(ids)
    while end > start and ids[end - 1] not in special and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return end


def supervised_spans(tokenizer: Any, conv: Conversation, full: list[int] | None = None,
                     image_token: str = "<image>") -> list[tuple[int, int]]:
    """``[start, end)`` token spans the loss covers, one per message with ``learn`` set."""
    messages = chat_messages(conv, image_token)
    full = token_ids(tokenizer, messages) if full is None else full
    special = _special_ids(tokenizer)
    spans = []
    for i, message in enumerate(conv.messages):
        if not message.learn:
            continue
        if message.role == "assistant":
            before = token_ids(tokenizer, messages[:i], add_generation_prompt=True)
        else:
            before = token_ids(tokenizer, messages[:i])
        # The last message's rendering is the full one: skip a render per conversation.
        upto = full if i == len(messages) - 1 else token_ids(tokenizer, messages[: i + 1])
        start = _common_prefix(before, upto)
        end = _answer_end(tokenizer, upto, start, special) if message.role == "assistant" else len(upto)
        if _common_prefix(upto, full) < end:
            raise TunelabError(
                f"the chat template renders message {i + 1} differently once later "
                "messages follow, so its tokens cannot be located; use mask_history or another template")
        spans.append((start, end))
    return spans


def encode(
    tokenizer: Any, conv: Conversation, cutoff_len: int = 1024, truncation: str = "truncate",
    mask_history: bool = False, train_on_prompt: bool = False, image_token: str = "<image>",
) -> dict[str, list[int]] | None:
    """``{input_ids, labels, attention_mask}`` for one conversation, or None if it is dropped.

    ``input_ids`` equal ``tokenizer.apply_chat_template(messages, tokenize=True)``; labels
    are -100 outside the supervised spans. Returns None per the truncation policy.
    """
    encoded, _ = _encode_one(tokenizer, conv, cutoff_len, truncation, mask_history, train_on_prompt, image_token)
    return encoded


def _encode_one(tokenizer, conv, cutoff_len, truncation, mask_history, train_on_prompt, image_token):
    """Encode and say what happened: 'kept', 'truncated', 'too_long' or 'no_target'."""
    if truncation not in TRUNCATION:
        raise TunelabError(f"data.truncation: {truncation!r} is not one of {', '.join(TRUNCATION)}")
    conv = conv.with_learning(mask_history=mask_history, train_on_prompt=train_on_prompt)
    try:
        full = token_ids(tokenizer, chat_messages(conv, image_token))
        if truncation == "drop" and len(full) > cutoff_len:
            return None, "too_long"
        labels = _labels(tokenizer, conv, full, image_token)
    except TunelabError as exc:
        if conv.source and not str(exc).startswith(conv.source):
            raise TunelabError(f"{conv.source}: {exc}") from None
        raise
    outcome = "kept"
    if len(full) > cutoff_len:
        full, labels, outcome = full[:cutoff_len], labels[:cutoff_len], "truncated"
    if all(label == IGNORE_INDEX for label in labels):
        return None, "no_target"
    return {"input_ids": full, "labels": labels, "attention_mask": [1] * len(full)}, outcome


def _labels(tokenizer: Any, conv: Conversation, full: list[int], image_token: str) -> list[int]:
    if all(m.learn for m in conv.messages):
        return list(full)  # train_on_prompt: every token, template markup included
    labels = [IGNORE_INDEX] * len(full)
    for start, end in supervised_spans(tokenizer, conv, full, image_token):
        labels[start:end] = full[start:end]
    return labels


def encode_all(
    tokenizer: Any, conversations: Iterable[Conversation], cutoff_len: int = 1024,
    truncation: str = "truncate", mask_history: bool = False, train_on_prompt: bool = False,
    image_token: str = "<image>",
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Encode many conversations; returns the kept examples and the counts."""
    stats = EncodeStats()
    examples = []
    for conv in conversations:
        encoded, outcome = _encode_one(tokenizer, conv, cutoff_len, truncation, mask_history,
                                       train_on_prompt, image_token)
        if encoded is None:
            if outcome == "too_long":
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_target += 1
            continue
        stats.kept += 1
        stats.truncated += outcome == "truncated"
        examples.append(encoded)
    return examples, stats


def render_text(tokenizer: Any, conv: Conversation, add_generation_prompt: bool = False,
                image_token: str = "<image>") -> str:
    """The conversation as the chat template writes it."""
    _require_template(tokenizer)
    return _apply(tokenizer, chat_messages(conv, image_token), tokenize=False,
                  add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer: Any, conv: Conversation, image_token: str = "<image>") -> list[int]:
    """Token ids of every message before the last answer, plus the generation prompt (for eval)."""
    messages = chat_messages(conv, image_token)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return token_ids(tokenizer, messages, add_generation_prompt=True)


def mark_supervised(tokenizer: Any, example: dict[str, list[int]], open_mark: str = "[[",
                    close_mark: str = "]]") -> str:
    """Decode an encoded example with every supervised run wrapped in ``[[ ]]``."""
    ids, labels = example["input_ids"], example["labels"]
    pieces, start = [], 0
    while start < len(ids):
        learn = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == learn:
            end += 1
        text = tokenizer.decode(ids[start:end])
        pieces.append(f"{open_mark}{text}{close_mark}" if learn else text)
        start = end
    return "".join(pieces)
