"""Preference pairs (a prompt, a chosen and a rejected answer) for the ``dpo`` stage.

Row shapes read (detected per row, or fixed by a registry entry with ``ranking: true``):

- LLaMA-Factory alpaca ranking: ``instruction``/``input`` (+ ``system``, ``history``),
  ``chosen`` and ``rejected`` answer strings;
- LLaMA-Factory sharegpt ranking: ``conversations`` ending on the user turn, ``chosen``
  and ``rejected`` as messages (``{"from": "gpt", "value": ...}``);
- openai-shaped: ``messages`` ending on the user turn, ``chosen``/``rejected`` as
  ``{"role": "assistant", "content": ...}`` or strings;
- TRL's: ``prompt`` (a string or a list of messages), ``chosen``/``rejected`` (strings or
  one-message lists).

Each pair becomes two Conversations that differ only in the last assistant message, so
both answers are rendered exactly as SFT renders a conversation. A row missing an
answer, with an empty one, or with identical answers is an error naming
``file:line: field``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tunelab.data.conversation import Conversation, Message, TextPart
from tunelab.data.formats import to_conversation
from tunelab.data.readers import iter_rows
from tunelab.errors import TunelabError, where


@dataclass
class PreferencePair:
    """The same prompt answered two ways; ``chosen`` is preferred over ``rejected``."""

    chosen: Conversation
    rejected: Conversation
    source: str = ""


def _answer(row: dict, column: str, source: str) -> str:
    """An answer given as a string, a message object, or a list ending on the assistant's message."""
    value = row.get(column)
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1]
    if isinstance(value, dict):
        value = next((value[k] for k in ("value", "content", "text") if k in value), None)
    if value is None:
        raise TunelabError(f"{source}: {column}: missing (a preference row needs 'chosen' and 'rejected')")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise TunelabError(f"{source}: {column}: expected text, got {type(value).__name__}")
    if not value.strip():
        raise TunelabError(f"{source}: {column}: empty")
    return value


def _prompt_row(row: dict, fmt: str | None, columns: dict) -> tuple[dict, str]:
    """The row without its answers, in a shape ``to_conversation`` reads, and that shape."""
    base = {k: v for k, v in row.items() if k not in (columns.get("chosen", "chosen"),
                                                     columns.get("rejected", "rejected"))}
    messages_col = columns.get("messages")
    if fmt == "alpaca":
        return base, fmt
    if fmt in ("sharegpt", "openai") or messages_col:
        return base, fmt or "sharegpt"
    for key in ("conversations", "messages"):
        if isinstance(base.get(key), list):
            return base, "sharegpt" if key == "conversations" else "openai"
    prompt = base.get("prompt")
    if isinstance(prompt, list):  # TRL conversational: prompt is a list of messages
        base["messages"] = base.pop("prompt")
        return base, "openai"
    if isinstance(prompt, str) and "instruction" not in base and "prompt" not in columns:
        base["instruction"] = base.pop("prompt")
    return base, "alpaca"


def _with_answer(base: dict, fmt: str, columns: dict, tags: dict, answer: str) -> dict:
    row = copy.deepcopy(base)
    if fmt == "alpaca":
        row[columns.get("response", "output")] = answer
        return row
    key = columns.get("messages") or ("conversations" if fmt == "sharegpt" else "messages")
    turns = row.get(key)
    if not isinstance(turns, list):
        return row  # to_conversation reports the missing/broken messages field
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    sharegpt_shape = "from" in first or "value" in first
    role = tags.get("role_tag", "from" if sharegpt_shape else "role")
    content = tags.get("content_tag", "value" if sharegpt_shape else "content")
    assistant = tags.get("assistant_tag", "gpt" if sharegpt_shape else "assistant")
    turns.append({role: assistant, content: answer})
    return row


def to_pair(row: dict, fmt: str | None = None, columns: dict | None = None, tags: dict | None = None,
            source: str = "", base_dir: str | Path | None = None) -> PreferencePair:
    """One row -> a PreferencePair (``TunelabError`` naming ``source`` and the field)."""
    columns, tags = dict(columns or {}), dict(tags or {})
    chosen_col, rejected_col = columns.get("chosen", "chosen"), columns.get("rejected", "rejected")
    chosen = _answer(row, chosen_col, source)
    rejected = _answer(row, rejected_col, source)
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise TunelabError(f"{source}: {rejected_col}: identical to {chosen_col} (a pair needs two different answers)")
    base, shape = _prompt_row(row, fmt, columns)
    mapped = {k: v for k, v in columns.items() if k not in ("chosen", "rejected")} or None
    conv = to_conversation(_with_answer(base, shape, columns, tags, chosen), shape, mapped,
                           tags or None, source, base_dir)
    other = Conversation([Message(m.role, list(m.content), m.learn) for m in conv.messages],
                         conv.source, dict(conv.meta))
    other.messages[-1] = Message("assistant", [TextPart(rejected)])
    return PreferencePair(conv, other, source)


def read_pairs(path: str | Path, fmt: str | None = None, columns: dict | None = None,
               tags: dict | None = None, sheet: str | None = None,
               on_error: Callable[[str], None] | None = None) -> list[PreferencePair]:
    """Every preference pair in a data file."""
    path = Path(path)
    pairs = []
    for number, row in iter_rows(path, sheet, on_error):
        try:
            pairs.append(to_pair(row, fmt, columns, tags, where(path, number), path.parent))
        except TunelabError as exc:
            if on_error is None:
                raise
            on_error(str(exc))
    return pairs


def load_pairs(specs: Iterable[str] | str, dataset_dir: str | Path | None = None,
               max_samples: int | None = None, seed: int = 42) -> list[PreferencePair]:
    """Pairs of several datasets (paths or registered names) in order; ``max_samples`` (else
    the entry's ``num_samples``) applies to each, sampled exactly as SFT datasets are."""
    from tunelab.data.registry import resolve, take_samples

    if isinstance(specs, str):
        specs = [specs]
    out: list[PreferencePair] = []
    for spec in specs:
        entry = resolve(spec, dataset_dir)
        pairs = [p for f in entry.files
                 for p in read_pairs(f, entry.formatting, entry.columns, entry.tags, entry.sheet)]
        out.extend(take_samples(pairs, spec, max_samples, entry.num_samples, seed))
    return out
