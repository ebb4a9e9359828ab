"""Request bodies of the OpenAI-compatible API and its error shape.

Fields follow OpenAI's names; ``top_k``, ``min_tokens``, ``repetition_penalty`` and
``no_repeat_ngram_size`` are extensions (as in vLLM). Unknown fields are ignored, as OpenAI clients send extras.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Union[bool, int, None] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool | None = False


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def checked_messages(body: ChatRequest):
    """``(where, role, content)`` of each request message; a 400 for none or an unknown role."""
    if not body.messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]"
        if message.role not in ROLES:
            raise APIError(400, f"{where}.role: '{message.role}' is not one of system, user, assistant",
                           param=f"{where}.role")
        yield where, ROLES[message.role], message.content or ""


def chat_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as plain ``{role, content}`` dicts, or a 400."""
    messages = []
    for where, role, content in checked_messages(body):
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, f"{where}.content: only text parts are supported by this model",
                               param=f"{where}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": role, "content": content})
    return messages


def check_unsupported(body: _Sampling) -> None:
    """400 for options this server does not implement, rather than silently ignoring them."""
    if body.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if getattr(body, "echo", False):
        raise APIError(400, "echo is not supported", param="echo")
