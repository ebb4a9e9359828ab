"""Dataset rows as the workshop handles them: the raw row, its conversation, its origin.

Mixing and cleaning keep rows as they were written (alpaca stays alpaca) and use
the conversation (via ``tunelab.data.formats``) only to know which text is prompt
and which is answer, whatever the format and column mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.formats import detect_format, to_conversation
from tunelab.data.readers import iter_rows
from tunelab.data.registry import resolve
from tunelab.errors import TunelabError


@dataclass
class Item:
    """One row of a dataset, with where it came from (``file:line``)."""

    row: dict[str, Any]
    conv: Conversation
    source: str
    dataset: str
    fmt: str
    remapped: bool = False

    @property
    def prompt(self) -> str:
        """Everything before the last assistant message (system, history, question)."""
        last = _last_assistant(self.conv)
        return "\n".join(m.text for m in self.conv.messages[:last])

    @property
    def answer(self) -> str:
        last = _last_assistant(self.conv)
        return self.conv.messages[last].text if last < len(self.conv.messages) else ""

    @property
    def text(self) -> str:
        return "\n".join(m.text for m in self.conv.messages)


def _last_assistant(conv: Conversation) -> int:
    indices = [i for i, m in enumerate(conv.messages) if m.role == "assistant"]
    return indices[-1] if indices else len(conv.messages)


def load_items(spec: str | Path, dataset_dir: str | Path | None = None) -> list[Item]:
    """Every row of a dataset (a file, a folder, or a name in ``dataset_dir``'s registry)."""
    entry = resolve(str(spec), dataset_dir)
    items: list[Item] = []
    for path in entry.files:
        fmt = entry.formatting
        for number, row in iter_rows(path, entry.sheet):
            source = f"{path}:{number}"
            if fmt is None:
                fmt = detect_format(row)
                if fmt is None:
                    keys = ", ".join(sorted(map(str, row))) or "none"
                    raise TunelabError(f"{source}: cannot tell the format from the keys ({keys})")
            conv = to_conversation(row, fmt, entry.columns or None, entry.tags or None, source, path.parent)
            items.append(Item(row, conv, source, entry.name, fmt, bool(entry.columns or entry.tags)))
    return items


def export_splits(splits: dict[str, list[Item]]) -> tuple[dict[str, list[dict]], str]:
    """Rows to write per split and their one format.

    Rows stay as read when they share one format; otherwise (or when they were read
    through remapped columns, which the output registry would not know) every row
    becomes an openai ``messages`` row, so each written file holds one format.
    """
    items = [item for rows in splits.values() for item in rows]
    formats = {item.fmt for item in items}
    if len(formats) <= 1 and not any(item.remapped for item in items):
        return {s: [i.row for i in rows] for s, rows in splits.items()}, formats.pop() if formats else "alpaca"
    return {s: [{"messages": i.conv.to_openai()} for i in rows] for s, rows in splits.items()}, "openai"
