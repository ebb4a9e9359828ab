"""Images in conversations: finding the files, opening them, grouping them into spans.

A relative image path resolves against the folder of the dataset file that names it, then
against ``data.dataset_dir`` (LLaMA-Factory keeps images beside ``dataset_info.json``), then the
current folder. Remote URLs are refused (tunelab trains offline); ``data:`` URLs are decoded.
Every problem reads ``file:line: images: PATH: what``. Pillow is imported only when an image
is opened.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterable

from tunelab.data.conversation import Conversation, ImagePart, Message, TextPart
from tunelab.errors import TunelabError


def _source_folder(conv: Conversation) -> Path | None:
    file = conv.source.rsplit(":", 1)[0] if conv.source else ""
    return Path(file).parent if file else None


def resolve_image(ref: str, conv: Conversation, dataset_dir: str | Path | None = None) -> str:
    """The file ``ref`` names (or the ``data:`` URL itself); a one-line error when there is none."""
    if ref.startswith("data:"):
        return ref
    if "://" in ref:
        raise TunelabError(f"{conv.source}: images: {ref}: remote images are not fetched (tunelab works "
                           "offline); download it and give its path")
    raw = conv.meta.get("image_refs", {}).get(ref, ref)  # the path as the file wrote it
    candidates = [Path(ref)]
    folder = _source_folder(conv)
    if not Path(raw).is_absolute():
        if folder is not None:
            candidates.append(folder / raw)
        if dataset_dir is not None:
            candidates.append(Path(dataset_dir) / raw)
        candidates.append(Path(raw))
    for candidate in candidates:
        if candidate.expanduser().is_file():
            return str(candidate.expanduser())
    looked = ", ".join(dict.fromkeys(str(c.parent) if str(c.parent) != "." else "." for c in candidates))
    raise TunelabError(f"{conv.source}: images: {raw}: not found (looked in {looked})")


def open_image(path: str, where: str = ""):
    """A PIL image in RGB; unreadable files are a one-line error naming ``where`` and the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.startswith("data:"):
            header, _, payload = path.partition(",")
            if ";base64" not in header:
                raise ValueError("only base64 data: URLs are supported")
            handle = io.BytesIO(base64.b64decode(payload, validate=True))
            label = "data: URL"
        else:
            handle, label = path, path
        with Image.open(handle) as image:
            return image.convert("RGB")
    except (OSError, ValueError, UnidentifiedImageError) as exc:  # binascii.Error is a ValueError
        prefix = f"{where}: " if where else ""
        shown = "data: URL" if path.startswith("data:") else path
        raise TunelabError(f"{prefix}images: {shown}: cannot be read as an image ({exc})") from None


def resolve_images(conv: Conversation, dataset_dir: str | Path | None = None) -> Conversation:
    """A copy whose image parts name the files found (``resolve_image``); text-only: ``conv`` itself."""
    if not any(isinstance(p, ImagePart) for m in conv.messages for p in m.content):
        return conv
    messages = [Message(m.role, [ImagePart(resolve_image(p.ref, conv, dataset_dir)) if isinstance(p, ImagePart)
                                 else p for p in m.content], m.learn) for m in conv.messages]
    return Conversation(messages, conv.source, dict(conv.meta))


def image_problems(conversations: Iterable[Conversation], dataset_dir: str | Path | None = None) -> list[str]:
    """Every missing or unreadable image and stray placeholder, one line each (``data check``)."""
    problems = []
    for conv in conversations:
        for ref in (ref for m in conv.messages for ref in m.images):
            try:
                open_image(resolve_image(ref, conv, dataset_dir), conv.source)
            except TunelabError as exc:
                problems.append(str(exc))
    return problems


def image_spans(conv: Conversation, mean: bool, image_token: str = "<image>") -> tuple[Conversation, list[list[str]]]:
    """One ``ImagePart`` per span, and the images of each span in order.

    With ``mean``, images side by side (no text between them) form one span whose features
    are averaged; otherwise each image is its own span. A literal placeholder left in the
    text (more ``<image>`` than images) is an error: it would become tokens with no image.
    """
    spans: list[list[str]] = []
    messages = []
    for message in conv.messages:
        parts: list = []
        for part in message.content:
            if isinstance(part, TextPart) and image_token in part.text:
                raise TunelabError(f"{conv.source}: a {image_token} placeholder in a {message.role} message "
                                   "has no image (the images list is shorter)")
            if isinstance(part, ImagePart):
                if mean and parts and isinstance(parts[-1], ImagePart):
                    spans[-1].append(part.ref)
                    continue
                spans.append([part.ref])
            parts.append(part)
        messages.append(Message(message.role, parts, message.learn))
    return Conversation(messages, conv.source, dict(conv.meta)), spans
