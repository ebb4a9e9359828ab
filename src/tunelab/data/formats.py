"""Adapters from dataset rows (alpaca, sharegpt, openai) to ``Conversation``.

Column and tag names follow LLaMA-Factory's ``dataset_info.json`` so a folder prepared
for it works unchanged: ``columns`` maps a logical field (``prompt``, ``query``,
``response``, ``system``, ``history``, ``messages``, ``images``) to the file's column,
``tags`` names the role/content keys and role values of sharegpt messages.
Every problem is a ``TunelabError`` reading ``file:line: field: what is wrong``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from tunelab.data.conversation import Conversation, ImagePart, Message, Part, TextPart
from tunelab.data.readers import iter_rows
from tunelab.errors import TunelabError

FORMATS = ("alpaca", "sharegpt", "openai")

DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output",
               "system": "system", "history": "history", "images": "images"},
    "sharegpt": {"messages": "conversations", "system": "system", "images": "images"},
    "openai": {"messages": "messages", "system": "system", "images": "images"},
}
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "system_tag": "system"},
}
IMAGE_TOKEN = "<image>"


class RowError(Exception):
    """A problem in one field of one row; the caller adds ``file:line``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def detect_format(row: dict[str, Any]) -> str | None:
    """Guess the format of one row from its keys; None when nothing fits."""
    for key in ("conversations", "messages"):
        turns = row.get(key)
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return "sharegpt" if "from" in turns[0] or "value" in turns[0] else "openai"
    if "instruction" in row or "output" in row:
        return "alpaca"
    return None


def resolve_mapping(fmt: str, columns: dict | None, tags: dict | None) -> tuple[dict, dict]:
    """Defaults for ``fmt`` overlaid with the user's ``columns`` and ``tags``."""
    if fmt not in FORMATS:
        raise TunelabError(f"formatting: unknown format {fmt!r} (use one of {', '.join(FORMATS)})")
    cols = {**DEFAULT_COLUMNS[fmt], **(columns or {})}
    if fmt == "openai" and columns and "messages" not in columns:
        cols["messages"] = "messages"
    tag = {**DEFAULT_TAGS.get(fmt, {}), **(tags or {})}
    return cols, tag


def to_conversation(
    row: dict[str, Any], fmt: str, columns: dict | None = None, tags: dict | None = None,
    source: str = "", base_dir: str | Path | None = None,
) -> Conversation:
    """Turn one row into a Conversation; raises ``TunelabError`` naming ``source`` and the field."""
    if fmt in ("sharegpt", "openai"):
        columns, tags = _lenient_chat(row, fmt, columns, tags)
    cols, tag = resolve_mapping(fmt, columns, tags)
    try:
        if fmt == "alpaca":
            messages = _alpaca_messages(row, cols)
        else:
            messages = _chat_messages(row, cols, tag, fmt)
        raw = _images(row, cols, None)
        images = [_resolve_ref(ref, base_dir) for ref in raw]
        if images:
            _attach_images(messages, images, cols.get("images", "images"))
        _check_turns(messages, _turns_field(fmt, cols))
    except RowError as exc:
        raise TunelabError(f"{source}: {exc}") from None
    meta: dict[str, Any] = {"format": fmt}
    if images:  # the paths as written, for resolving against data.dataset_dir (tunelab.vision.data)
        meta["image_refs"] = dict(zip(images, raw))
    return Conversation(messages, source, meta)


def _lenient_chat(row: dict[str, Any], fmt: str, columns: dict | None, tags: dict | None) -> tuple:
    """Unmapped chat rows: accept either key (``conversations``/``messages``) and either
    message shape (``from``/``value`` or ``role``/``content``), as both circulate under
    both names. Anything the user mapped explicitly is left alone."""
    columns = dict(columns or {})
    if "messages" not in columns:
        key = DEFAULT_COLUMNS[fmt]["messages"]
        other = "messages" if key == "conversations" else "conversations"
        if key not in row and other in row:
            columns["messages"] = other
    turns = row.get(columns.get("messages", DEFAULT_COLUMNS[fmt]["messages"]))
    if tags is None and isinstance(turns, list) and turns and isinstance(turns[0], dict):
        shape = "sharegpt" if "from" in turns[0] or "value" in turns[0] else "openai"
        if shape != fmt:
            tags = DEFAULT_TAGS[shape]
    return columns or None, tags


