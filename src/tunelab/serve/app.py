"""The OpenAI-compatible HTTP API (FastAPI) in front of the batching engine.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /health``. Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError
from tunelab.generation import GenerationResult, GenerationSettings, context_length, render_prompt
from tunelab.serve.engine import Engine, Job, QueueFull, ShuttingDown
from tunelab.serve.models import ServedModels
from tunelab.serve.schemas import APIError, ChatRequest, CompletionRequest, chat_messages, check_unsupported

# Request field for each GenerationSettings field, so validation errors name what the client sent.
_PARAM = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


class _State:
    def __init__(self, served: ServedModels, defaults: GenerationSettings, api_key: str | None, engine: Engine):
        self.served, self.defaults, self.api_key, self.engine = served, defaults, api_key, engine
        # The worker thread decodes with the engine's tokenizer while handlers encode;
        # a Rust tokenizer used from two threads at once can fail with "Already borrowed".
        self.tokenizer = copy.deepcopy(served.tokenizer)
        self.context = context_length(served.model)


def create_app(
    served: ServedModels,
    defaults: GenerationSettings | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
) -> FastAPI:
    """The app serving ``served``; the engine starts and stops with the app's lifespan."""
    engine = Engine(served.model, served.tokenizer, max_queue=max_queue, max_batch=max_batch)
    state = _State(served, defaults or GenerationSettings(), api_key, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="tunelab", lifespan=lifespan)
    app.state.tunelab = state
    _add_error_handlers(app)
    auth = Depends(_auth_checker(api_key))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(served.ids), "queued": engine.queued,
                "batches": engine.batches_run, "largest_batch": engine.largest_batch}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state, model_id) for model_id in served.ids]}

    @app.get("/v1/models/{model_id:path}", dependencies=[auth])
    async def model(model_id: str) -> dict[str, Any]:
        _adapter(state, model_id)
        return _model_card(state, model_id)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: ChatRequest, request: Request):
        check_unsupported(body)
        adapter = _adapter(state, body.model)
        prompt, images = _chat_prompt(state, body)
        settings = _settings(state, body, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        job = _submit(state, prompt, settings, adapter, images)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(job, body.model, include_usage))
        result = await _wait(job, request)
        return _chat_response(body.model, result)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request):
        check_unsupported(body)
        adapter = _adapter(state, body.model)
        prompts = _completion_prompts(state, body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        jobs = []
        try:
            for prompt in prompts:
                settings = _settings(state, body, len(prompt), body.max_tokens, "prompt")
                jobs.append(_submit(state, prompt, settings, adapter))
        except APIError:
            for job in jobs:
                job.cancel.set()
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_completion_chunks(jobs[0], body.model, include_usage))
        results = [await _wait(job, request) for job in jobs]
        return _completion_response(body.model, results)

    return app


# ---------------------------------------------------------------- errors and auth


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


