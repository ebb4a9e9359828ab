"""The OpenAI-compatible server, driven over loopback with the official ``openai`` client."""

from __future__ import annotations

import copy
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tunelab.generation import GenerationSettings, generate, render_prompt

KEY = "test-key"
DEFAULTS = GenerationSettings(max_new_tokens=8)


class LiveServer:
    """uvicorn running ``app`` in a background thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.app.state.tunelab.engine

    def client(self, api_key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    """A LoRA adapter with random (non-zero) weights, so it visibly changes answers."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama),
                                LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                           init_lora_weights=False))
    folder = tmp_path_factory.mktemp("runs") / "my.lora-run"
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_model(tiny_llama, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def live(tiny_llama, tiny_tokenizer, adapter_dir):
    from tunelab.serve.app import create_app
    from tunelab.serve.models import attach_adapters

    served = attach_adapters(copy.deepcopy(tiny_llama), tiny_tokenizer, "tiny", [f"tiny-lora={adapter_dir}", str(adapter_dir)])
    server = LiveServer(create_app(served, DEFAULTS, api_key=KEY, max_queue=64, max_batch=8))
    yield server
    server.close()


def _reference(model, tokenizer, prompt, **settings):
    return generate(model, tokenizer, [prompt], DEFAULTS.replace(**settings), progress=False)[0]


def test_models_and_health(live):
    ids = [m.id for m in live.client().models.list().data]
    assert ids == ["tiny", "tiny-lora", "my.lora-run"]
    assert live.client().models.retrieve("tiny-lora").id == "tiny-lora"
    health = httpx.get(live.url + "/health").json()  # no key needed for probes
    assert health["status"] == "ok" and health["models"] == ids


def test_chat_completion_matches_the_generation_core(live, tiny_llama, tiny_tokenizer):
    messages = [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "I have a fever."}]
    reply = live.client().chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    expected = _reference(tiny_llama, tiny_tokenizer, messages, max_new_tokens=6)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(render_prompt(tiny_tokenizer, messages))
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_adapters_are_chosen_by_model_field(live, tiny_llama, lora_model, tiny_tokenizer):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    client = live.client()
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    tuned = client.chat.completions.create(model="tiny-lora", messages=messages, max_tokens=8)
    again = client.chat.completions.create(model="my.lora-run", messages=messages, max_tokens=8)
    base_after = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert base.choices[0].message.content == _reference(tiny_llama, tiny_tokenizer, messages).text
    assert tuned.choices[0].message.content == _reference(lora_model, tiny_tokenizer, messages).text
    assert tuned.choices[0].message.content != base.choices[0].message.content
    assert again.choices[0].message.content == tuned.choices[0].message.content
    assert base_after.choices[0].message.content == base.choices[0].message.content


