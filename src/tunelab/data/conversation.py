"""The one conversation type every dataset format is turned into.

A ``Conversation`` is a list of messages; each message has a role, a list of content
parts (text or image) and a ``learn`` flag saying whether the loss covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

ROLES = ("system", "user", "assistant")


@dataclass
class TextPart:
    """A piece of text inside a message."""

    text: str


@dataclass
class ImagePart:
    """An image inside a message: a path or URL, resolved by the model side."""

    ref: str


Part = Union[TextPart, ImagePart]


@dataclass
class Message:
    """One turn. ``learn`` defaults to true for assistant messages only."""

    role: str
    content: list[Part]
    learn: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.content, str):
            self.content = [TextPart(self.content)]
        if self.learn is None:
            self.learn = self.role == "assistant"

    @property
    def text(self) -> str:
        """The text parts joined together (images left out)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[str]:
        return [p.ref for p in self.content if isinstance(p, ImagePart)]

    def to_openai(self) -> dict[str, Any]:
        """``{"role", "content"}``: a plain string when text-only, else a list of parts."""
        if all(isinstance(p, TextPart) for p in self.content):
            return {"role": self.role, "content": self.text}
        parts = [
            {"type": "text", "text": p.text} if isinstance(p, TextPart)
            else {"type": "image_url", "image_url": {"url": p.ref}}
            for p in self.content
        ]
        return {"role": self.role, "content": parts}

    @classmethod
    def from_openai(cls, data: dict[str, Any], learn: bool | None = None) -> "Message":
        """Inverse of ``to_openai`` (also accepts ``{"type": "image", "image": ...}`` parts)."""
        content = data.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            return cls(data["role"], [TextPart(content)], learn)
        parts: list[Part] = []
        for item in content:
            if item.get("type") == "text":
                parts.append(TextPart(item.get("text", "")))
            else:
                parts.append(ImagePart(_image_ref(item)))
        return cls(data["role"], parts, learn)


def _image_ref(item: dict[str, Any]) -> str:
    value = item.get("image_url", item.get("image", item.get("url")))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str):
        raise ValueError(f"image part without a url: {item}")
    return value


@dataclass
class Conversation:
    """Messages plus where they came from (``source`` = ``file:line``) and free metadata."""

    messages: list[Message]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> list[dict[str, Any]]:
        """The messages as OpenAI-style dicts (what ``apply_chat_template`` takes)."""
        return [m.to_openai() for m in self.messages]

    @classmethod
    def from_openai(cls, messages: list[dict[str, Any]], source: str = "", meta: dict | None = None) -> "Conversation":
        return cls([Message.from_openai(m) for m in messages], source, dict(meta or {}))

    @property
    def system(self) -> str | None:
        first = self.messages[0] if self.messages else None
        return first.text if first is not None and first.role == "system" else None

    def with_learning(self, mask_history: bool = False, train_on_prompt: bool = False) -> "Conversation":
        """A copy with ``learn`` set by policy (see docs/architecture.md).

        ``train_on_prompt`` learns every message; ``mask_history`` keeps only the last
        assistant message; neither leaves the flags as they are.
        """
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=-1)
        messages = []
        for i, m in enumerate(self.messages):
            learn = m.learn
            if train_on_prompt:
                learn = True
            elif mask_history and m.role == "assistant":
                learn = i == last and bool(m.learn)
            messages.append(Message(m.role, list(m.content), learn))
        return Conversation(messages, self.source, dict(self.meta))
