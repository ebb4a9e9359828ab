"""The chat playground: any run or model, through ``tunelab serve``'s own engine.

A vision-language run (``tunelab.vision``) takes images the page attaches (read in the
browser and sent as ``data:`` URLs, never paths), encoded by the model's ``encode_prompt``
as the server encodes its ``image_url`` parts.

A model is loaded with ``tunelab.serve.models.load_for_serving`` and answered by a
``tunelab.serve.engine.Engine`` (the same batching worker and ``tunelab.generation`` core
as the OpenAI-compatible server), one model at a time: choosing another unloads the
previous one, since a small machine holds one model comfortably and two not always.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from tunelab.errors import TunelabError
from tunelab.generation import GenerationSettings, check_context, render_prompt, with_fallback

SETTING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


@dataclass
class Loaded:
    spec: str
    engine: Any
    tokenizer: Any
    """A copy for encoding in request handlers (the engine thread decodes with its own)."""
    model: Any
    adapter: str | None


class ChatPool:
    """Holds the one loaded chat model and its engine."""

    def __init__(self) -> None:
        self._loaded: Loaded | None = None
        self._lock = threading.Lock()

    def _load(self, spec: str) -> Loaded:
        with self._lock:
            if self._loaded is not None and self._loaded.spec == spec:
                return self._loaded
            from tunelab.serve.engine import Engine
            from tunelab.serve.models import load_for_serving

            if self._loaded is not None:
                self._loaded.engine.stop()
                self._loaded = None
            from tunelab.studio.preflight import LIBRARY_LOCK

            with LIBRARY_LOCK:
                served = load_for_serving(spec)
            adapter = "default" if "default" in served.ids.values() else None
            engine = Engine(served.model, served.tokenizer, max_queue=8, max_batch=4)
            engine.start()
            self._loaded = Loaded(spec, engine, copy.deepcopy(served.tokenizer), served.model, adapter)
            return self._loaded

    @property
    def loaded_spec(self) -> str | None:
        return self._loaded.spec if self._loaded else None

    def close(self) -> None:
        with self._lock:
            if self._loaded is not None:
                self._loaded.engine.stop()
                self._loaded = None

    async def answer(self, spec: str, messages: list[dict[str, str]], settings: GenerationSettings
                     ) -> AsyncIterator[dict[str, Any]]:
        """Events for one answer: ``{"text": piece}``..., then ``{"done": ...}`` or ``{"error": ...}``."""
        from tunelab.serve.engine import Job, QueueFull, ShuttingDown

        yield {"status": f"loading {spec} ..."} if self.loaded_spec != spec else {"status": "generating"}
        loaded = await asyncio.to_thread(self._load, spec)
        prompt, images = await asyncio.to_thread(_encode, loaded, messages)
        check_context(loaded.model, len(prompt), settings.max_new_tokens, "messages")
        loop = asyncio.get_running_loop()
        job = Job(prompt, settings, loaded.adapter, loop) if images is None else \
            Job(prompt, settings, loaded.adapter, loop, images=images)
        try:
            loaded.engine.submit(job)
        except (QueueFull, ShuttingDown):
            yield {"error": "the chat model is busy; try again in a moment"}
            return
        text = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    text.append(value)
                    yield {"text": value}
                elif kind == "done":
                    answer = "".join(text)
                    final = with_fallback(answer)
                    yield {"done": True, "finish_reason": value.finish_reason, "fallback": final != answer,
                           "text": final, "prompt_tokens": value.prompt_tokens,
                           "completion_tokens": value.completion_tokens}
                    return
                else:
                    yield {"error": str(value)}
                    return
        finally:
            job.cancel.set()  # a page that went away stops its row at the next token


def _encode(loaded: Loaded, messages: list[dict[str, Any]]) -> tuple[list[int], list | None]:
    """Prompt ids, and the image spans for a vision-language run (the way ``tunelab serve`` does it)."""
    if hasattr(loaded.model, "encode_prompt"):  # tunelab.vision's composite: placeholders expanded as in training
        return loaded.model.encode_prompt(loaded.tokenizer, messages)
    if any(isinstance(m["content"], list) for m in messages):
        raise TunelabError(f"images: {loaded.spec} is a text-only model; images need a vision-language run")
    return render_prompt(loaded.tokenizer, messages), None


def settings_from(body: dict[str, Any]) -> GenerationSettings:
    """Generation settings from the page; a bad value names its field (``generation.top_p: ...``)."""
    values = {}
    for name in SETTING_FIELDS:
        raw = body.get(name)
        if raw in (None, ""):
            continue
        try:
            values[name] = int(raw) if name in ("max_new_tokens", "top_k", "seed") else float(raw)
        except (TypeError, ValueError):
            raise TunelabError(f"generation.{name}: {raw!r} is not a number") from None
    return GenerationSettings(**values)


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the page sends, with its system prompt first."""
    messages = []
    system = str(body.get("system") or "").strip()
    if system:
        messages.append({"role": "system", "content": system})
    for message in body.get("messages") or []:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise TunelabError("messages: each message needs a role (user or assistant) and content")
        text = str(message.get("content") or "")
        images = message.get("images") or []
        if not images:
            messages.append({"role": message["role"], "content": text})
            continue
        for image in images:  # the page sends files it read itself; never a path or a remote URL
            if not (isinstance(image, str) and image.startswith("data:image/")):
                raise TunelabError("images: each image must be a data:image/... URL")
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
        messages.append({"role": message["role"], "content": [*parts, {"type": "text", "text": text}]})
    if not messages or messages[-1]["role"] != "user":
        raise TunelabError("messages: the conversation must end with a user message")
    return messages