def test_streaming_chat_sends_chunks_then_usage(live, tiny_llama, tiny_tokenizer):
    messages = [{"role": "user", "content": "孕妇感冒发烧38度应该怎么办呢?"}]
    chunks = list(live.client().chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    expected = _reference(tiny_llama, tiny_tokenizer, messages, max_new_tokens=10)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_raw_sse_ends_with_done(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completions_single_list_and_stream(live, tiny_llama, tiny_tokenizer):
    client = live.client()
    prompts = ["The capital of France is", "你好!有什么可以帮你的吗?"]
    one = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=5)
    assert one.choices[0].text == _reference(tiny_llama, tiny_tokenizer, prompts[0], max_new_tokens=5).text
    both = client.completions.create(model="tiny", prompt=prompts, max_tokens=5)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [
        _reference(tiny_llama, tiny_tokenizer, p, max_new_tokens=5).text for p in prompts]
    assert both.usage.prompt_tokens == sum(len(tiny_tokenizer(p)["input_ids"]) for p in prompts)
    streamed = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == both.choices[1].text


def test_stop_strings_over_the_api(live, tiny_llama, tiny_tokenizer):
    prompt = "Hello, how are you?"
    full = _reference(tiny_llama, tiny_tokenizer, prompt, max_new_tokens=16, min_new_tokens=16)
    stop = full.text[6:8]
    reply = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=16, stop=stop,
                                             extra_body={"min_tokens": 16})
    assert reply.choices[0].text == full.text[:full.text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_wrong_api_key_is_401(live):
    with pytest.raises(openai.AuthenticationError) as info:
        live.client(api_key="wrong").models.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert httpx.get(live.url + "/v1/models").status_code == 401


def test_unknown_model_is_404_with_openai_error(live):
    with pytest.raises(openai.NotFoundError) as info:
        live.client().chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    assert "tiny-lora" in info.value.body["message"]


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    ({"model": "tiny"}, "messages", None),
    ({"model": "tiny", "messages": []}, "messages", None),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, "max_tokens",
     "invalid_value"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 600}]}, "messages",
     "context_length_exceeded"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x.png"}}]}]}, "messages[0].content", None),
    ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 400}, "messages",
     "context_length_exceeded"),
])
def test_bad_requests_are_400_with_openai_error(live, body, param, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(live.url + "/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param and error["code"] == code


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": [3, 10 ** 6]}, "prompt"),
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"], "stream": True}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "echo": True}, "echo"),
    ({"model": "tiny", "prompt": "hi", "stop": ["ok", ""]}, "stop"),
])
def test_bad_completion_requests(live, body, param):
    response = httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_routes_and_methods_use_the_error_shape(live):
    headers = {"Authorization": f"Bearer {KEY}"}
    missing = httpx.get(live.url + "/v1/nothing", headers=headers)
    wrong_method = httpx.get(live.url + "/v1/chat/completions", headers=headers)
    assert (missing.status_code, wrong_method.status_code) == (404, 405)
    assert set(missing.json()["error"]) == set(wrong_method.json()["error"]) == {"message", "type", "param", "code"}


def test_streamed_answer_respects_stop_strings(live, tiny_llama, tiny_tokenizer):
    prompt = "The patient has a fever"
    full = _reference(tiny_llama, tiny_tokenizer, prompt, max_new_tokens=16, min_new_tokens=16)
    stop = full.text[5:7]
    chunks = list(live.client().completions.create(model="tiny", prompt=prompt, max_tokens=16, stop=[stop],
                                                   stream=True, extra_body={"min_tokens": 16}))
    assert "".join(c.choices[0].text for c in chunks) == full.text[:full.text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streams_all_complete(live, tiny_llama, tiny_tokenizer):
    questions = [f"Question {i}: the patient has a fever of {37 + i % 4} degrees" for i in range(16)]
    lengths = [4 + i % 5 for i in range(16)]  # different max_tokens still share batches
    before = live.engine.batches_run

    def ask(i):
        stream = live.client().chat.completions.create(
            model="tiny-lora" if i % 4 == 3 else "tiny", messages=[{"role": "user", "content": questions[i]}],
            max_tokens=lengths[i], stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, (text, finish) in enumerate(answers):
        assert finish in ("stop", "length")
        if i % 4 != 3:
            expected = _reference(tiny_llama, tiny_tokenizer, [{"role": "user", "content": questions[i]}],
                                  max_new_tokens=lengths[i])
            assert text == expected.text, f"request {i}"
    assert live.engine.largest_batch > 1, "concurrent requests were batched together"
    assert live.engine.batches_run - before < 16


@pytest.mark.slow
def test_builtin_model_answers_over_the_api():
    from tunelab.config import DEFAULT_MODEL
    from tunelab.serve.app import create_app
    from tunelab.serve.models import load_for_serving

    server = LiveServer(create_app(load_for_serving(DEFAULT_MODEL), GenerationSettings(max_new_tokens=24)))
    try:
        client = server.client(api_key="unused")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=question)
        assert "Paris" in reply.choices[0].message.content
        streamed = client.chat.completions.create(model=DEFAULT_MODEL, messages=question, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content
    finally:
        server.close()