def _validation_error(errors: list[dict[str, Any]]) -> APIError:
    first = errors[0] if errors else {"msg": "invalid request body", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return APIError(400, message, param=param)


def _auth_checker(api_key: str | None):
    async def check(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    return check


# ---------------------------------------------------------------- request -> job


def _adapter(state: _State, model_id: str) -> str | None:
    try:
        return state.served.adapter_for(model_id)
    except KeyError:
        served = ", ".join(state.served.ids)
        raise APIError(404, f"model '{model_id}' is not served here (served: {served})",
                       param="model", code="model_not_found") from None


def _encode(state: _State, prompt: Any, param: str) -> list[int]:
    try:
        ids = render_prompt(state.tokenizer, prompt)
    except TunelabError as exc:
        raise APIError(400, str(exc), param=param) from None
    if not ids:
        raise APIError(400, f"{param}: the prompt is empty", param=param)
    return ids


def _chat_prompt(state: _State, body: ChatRequest) -> tuple[list[int], list | None]:
    """Prompt ids, and the image spans when a vision-language model is served (``serve.images``)."""
    if hasattr(state.served.model, "encode_prompt"):
        from tunelab.serve.images import vision_prompt

        return vision_prompt(state.served.model, state.tokenizer, body)
    return _encode(state, chat_messages(body), "messages"), None


def _completion_prompts(state: _State, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [_encode(state, prompt, "prompt")]
    elif prompt and all(isinstance(p, int) for p in prompt):  # one prompt given as token ids
        prompts = [_check_ids(state, prompt)]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    else:
        prompts = [_encode(state, p, "prompt") if isinstance(p, str) else _check_ids(state, p) for p in prompt]
    _refuse_image_tokens(state, prompts)
    return prompts


def _refuse_image_tokens(state: _State, prompts: list[list[int]]) -> None:
    # Text completions carry no image, so a placeholder here would only fail later inside the
    # batch (a 503 for what is the client's mistake).
    image_id = getattr(state.served.model, "image_token_id", None)
    if image_id is None or not any(image_id in ids for ids in prompts):
        return
    token = state.served.model.vision_cfg.image_token
    raise APIError(400, f"prompt: holds the image placeholder {token}, but /v1/completions takes text only; "
                        "send images to /v1/chat/completions as image_url content parts (data: URLs)",
                   param="prompt")


def _check_ids(state: _State, ids: list[int]) -> list[int]:
    vocab = len(state.tokenizer)
    if not ids or any(i < 0 or i >= vocab for i in ids):
        raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    return list(ids)


def _settings(state: _State, body: Any, prompt_len: int, max_tokens: int | None, param: str) -> GenerationSettings:
    context = state.context
    if max_tokens is not None:
        if context is not None and max_tokens > context:
            raise APIError(400, f"max_tokens {max_tokens} is larger than the model's context of {context} tokens",
                           param="max_tokens", code="invalid_value")
        if context is not None and prompt_len + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens, but {prompt_len} prompt tokens + "
                           f"max_tokens {max_tokens} were requested", param=param, code="context_length_exceeded")
    else:
        room = state.defaults.max_new_tokens if context is None else context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context}",
                           param=param, code="context_length_exceeded")
        max_tokens = min(state.defaults.max_new_tokens, room)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    fields = {"max_new_tokens": max_tokens, "min_new_tokens": body.min_tokens, "temperature": body.temperature,
              "top_p": body.top_p, "top_k": body.top_k, "repetition_penalty": body.repetition_penalty,
              "stop": tuple(stop) if stop is not None else None, "seed": body.seed,
              "no_repeat_ngram_size": body.no_repeat_ngram_size}
    try:
        return state.defaults.replace(**{k: v for k, v in fields.items() if v is not None})
    except TunelabError as exc:
        name = str(exc).split(":", 1)[0].removeprefix("generation.")
        raise APIError(400, str(exc).replace("generation.", ""), param=_PARAM.get(name, name)) from None


def _submit(state: _State, prompt: list[int], settings: GenerationSettings, adapter: str | None,
            images: list | None = None) -> Job:
    job = Job(prompt, settings, adapter, asyncio.get_running_loop(), images=images)
    try:
        state.engine.submit(job)
    except QueueFull:
        raise APIError(503, "the server is busy (queue full); retry later", "server_error",
                       code="queue_full") from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None
    return job


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's events until it is done; cancels generation if the consumer goes away."""
    try:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        job.cancel.set()  # no effect once done; stops the row if the client left mid-answer


async def _wait(job: Job, request: Request) -> GenerationResult:
    """The finished result; a client that disconnects meanwhile cancels the job."""
    getter = asyncio.ensure_future(job.events.get())
    checked = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            # Text events arrive every token, so look at the clock, not only at timeouts.
            if time.monotonic() - checked >= 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            if not done:
                continue
            kind, value = getter.result()
            if kind == "done":
                return value
            if kind == "error":
                raise APIError(503, value, "server_error")
            getter = asyncio.ensure_future(job.events.get())
    finally:
        getter.cancel()
        job.cancel.set()


# ---------------------------------------------------------------- responses


def _model_card(state: _State, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": state.served.created.get(model_id, 0), "owned_by": "tunelab"}


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_response(model: str, result: GenerationResult) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": _usage([result]),
    }


def _completion_response(model: str, results: list[GenerationResult]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                    for i, r in enumerate(results)],
        "usage": _usage(results),
    }


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_chunks(job: Job, model: str, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in _events(job):
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "done":
            yield chunk({}, value.finish_reason)
            if include_usage:
                yield {**head, "choices": [], "usage": _usage([value])}
        else:
            yield APIError(503, value, "server_error").body()


async def _completion_chunks(job: Job, model: str, include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model}

    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    async for kind, value in _events(job):
        if kind == "text":
            yield chunk(value)
        elif kind == "done":
            yield chunk("", value.finish_reason)
            if include_usage:
                yield {**head, "choices": [], "usage": _usage([value])}
        else:
            yield APIError(503, value, "server_error").body()