def _text(row: dict[str, Any], column: str, required: bool = False) -> str:
    value = row.get(column)
    if value is None:
        if required:
            raise RowError(column, "missing")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV/Excel cells: a numeric answer is still an answer
    if not isinstance(value, str):
        raise RowError(column, f"expected text, got {type(value).__name__}")
    return value


def _alpaca_messages(row: dict[str, Any], cols: dict) -> list[Message]:
    instruction = _text(row, cols["prompt"])
    query = _text(row, cols["query"])
    if cols["prompt"] not in row and cols["query"] not in row:
        raise RowError(cols["prompt"], "missing")
    prompt = "\n".join(part for part in (instruction, query) if part)
    if not prompt.strip():
        raise RowError(cols["prompt"], f"empty (and {cols['query']} is empty too)")
    response = _text(row, cols["response"], required=True)
    messages = []
    system = _text(row, cols["system"])
    if system:
        messages.append(Message("system", [TextPart(system)]))
    messages.extend(_history(row.get(cols["history"]), cols["history"]))
    messages.append(Message("user", [TextPart(prompt)]))
    messages.append(Message("assistant", [TextPart(response)]))
    return messages


def _history(value: Any, field: str) -> list[Message]:
    """History as ``[[user, assistant], ...]`` pairs or ``[{role, content}, ...]`` turns."""
    if value in (None, "", []):
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # CSV/Excel cells can only hold history as JSON text
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(field, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(value, list):
        raise RowError(field, f"expected a list, got {type(value).__name__}")
    messages = []
    for i, item in enumerate(value):
        if isinstance(item, (list, tuple)):
            if len(item) != 2:
                raise RowError(f"{field}[{i}]", f"expected a [user, assistant] pair, got {len(item)} items")
            for role, text in zip(("user", "assistant"), item):
                if not isinstance(text, str):
                    raise RowError(f"{field}[{i}]", f"expected text, got {type(text).__name__}")
                messages.append(Message(role, [TextPart(text)]))
        elif isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if role not in ("user", "assistant"):
                raise RowError(f"{field}[{i}].role", f"expected 'user' or 'assistant', got {role!r}")
            if not isinstance(content, str):
                raise RowError(f"{field}[{i}].content", "missing or not text")
            messages.append(Message(role, [TextPart(content)]))
        else:
            raise RowError(f"{field}[{i}]", f"expected a pair or a {{role, content}} object, got {type(item).__name__}")
    return messages


def _chat_messages(row: dict[str, Any], cols: dict, tag: dict, fmt: str) -> list[Message]:
    field = cols["messages"]
    turns = row.get(field)
    if turns is None:
        raise RowError(field, "missing")
    if not isinstance(turns, list) or not turns:
        raise RowError(field, "expected a non-empty list of messages")
    roles = {tag["user_tag"]: "user", tag["assistant_tag"]: "assistant", tag["system_tag"]: "system"}
    if tag["user_tag"] == "human" and tag["assistant_tag"] == "gpt":
        roles.update({"user": "user", "assistant": "assistant"})  # common in sharegpt exports
    messages = []
    system = _text(row, cols["system"])
    if system:
        messages.append(Message("system", [TextPart(system)]))
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, f"expected an object, got {type(turn).__name__}")
        raw_role = turn.get(tag["role_tag"])
        if raw_role not in roles:
            raise RowError(f"{where}.{tag['role_tag']}",
                           f"unknown role {raw_role!r} (expected one of {', '.join(map(repr, roles))})")
        content = turn.get(tag["content_tag"])
        messages.append(Message(roles[raw_role], _content_parts(content, f"{where}.{tag['content_tag']}", fmt)))
    return messages


def _content_parts(content: Any, where: str, fmt: str) -> list[Part]:
    if isinstance(content, str):
        return [TextPart(content)]
    if content is None:
        raise RowError(where, "missing")
    if fmt == "openai" and isinstance(content, list):
        parts: list[Part] = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                parts.append(TextPart(item["text"]))
            elif kind in ("image_url", "image"):
                try:
                    parts.append(Message.from_openai({"role": "user", "content": [item]}).content[0])
                except ValueError:
                    raise RowError(f"{where}[{j}]", "image part without a url") from None
            else:
                raise RowError(f"{where}[{j}]", f"expected a text or image_url part, got {item!r:.60}")
        return parts
    raise RowError(where, f"expected text, got {type(content).__name__}")


