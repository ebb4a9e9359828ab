"""Distillation / style transfer through any OpenAI-compatible chat endpoint.

Seed 002 sends a style prompt ("answer in Cantonese slang", "grumpy", "salesman")
plus each question to DeepSeek-V3 and keeps the answers as training data; seed 003
calls this 大模型蒸馏. ``distill(config)`` does it with:

- concurrency (threads), a rate limit (requests per second), retries with
  exponential backoff and jitter on connection errors, timeouts, 429 and 5xx;
- a cache keyed by the SHA-256 of the request (model, messages, settings), so the
  same request is never paid for twice, even from another config;
- resume: every finished answer is appended (and flushed) to the output file at
  once; a rerun skips requests already there, so an interrupted job loses at most
  the requests in flight.

Each output row is an alpaca record (``instruction`` = question, ``output`` =
answer) with provenance under ``distill`` (endpoint, model, style prompt, request id).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from tunelab.errors import TunelabError
from tunelab.io import append_jsonl, write_json, write_jsonl


@dataclass
class DistillConfig:
    """One distillation job (a YAML file; relative paths are relative to it)."""

    base_url: str
    """OpenAI-compatible endpoint, e.g. ``https://api.deepseek.com/v1`` or ``http://localhost:8000/v1``."""
    model: str
    """Model name sent with each request."""
    questions: str | list[str]
    """A data file (json/jsonl/csv/xlsx/parquet) or an inline list of questions."""
    output: str
    """JSONL file of finished records; appended as answers arrive, so a rerun resumes."""
    instruction: str = ""
    """Style/task prompt (seed 002's "请使用广东话风格来回答...")."""
    instruction_role: str = "system"
    """Send ``instruction`` as the ``system`` message, or ``prefix`` it to each question."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding the key (never the key itself in a file)."""
    question_column: str = "question"
    """Column of the question in a data file (``instruction`` is tried when absent)."""
    image_column: str = "image"
    """Column with an image path (relative to the questions file) sent with each question to a
    vision endpoint (seed 002), as a ``data:`` URL in an ``image_url`` part; the record keeps the
    image (``images``, an ``<image>`` placeholder in ``instruction``). Rows without one are text-only."""
    keep_instruction: bool = False
    """Also store the style prompt as the record's ``system`` (off: learn the style unprompted)."""
    temperature: float = 0.7
    max_tokens: int = 512
    concurrency: int = 4
    rate_limit: float = 0.0
    """Most requests started per second (0: no limit)."""
    max_retries: int = 5
    backoff: float = 1.0
    """First retry delay in seconds; doubles each retry (with jitter)."""
    timeout: float = 120.0
    cache_dir: str | None = None
    """Request cache folder (default: ``<output>.cache`` beside the output)."""
    limit: int | None = None
    """Send at most this many new requests in this run (a budget; rerun to continue)."""
    base_dir: Path = field(default_factory=Path.cwd, repr=False)

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass
class DistillReport:
    total: int = 0
    done_before: int = 0
    cached: int = 0
    requested: int = 0
    retries: int = 0
    failed: list[str] = field(default_factory=list)
    skipped_by_limit: int = 0
    output: Path | None = None


def load_distill_config(path: str | Path, **overrides: Any) -> DistillConfig:
    """Read a distillation YAML; ``overrides`` replace keys (e.g. from the command line)."""
    from tunelab.config import read_yaml

    path = Path(path)
    data = read_yaml(path)  # one-line errors for a missing file or bad YAML, with its line
    data.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(data, path.resolve().parent, str(path))


