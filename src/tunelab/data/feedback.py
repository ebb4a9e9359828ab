"""Unpaired feedback (one answer, marked desirable or not) for the ``kto`` stage.

Row shapes read (detected per row):

- any SFT row (alpaca ``instruction``/``input``/``output``, sharegpt ``conversations``,
  openai ``messages``) ending on the rated assistant answer, with a boolean tag column:
  ``kto_tag``, else ``label``, or the registry's ``columns: {kto_tag: NAME}`` (the way
  LLaMA-Factory writes its KTO entries);
- TRL's unpaired rows: ``prompt`` (a string or a list of messages), ``completion`` (a
  string or a one-message list) and ``label``;
- a preference pair (``chosen``/``rejected``, any shape ``tunelab.data.pairs`` reads, or a
  ``ranking: true`` entry): its chosen answer is a desirable example and its rejected one
  an undesirable example of the same prompt.

A tag is ``true``/``false`` (also ``1``/``0`` and the strings ``"true"``/``"false"``);
anything else, or a missing tag, is an error naming ``file:line: field``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tunelab.data.conversation import Conversation
from tunelab.data.formats import detect_format, to_conversation
from tunelab.data.readers import iter_rows
from tunelab.errors import TunelabError, where

TAG_COLUMNS = ("kto_tag", "label")
_TRUE, _FALSE = ("true", "yes", "1", "desirable"), ("false", "no", "0", "undesirable")


@dataclass
class Feedback:
    """A conversation whose last assistant answer is desirable (True) or undesirable (False)."""

    conversation: Conversation
    desirable: bool
    source: str = ""


def _tag(row: dict, columns: dict, source: str) -> tuple[str, bool]:
    """(tag column, value) of a row; a one-line error when missing or not a boolean."""
    names = [columns["kto_tag"]] if columns.get("kto_tag") else [c for c in TAG_COLUMNS if c in row][:1]
    if not names or names[0] not in row:
        wanted = names[0] if names else "kto_tag"
        raise TunelabError(f"{source}: {wanted}: missing (a kto row needs a desirable/undesirable tag, "
                           f"true or false, or a chosen/rejected pair)")
    value = row[names[0]]
    if isinstance(value, bool):
        return names[0], value
    if isinstance(value, int) and value in (0, 1):
        return names[0], bool(value)
    if isinstance(value, str) and value.strip().casefold() in _TRUE + _FALSE:
        return names[0], value.strip().casefold() in _TRUE
    raise TunelabError(f"{source}: {names[0]}: expected true or false, got {value!r}")


def _trl_row(row: dict) -> tuple[dict, str]:
    """TRL's prompt/completion row in a shape ``to_conversation`` reads."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        completion = completion[-1].get("content", completion[-1].get("value"))
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": completion}]}, "openai"
    return {"instruction": prompt, "output": completion}, "alpaca"


def to_feedback(row: dict, fmt: str | None = None, columns: dict | None = None, tags: dict | None = None,
                source: str = "", base_dir: str | Path | None = None, ranking: bool = False) -> list[Feedback]:
    """One row -> one Feedback, or two for a preference pair (``TunelabError`` naming the field)."""
    from tunelab.data.pairs import to_pair

    columns = dict(columns or {})
    if ranking or (columns.get("chosen", "chosen") in row and columns.get("rejected", "rejected") in row):
        pair = to_pair(row, fmt, columns, tags, source, base_dir)
        return [Feedback(pair.chosen, True, source), Feedback(pair.rejected, False, source)]
    column, desirable = _tag(row, columns, source)
    base = {k: v for k, v in row.items() if k != column}
    mapped = {k: v for k, v in columns.items() if k != "kto_tag"}
    shape = fmt
    if shape is None and "completion" in base and "prompt" in base:
        base, shape = _trl_row(base)
    shape = shape or detect_format(base)
    if shape is None:
        raise TunelabError(f"{source}: no conversation found (expected instruction/output, conversations, "
                           "messages, or prompt/completion)")
    conv = to_conversation(base, shape, mapped or None, tags or None, source, base_dir)
    if not conv.messages or conv.messages[-1].role != "assistant":
        raise TunelabError(f"{source}: the last message must be the assistant answer the tag rates")
    return [Feedback(conv, desirable, source)]


def read_feedback(path: str | Path, fmt: str | None = None, columns: dict | None = None,
                  tags: dict | None = None, sheet: str | None = None, ranking: bool = False) -> list[Feedback]:
    """Every feedback example in a data file."""
    path = Path(path)
    return [item for number, row in iter_rows(path, sheet)
            for item in to_feedback(row, fmt, columns, tags, where(path, number), path.parent, ranking)]


def load_feedback(specs: Iterable[str] | str, dataset_dir: str | Path | None = None,
                  max_samples: int | None = None, seed: int = 42) -> list[Feedback]:
    """Feedback of several datasets (paths or registered names) in order; ``max_samples``
    keeps that many examples per dataset after a seeded shuffle (a pair row gives two)."""
    
    from tunelab.data.registry import resolve, take_samples

    if isinstance(specs, str):
        specs = [specs]
    out: list[Feedback] = []
    for spec in specs:
        entry = resolve(spec, dataset_dir)
        items = [f for path in entry.files
                 for f in read_feedback(path, entry.formatting, entry.columns, entry.tags, entry.sheet,
                                        entry.ranking)]
        out.extend(take_samples(items, spec, max_samples, entry.num_samples, seed))
    return out


def describe(items: list[Feedback]) -> str:
    good = sum(f.desirable for f in items)
    return f"{good} desirable, {len(items) - good} undesirable"
