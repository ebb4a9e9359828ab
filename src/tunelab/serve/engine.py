"""The serving engine: a bounded queue and one worker thread that batches requests.

HTTP handlers (asyncio) submit ``Job``s; the worker thread takes the oldest job plus
every waiting job that can share its ``model.generate`` call (same adapter, same
settings apart from the token limit), runs them through ``tunelab.generation`` and
hands text pieces back to each job's asyncio queue as they are produced. One thread
owns the model, so adapters can be switched between batches safely.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from tunelab.generation import GenerationResult, GenerationSettings, generate_ids

log = logging.getLogger("tunelab.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class Job:
    """One generation request, owned by the HTTP handler that awaits ``events``.

    Events are ``("text", str)``, ``("done", GenerationResult)`` and ``("error", str)``.
    """

    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str | None
    """peft adapter name, or None for the base model."""
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    images: list | None = None
    """Vision-language models: the prompt's image spans (``tunelab.generation.generate_ids``)."""

    @property
    def batch_key(self) -> tuple:
        # Rows of one generate call share every setting except their own token limit.
        return self.adapter, self.settings.replace(max_new_tokens=1, min_new_tokens=0), self.settings.min_new_tokens

    def emit(self, kind: str, value: Any) -> None:
        """Thread-safe: deliver an event to the handler's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    """Batches jobs for one model (with optional peft adapters) on a worker thread."""

    def __init__(self, model, tokenizer, max_queue: int = 64, max_batch: int = 8, batch_wait: float = 0.01):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch, self.batch_wait = max_queue, max_batch, batch_wait
        self._waiting: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Counters for /health and tests: batches run, the largest one, rows cancelled mid-answer.
        self.batches_run = 0
        self.largest_batch = 0
        self.cancelled = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tunelab-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the waiting ones, let the running batch finish."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in waiting:
            job.emit("error", "the server is shutting down")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``QueueFull`` or ``ShuttingDown`` instead of waiting."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._waiting) >= self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cond.notify()

    # ------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting or self._stopping)
                if self._stopping:
                    return
            # Requests sent at the same moment arrive a few ms apart; wait so they share a batch.
            time.sleep(self.batch_wait)
            batch = self._take_batch()
            if batch:
                self._run(batch)

    def _take_batch(self) -> list[Job]:
        with self._cond:
            self._waiting = [job for job in self._waiting if not job.cancel.is_set()]
            if not self._waiting:
                return []
            key = self._waiting[0].batch_key
            batch = [job for job in self._waiting if job.batch_key == key][: self.max_batch]
            self._waiting = [job for job in self._waiting if job not in batch]
            return batch

    def _run(self, batch: list[Job]) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        settings = batch[0].settings.replace(max_new_tokens=max(job.settings.max_new_tokens for job in batch))
        try:
            with self._adapter(batch[0].adapter):
                generate_ids(
                    self.model, self.tokenizer, [job.prompt_ids for job in batch], settings,
                    limits=[job.settings.max_new_tokens for job in batch],
                    on_text=lambda row, piece: batch[row].emit("text", piece),
                    on_done=lambda row, result: self._done(batch[row], result),
                    cancel=[job.cancel for job in batch],
                    **self._images(batch),
                )
        except Exception as exc:  # one bad batch must not take the server down
            log.exception("generation failed")
            for job in batch:
                job.emit("error", f"generation failed: {exc}")

    def _images(self, batch: list[Job]) -> dict[str, Any]:
        # A vision-language model takes every row's image spans (none for text-only rows).
        if not hasattr(self.model, "image_inputs"):
            return {}
        return {"images": [job.images or [] for job in batch]}

    def _done(self, job: Job, result: GenerationResult) -> None:
        if result.finish_reason == "cancelled":
            self.cancelled += 1
        job.emit("done", result)

    @contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        if not _is_peft(self.model):
            yield
            return
        if adapter is None:
            with self.model.disable_adapter():
                yield
            return
        try:
            self.model.set_adapter(adapter, inference_mode=True)
        except TypeError:  # older peft: no inference_mode, adapters are not trainable here anyway
            self.model.set_adapter(adapter)
        yield


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


async def collect(job: Job) -> GenerationResult:
    """Wait for a non-streaming job to finish (raises ``RuntimeError`` on an engine error)."""
    while True:
        kind, value = await job.events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise RuntimeError(value)