def _images(row: dict[str, Any], cols: dict, base_dir: str | Path | None) -> list[str]:
    value = row.get(cols.get("images", "images"))
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowError(cols["images"], "expected a list of image paths")
    return [_resolve_ref(v, base_dir) for v in value]


def _resolve_ref(ref: str, base_dir: str | Path | None) -> str:
    if base_dir is None or "://" in ref or ref.startswith("data:") or os.path.isabs(ref):
        return ref
    return str(Path(base_dir) / ref)


def _attach_images(messages: list[Message], images: list[str], field: str = "images") -> None:
    """Put each image where its ``<image>`` placeholder is, else before the first user text.

    Placeholders, when there are any, must match the images one for one (LLaMA-Factory's rule):
    a mismatch is the row's error, not a silently dropped image or placeholder.
    """
    placeholders = sum(p.text.count(IMAGE_TOKEN) for m in messages if m.role == "user"
                       for p in m.content if isinstance(p, TextPart))
    if placeholders and placeholders != len(images):
        raise RowError(field, f"{len(images)} image(s) but {placeholders} {IMAGE_TOKEN} placeholder(s) "
                              "in the user messages; they must match one for one")
    pending = list(images)
    for message in messages:
        if message.role != "user":
            continue
        parts: list[Part] = []
        for part in message.content:
            if isinstance(part, TextPart) and IMAGE_TOKEN in part.text:
                for k, piece in enumerate(part.text.split(IMAGE_TOKEN)):
                    if k and pending:
                        parts.append(ImagePart(pending.pop(0)))
                    if piece:
                        parts.append(TextPart(piece))
            else:
                parts.append(part)
        message.content = parts
    if pending:
        first_user = next(m for m in messages if m.role == "user")
        first_user.content = [ImagePart(ref) for ref in pending] + first_user.content


def _turns_field(fmt: str, cols: dict) -> str:
    return cols["response"] if fmt == "alpaca" else cols["messages"]


def _check_turns(messages: list[Message], field: str) -> None:
    """System first (optional), then user/assistant alternating, ending on a non-empty answer."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise RowError(field, f"message {i + 1} is from {message.role!r}, expected {expected!r} "
                                  "(roles must alternate user/assistant after an optional system)")
    if not body or body[-1].role != "assistant":
        raise RowError(field, "the last message must be the assistant's answer")
    empty = [i + 1 for i, m in enumerate(body) if m.role == "assistant" and not m.text.strip()]
    if empty:
        which = "the answer" if empty[0] == len(body) else f"message {empty[0]} (assistant)"
        raise RowError(field, f"{which} is empty")


def read_conversations(
    path: str | Path, fmt: str | None = None, columns: dict | None = None, tags: dict | None = None,
    sheet: str | None = None, on_error: Callable[[str], None] | None = None,
) -> list[Conversation]:
    """Read a data file into Conversations.

    Without ``fmt`` each row's format is detected from its keys (a file may mix them); a
    row too broken to tell is read in the format of the rows before it, so its error
    names the missing field. With remapped ``columns`` the format is detected once.

    ``on_error``: collect every problem (``file:line: field: what``) instead of raising the first.
    """
    path = Path(path)
    conversations = []
    seen: str | None = None  # the last detected format, for rows too broken to tell
    for number, row in iter_rows(path, sheet, on_error):
        source = f"{path}:{number}"
        try:
            if fmt is None:
                detected = None if columns else detect_format(row)
                seen = detected or seen or _detect_or_raise(row, columns, source)
            conversations.append(to_conversation(row, fmt or seen, columns, tags, source, path.parent))
        except TunelabError as exc:
            if on_error is None:
                raise
            on_error(str(exc))
    return conversations


def _detect_or_raise(row: dict[str, Any], columns: dict | None, source: str) -> str:
    fmt = detect_format(row)
    if fmt is None and columns:
        # Remapped columns: the logical names used tell the format.
        fmt = "alpaca" if {"prompt", "response"} & set(columns) else "sharegpt" if "messages" in columns else None
    if fmt is None:
        keys = ", ".join(sorted(map(str, row))) or "none"
        raise TunelabError(
            f"{source}: cannot tell the format from the keys ({keys}); expected alpaca "
            "(instruction/input/output), sharegpt (conversations) or openai (messages), "
            "or map your columns in dataset_info.json")
    return fmt
