"""The one generation core shared by eval, chat and serve.

- ``GenerationSettings``: what to generate (greedy, sampling or beam; stop strings; seed),
  validated where it is declared, with named presets.
- ``generate``: many prompts (chat message lists or raw strings), batched with left
  padding, sorted by length to cut padding, results in input order.
- ``stream``: one conversation, text pieces as they are generated, cancellable.
- ``generate_ids``: already-tokenised prompts (one batch, or ``max_rows`` at a time) with
  per-row callbacks, limits and cancellation; the server's batching engine drives this
  directly. Greedy decoding uses tunelab's own loop (``tunelab.greedy``), the rest
  transformers' ``generate``; a GGUF model in llama.cpp (``--quantize``,
  ``tunelab.models.gguf_runtime``) decodes itself and feeds the same bookkeeping.

Prompts become token ids (and, for a vision-language model, image spans) in
``tunelab.prompts``; its names are importable from here too. Stop strings are handled in
exactly one place, ``tunelab.stops``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from tunelab.errors import TunelabError
from tunelab.greedy import fast_greedy_applies, greedy_decode
from tunelab.models.gguf_runtime import is_llamacpp
from tunelab.prompts import check_context, encode_prompts, image_inputs, render_prompt
from tunelab.prompts import context_length  # noqa: F401  (public here too: tunelab.generation.context_length)
from tunelab.stops import StopFilter, template_stops

FALLBACK_REPLY = (
    "I'm sorry, but I couldn't generate a response to that. "
    "Please feel free to ask something else or type 'exit' to leave."
)
"""Said instead of an empty answer (seed 004): silence looks like a hang to the user."""


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature=0`` means greedy; ``num_beams>1`` means beam search."""

    max_new_tokens: int = 256
    """Upper bound on generated tokens (finish_reason ``length`` when reached)."""
    min_new_tokens: int = 0
    """End-of-sequence is suppressed until this many tokens exist."""
    temperature: float = 0.0
    """0 = greedy (deterministic); > 0 samples, higher is more random."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability (1 = off)."""
    top_k: int = 0
    """Keep only the K most likely tokens when sampling (0 = off)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens already in the prompt or answer (1 = off)."""
    num_beams: int = 1
    """Beam search width (1 = no beam search). Beam search cannot stream."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Strings that end the answer; the answer is cut before the first one."""
    seed: int | None = None
    """Seed for sampling, so sampled answers can be reproduced."""
    no_repeat_ngram_size: int = 0
    """Never repeat an n-gram of this many tokens (0 = off; R2GenGPT declares 2). Decoding
    then goes through transformers' ``generate``, which implements it."""

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))
        self.validate()

    def validate(self) -> None:
        """Raise ``TunelabError`` naming the first bad field."""
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "must be an integer >= 1"),
            ("min_new_tokens", _is_int(self.min_new_tokens) and 0 <= self.min_new_tokens, "must be an integer >= 0"),
            ("temperature", _is_num(self.temperature) and 0 <= self.temperature <= 100, "must be between 0 and 100"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "must be an integer >= 0"),
            ("repetition_penalty", _is_num(self.repetition_penalty) and self.repetition_penalty > 0, "must be > 0"),
            ("num_beams", _is_int(self.num_beams) and self.num_beams >= 1, "must be an integer >= 1"),
            ("no_repeat_ngram_size", _is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
             "must be an integer >= 0"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be a list of non-empty strings"),
            ("seed", self.seed is None or _is_int(self.seed), "must be an integer"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise TunelabError(f"generation.{name}: {getattr(self, name)!r} {problem}")
        if self.min_new_tokens > self.max_new_tokens:
            raise TunelabError(
                f"generation.min_new_tokens: {self.min_new_tokens} is larger than max_new_tokens {self.max_new_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with some fields changed (unknown names are errors)."""
        _check_names(changes)
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(changes: dict[str, Any]) -> None:
    names = [f.name for f in dataclasses.fields(GenerationSettings)]
    for key in changes:
        if key not in names:
            raise TunelabError(f"generation: unknown setting '{key}' (valid: {', '.join(names)})")


PRESETS: dict[str, dict[str, Any]] = {
    "greedy": {},
    "sampling": {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1},
    "beam": {"num_beams": 4, "repetition_penalty": 1.2},
}


def from_preset(name: str, **overrides: Any) -> GenerationSettings:
    """Settings of preset ``name`` (greedy, sampling, beam) with ``overrides`` applied.

    ``None`` overrides are ignored, so CLI options left unset keep the preset's value.
    """
    if name not in PRESETS:
        raise TunelabError(f"generation preset '{name}' is not one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_names(overrides)
    return GenerationSettings(**{**PRESETS[name], **overrides})


@dataclass
class GenerationResult:
    """One answer with its token counts; ``finish_reason`` is stop, length or cancelled."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def with_fallback(text: str, fallback: str = FALLBACK_REPLY) -> str:
    """``text``, or the fixed polite reply when the model produced nothing visible."""
    return text if text.strip() else fallback


# ---------------------------------------------------------------- one batch


class _Rows:
    """Per-row bookkeeping while prompts are generated.

    ``push(row, token)`` is fed by the greedy loop (``tunelab.greedy``), or after every
    step of ``model.generate`` through ``criterion(rows)``. Either way it decodes the
    row's newest token, passes the text through the row's ``StopFilter``, and reports
    whether the row is done (eos, stop string, its own token limit, or cancelled), so
    finished rows stop while the others go on.
    ``on_text(row, piece)`` gets text as it becomes final, ``on_done(row, result)`` fires
    once per row the moment that row finishes.
    """

    def __init__(self, tokenizer, prompt_lens: list[int], limits: list[int], stops, eos_ids: set[int],
                 on_text=None, on_done=None, cancel=None):
        self.tokenizer, self.prompt_lens, self.limits, self.eos_ids = tokenizer, prompt_lens, limits, eos_ids
        self.on_text, self.on_done, self.cancel = on_text, on_done, cancel
        n = len(limits)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.decoded = [""] * n
        self.filters = [StopFilter(stops) for _ in range(n)]
        self.results: list[GenerationResult | None] = [None] * n

    def criterion(self, members: list[int]):
        """A transformers stopping criterion for a ``model.generate`` call over rows ``members``."""
        import torch

        def done(input_ids, scores=None, **kwargs):
            for local, row in enumerate(members):
                self.push(row, int(input_ids[local, -1]))
            return torch.tensor([self.results[row] is not None for row in members], device=input_ids.device)

        return done

    def push(self, row: int, token: int) -> bool:
        """Take ``row``'s next token; True once the row is finished."""
        self._advance(row, token)
        return self.results[row] is not None

    def _advance(self, row: int, token: int) -> None:
        if self.results[row] is not None:
            return
        if self.cancel is not None and self.cancel[row] is not None and self.cancel[row].is_set():
            self.finish(row, "cancelled")
            return
        self.ids[row].append(token)
        if token in self.eos_ids:
            self.finish(row, "stop")
            return
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        # A multi-byte character split over tokens decodes to U+FFFD until complete.
        if not text.endswith("\ufffd"):
            # Byte-level BPE decodes prefix-stably; others may rewrite a space, so like
            # transformers' TextStreamer we emit whatever lies beyond the old length.
            piece = text[len(self.decoded[row]):]
            self.decoded[row] = text
            piece, stopped = self.filters[row].feed(piece)
            self._emit(row, piece)
            if stopped:
                self.finish(row, "stop")
                return
        if len(self.ids[row]) >= self.limits[row]:
            self.finish(row, "length")

    def _emit(self, row: int, piece: str) -> None:
        if piece and self.on_text is not None:
            self.on_text(row, piece)

    def finish(self, row: int, reason: str) -> GenerationResult:
        """End ``row`` (idempotent): show held-back text unless cancelled, report the result."""
        if self.results[row] is None:
            if reason != "cancelled":
                self._emit(row, self.filters[row].flush())
            result = GenerationResult(self.filters[row].text, self.prompt_lens[row], len(self.ids[row]), reason)
            self.results[row] = result
            if self.on_done is not None:
                self.on_done(row, result)
        return self.results[row]


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends an answer: the model's generation config plus the tokenizer's eos."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def generation_kwargs(settings: GenerationSettings, max_new_tokens: int, pad_id: int, eos: set[int]) -> dict:
    """Keyword arguments for transformers' ``generate`` that carry out ``settings``."""
    # When sampling, every sampling field is set explicitly: transformers fills unset ones
    # from the checkpoint's generation_config (e.g. top_k=50), which would make our
    # settings mean different things per model. Greedy decoding ignores them.
    kwargs = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=settings.min_new_tokens,
        do_sample=not settings.greedy, num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty, pad_token_id=pad_id,
        eos_token_id=sorted(eos) or None, use_cache=True,
    )
    if not settings.greedy:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    if settings.num_beams > 1:
        kwargs["early_stopping"] = True
    if settings.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = settings.no_repeat_ngram_size
    return kwargs


def generate_ids(
    model,
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    limits: Sequence[int] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    on_done: Callable[[int, GenerationResult], None] | None = None,
    cancel: Sequence[threading.Event | None] | None = None,
    max_rows: int | None = None,
    fast_greedy: bool = True,
    images: Sequence[Any] | None = None,
) -> list[GenerationResult]:
    """Generate for tokenised prompts, at most ``max_rows`` rows at once (default: all).

    ``images`` is for vision-language models (``tunelab.vision``): each row's image spans, in
    the order of its placeholder runs (``[]`` for a row without images); the model turns a
    batch's spans into its ``generate`` inputs (``model.image_inputs``).

    ``limits`` gives each row its own max_new_tokens (default: the settings'). From this
    thread, ``on_text(row, piece)`` gets text as it becomes final and ``on_done(row,
    result)`` fires when a row finishes; setting ``cancel[row]`` stops that row.
    Greedy decoding runs tunelab's own loop where it applies (``tunelab.greedy``: the
    tokens ``model.generate`` gives; a finished row leaves its batch at once; the prompt
    prefix all prompts share is encoded once). Sampling, beam search, repetition penalty
    and ``fast_greedy=False`` use one ``model.generate`` call per ``max_rows`` prompts.
    """
    import torch

    if not prompt_ids:
        return []
    limits = list(limits or [settings.max_new_tokens] * len(prompt_ids))
    if settings.num_beams > 1 and on_text is not None:
        raise TunelabError("generation.num_beams: beam search cannot stream; use num_beams=1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise TunelabError("the tokenizer has neither a pad nor an eos token")
    if max(len(ids) for ids in prompt_ids) == 0:
        raise TunelabError("generation: empty prompt (no tokens)")
    eos = eos_token_ids(model, tokenizer)
    stops = tuple(settings.stop) + template_stops(tokenizer)
    rows = _Rows(tokenizer, [len(ids) for ids in prompt_ids], limits, stops, eos, on_text, on_done, cancel)
    max_rows = max_rows or len(prompt_ids)
    if is_llamacpp(model):  # a GGUF in llama.cpp (--quantize): its own decoding, our bookkeeping
        ends = model.decode(prompt_ids, rows.push, limits, settings, max_rows)
        return [rows.finish(row, "stop" if end == "eog" else "length") for row, end in enumerate(ends)]
    model.eval()
    with torch.inference_mode():
        if images is None and fast_greedy and settings.greedy and settings.num_beams == 1 \
                and not settings.no_repeat_ngram_size and fast_greedy_applies(model, settings.repetition_penalty):
            greedy_decode(model, prompt_ids, rows.push, max_new_tokens=max(limits), pad_id=pad_id,
                          eos_ids=eos, min_new_tokens=settings.min_new_tokens, max_rows=max_rows)
        else:
            for start in range(0, len(prompt_ids), max_rows):
                members = range(start, min(start + max_rows, len(prompt_ids)))
                _transformers_generate(model, prompt_ids, rows, list(members), settings, pad_id, eos, images)
    # Rows still open here ran into their token limit.
    return [rows.finish(row, "length") for row in range(len(prompt_ids))]


def _transformers_generate(model, prompt_ids, rows: _Rows, members: list[int], settings: GenerationSettings,
                           pad_id: int, eos: set[int], images: Sequence[Any] | None = None) -> None:
    """One ``model.generate`` call for the ``members`` rows; ``rows`` sees every token.

    With ``images`` the model generates from embeddings, so its output holds new tokens only."""
    import torch

    batch = [prompt_ids[row] for row in members]
    width = max(len(ids) for ids in batch)
    # Left padding: every row's last prompt token sits at the same position, where decoding starts.
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in batch])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
    device = getattr(model, "device", torch.device("cpu"))
    kwargs = generation_kwargs(settings, max(rows.limits[row] for row in members), pad_id, eos)
    kwargs.update(image_inputs(model, images, members))
    if settings.num_beams == 1:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([rows.criterion(members)])
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    output = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    if settings.num_beams > 1:  # no per-step hook in beam search: replay the winners
        start = 0 if images is not None else width
        for local, row in enumerate(members):
            for token in output[local, start:].tolist():
                rows.push(row, token)


# ---------------------------------------------------------------- many prompts


def generate(
    model,
    tokenizer,
    prompts: Sequence[Any],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    fast_greedy: bool = True,
) -> list[GenerationResult]:
    """Answers for ``prompts`` (chat message lists or raw strings), in input order.

    Prompts are sorted by length (longest first) and generated ``batch_size`` at a time,
    so each batch pads little; a progress bar counts prompts. ``fast_greedy=False``
    decodes greedy batches with transformers' ``generate`` instead of tunelab's loop
    (same tokens, slower; for comparisons).
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    if batch_size < 1:
        raise TunelabError(f"generation: batch_size {batch_size} must be >= 1")
    if prompts and isinstance(prompts[0], dict):
        raise TunelabError("generate: prompts is one conversation; pass a list of prompts ([messages])")
    encoded, images = encode_prompts(model, tokenizer, prompts)
    for index, ids in enumerate(encoded):
        check_context(model, len(ids), settings.max_new_tokens, where=f"prompt {index}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(encoded)
    with tqdm(total=len(encoded), desc="generating", unit="prompt", disable=not progress) as bar:
        answers = generate_ids(model, tokenizer, [encoded[i] for i in order], settings, max_rows=batch_size,
                               on_done=lambda _row, _result: bar.update(1), fast_greedy=fast_greedy,
                               images=None if images is None else [images[i] for i in order])
    for index, answer in zip(order, answers):
        results[index] = answer
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------- streaming


class TextStream:
    """Iterator over text pieces of one answer, generated in a background thread.

    ``cancel()`` (or leaving the loop early) stops generation at the next token;
    ``result`` holds the ``GenerationResult`` once the iterator is exhausted.
    """

    _DONE = object()

    def __init__(self, model, tokenizer, prompt_ids: list[int], settings: GenerationSettings,
                 cancel: threading.Event | None = None):
        self.cancel_event = cancel or threading.Event()
        self.result: GenerationResult | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(model, tokenizer, prompt_ids, settings), daemon=True, name="tunelab-stream"
        )
        self._thread.start()

    def _run(self, model, tokenizer, prompt_ids, settings) -> None:
        try:
            (self.result,) = generate_ids(
                model, tokenizer, [prompt_ids], settings,
                on_text=lambda _row, piece: self._queue.put(piece), cancel=[self.cancel_event],
            )
            self._queue.put(self._DONE)
        except BaseException as exc:  # handed to the reading thread, which re-raises it
            self._queue.put(exc)

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                try:
                    # A timeout keeps the wait interruptible (Ctrl-C in the chat loop).
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is self._DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self.result is None:
                self.cancel()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def stream(model, tokenizer, messages: Any, settings: GenerationSettings | None = None,
           cancel: threading.Event | None = None) -> TextStream:
    """Stream the answer to ``messages`` (or a raw string) piece by piece.

    Iterate the returned ``TextStream`` for text; set ``cancel`` (or call
    ``.cancel()``) to stop early. Stop strings are applied before pieces are yielded.
    """
    settings = settings or GenerationSettings()
    if settings.num_beams > 1:
        raise TunelabError("generation.num_beams: beam search cannot stream; use num_beams=1")
    prompt_ids = render_prompt(tokenizer, messages)
    check_context(model, len(prompt_ids), settings.max_new_tokens)
    return TextStream(model, tokenizer, prompt_ids, settings, cancel)
