"""Chat requests with images, for a served vision-language run.

OpenAI-style content parts: ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``. Only ``data:``
URLs are read: a remote URL would make the server fetch for the client (tunelab works
offline), and a path would let a request read files on the server; both are a 400, as is an
image that does not decode.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.conversation import Conversation, ImagePart, Message, Part, TextPart
from tunelab.errors import TunelabError
from tunelab.serve.schemas import APIError, ChatRequest, checked_messages


def vision_prompt(model: Any, tokenizer: Any, body: ChatRequest) -> tuple[list[int], list]:
    """``(prompt ids, image spans)`` of a chat request to a vision-language model, or a 400."""
    messages = []
    for where, role, content in checked_messages(body):
        parts = [TextPart(content)] if isinstance(content, str) else [
            _part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
        messages.append(Message(role, parts))
    try:
        ids, spans = model.encode_prompt(tokenizer, Conversation(messages, "request"))
    except TunelabError as exc:
        raise APIError(400, str(exc).removeprefix("request: "), param="messages") from None
    if not ids:
        raise APIError(400, "messages: the prompt is empty", param="messages")
    return ids, spans


def _part(part: Any, where: str) -> Part:
    from tunelab.data.images import open_image

    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return TextPart(str(part.get("text", "")))
    if kind != "image_url":
        raise APIError(400, f"{where}: expected a text or image_url part, got type {kind!r}", param=where)
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = url[:60] if isinstance(url, str) else type(url).__name__
        raise APIError(400, f"{where}.image_url: {shown}: only data: URLs are accepted (a base64 image); "
                            "remote URLs and server-side paths are refused", param=f"{where}.image_url")
    try:
        open_image(url)  # decode now: a broken image is the client's 400, not a failed batch
    except TunelabError as exc:
        raise APIError(400, f"{where}.image_url: {exc}", param=f"{where}.image_url") from None
    return ImagePart(url)