def make_config(data: dict[str, Any], base_dir: Path | None = None, label: str = "distill") -> DistillConfig:
    known = [f for f in DistillConfig.__dataclass_fields__ if f != "base_dir"]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TunelabError(f"{label}: unknown key '{unknown[0]}' (known: {', '.join(known)})")
    missing = [k for k in ("base_url", "model", "questions", "output") if k not in data]
    if missing:
        raise TunelabError(f"{label}: {missing[0]}: missing")
    config = DistillConfig(**data, base_dir=base_dir or Path.cwd())
    if config.instruction_role not in ("system", "prefix"):
        raise TunelabError(f"{label}: instruction_role: must be 'system' or 'prefix'")
    if config.concurrency < 1 or config.max_retries < 0 or config.rate_limit < 0:
        raise TunelabError(f"{label}: need concurrency >= 1, max_retries >= 0, rate_limit >= 0")
    return config


def load_questions(config: DistillConfig) -> list[str]:
    return [question for question, _ in load_items(config)]


def load_items(config: DistillConfig) -> list[tuple[str, Path | None]]:
    """``(question, image file or None)`` per question; a named image that is missing is an error."""
    if isinstance(config.questions, list):
        return [(str(q), None) for q in config.questions]
    from tunelab.data.readers import iter_rows

    path = config.resolve(config.questions)
    items = []
    for number, row in iter_rows(path):
        column = config.question_column if config.question_column in row else "instruction"
        if column not in row:
            raise TunelabError(f"{path}:{number}: column {config.question_column!r}: missing "
                               f"(columns: {', '.join(map(str, row))})")
        text = str(row[column]).strip()
        image = str(row.get(config.image_column) or "").strip() or None
        if image is not None:
            image_path = Path(image).expanduser()
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            if not image_path.is_file():
                raise TunelabError(f"{path}:{number}: {config.image_column}: {image}: not found")
            image = image_path
        if text:
            items.append((text, image))
    return items


def _image_part(image: Path) -> dict[str, Any]:
    import base64
    import mimetypes

    kind = mimetypes.guess_type(image.name)[0] or "image/png"
    url = f"data:{kind};base64," + base64.b64encode(image.read_bytes()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def build_messages(config: DistillConfig, question: str, image: Path | None = None) -> list[dict[str, Any]]:
    text = f"{config.instruction}\n{question}" if config.instruction and config.instruction_role == "prefix" else question
    user: dict[str, Any] = {"role": "user", "content": text}
    if image is not None:
        user["content"] = [_image_part(image), {"type": "text", "text": text}]
    if config.instruction and config.instruction_role == "system":
        return [{"role": "system", "content": config.instruction}, user]
    return [user]


def request_key(config: DistillConfig, messages: list[dict]) -> str:
    """SHA-256 of everything that changes the answer (not the endpoint URL: a mirror is the same model)."""
    payload = {"model": config.model, "messages": messages, "temperature": config.temperature,
               "max_tokens": config.max_tokens}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def finished_ids(output: Path) -> set[str]:
    """Request ids already in the output; a torn last line (killed mid-write) is ignored."""
    done = set()
    if output.is_file():
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["distill"]["request_id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


class RateLimiter:
    """Spaces request starts at least ``1/rate`` seconds apart, across threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.lock = threading.Lock()
        self.next_time = 0.0

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_time)
            self.next_time = start + self.interval
        time.sleep(max(0.0, start - now))


class Cache:
    """One JSON file per request key under ``root/ab/abcdef....json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    def put(self, key: str, value: dict) -> None:
        write_json(self._path(key), value)


def _client(config: DistillConfig):
    from openai import OpenAI

    key = os.environ.get(config.api_key_env or "", "") if config.api_key_env else ""
    # max_retries=0: retries are ours, so backoff and counting are in one place.
    return OpenAI(base_url=config.base_url, api_key=key or "not-needed", max_retries=0, timeout=config.timeout)


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def call(client: Any, config: DistillConfig, messages: list[dict], limiter: RateLimiter,
         report: DistillReport, lock: threading.Lock) -> dict:
    """One chat completion with retries; returns ``{"answer", "model"}``."""
    for attempt in range(config.max_retries + 1):
        limiter.wait()
        try:
            response = client.chat.completions.create(model=config.model, messages=messages,
                                                      temperature=config.temperature, max_tokens=config.max_tokens)
            answer = (response.choices[0].message.content or "").strip() if response.choices else ""
            return {"answer": answer, "model": response.model or config.model}
        except Exception as exc:  # openai raises a family of types; _retryable sorts them
            if attempt == config.max_retries or not _retryable(exc):
                raise
            with lock:
                report.retries += 1
            time.sleep(config.backoff * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _record(config: DistillConfig, question: str, key: str, index: int, result: dict,
            image: Path | None = None) -> dict:
    record: dict[str, Any] = {"instruction": question, "input": "", "output": result["answer"]}
    if image is not None:  # training data for a vision run: the image where the question shows it
        output = config.resolve(config.output)
        record["instruction"] = "<image>" + question
        record["images"] = [os.path.relpath(image.resolve(), output.resolve().parent)]
    if config.keep_instruction and config.instruction:
        record["system"] = config.instruction
    record["distill"] = {"endpoint": config.base_url, "model": result["model"], "prompt": config.instruction,
                         "request_id": key, "index": index}
    return record


def distill(config: DistillConfig | str | Path, progress: bool = False) -> DistillReport:
    """Collect answers for every question not yet in ``config.output``."""
    if not isinstance(config, DistillConfig):
        config = load_distill_config(config)
    output = config.resolve(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cache = Cache(config.resolve(config.cache_dir) if config.cache_dir else output.with_name(output.name + ".cache"))
    items = load_items(config)
    questions, images = [q for q, _ in items], [image for _, image in items]
    _reorder(output)  # also drops a torn last line, so appends start on a fresh line
    done = finished_ids(output)
    report = DistillReport(total=len(questions), output=output)
    todo = []
    for index, question in enumerate(questions):
        messages = build_messages(config, question, images[index])
        key = request_key(config, messages)
        if key in done:
            report.done_before += 1
            continue
        done.add(key)  # a question listed twice is asked once
        todo.append((index, question, messages, key))
    lock = threading.Lock()
    pending = []
    for index, question, messages, key in todo:
        hit = cache.get(key)
        if hit is not None:
            append_jsonl(output, _record(config, question, key, index, hit, images[index]))
            report.cached += 1
        else:
            pending.append((index, question, messages, key))
    if config.limit is not None and len(pending) > config.limit:
        report.skipped_by_limit = len(pending) - config.limit
        pending = pending[: config.limit]
    if pending:
        _run(config, pending, cache, output, report, lock, progress, images)
    _reorder(output)
    return report


def _run(config, pending, cache, output, report, lock, progress, images) -> None:
    client, limiter = _client(config), RateLimiter(config.rate_limit)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), desc="distill", unit="req")
    pool = ThreadPoolExecutor(max_workers=config.concurrency)
    futures = {pool.submit(call, client, config, messages, limiter, report, lock): (index, question, key)
               for index, question, messages, key in pending}
    try:
        for future in as_completed(futures):
            index, question, key = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # one failed question must not lose the others
                report.failed.append(f"question {index + 1}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            if not result["answer"]:  # an empty answer would teach the model to say nothing
                report.failed.append(f"question {index + 1}: empty answer from {result['model']}")
                continue
            cache.put(key, result)
            with lock:
                append_jsonl(output, _record(config, question, key, index, result, images[index]))
                report.requested += 1
            if bar is not None:
                bar.update(1)
    finally:
        # On Ctrl-C, drop queued requests instead of waiting for all of them;
        # finished ones are already in the output, so a rerun resumes.
        pool.shutdown(wait=False, cancel_futures=True)
    if bar is not None:
        bar.close()


def _reorder(output: Path) -> None:
    """Rewrite the output in question order (answers arrive in completion order)."""
    if not output.is_file():
        return
    rows = []
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from an interrupted run; its request will be redone
    rows.sort(key=lambda r: r.get("distill", {}).get("index", 0))
    write_jsonl(output, rows)
