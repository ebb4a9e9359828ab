"""Server behaviour under load and failure: full queue, disconnects, shutdown, the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import LiveServer

from tunelab.errors import TunelabError
from tunelab.generation import GenerationSettings
from tunelab.serve.engine import Engine, Job, QueueFull, ShuttingDown

LONG = {"model": "tiny", "prompt": "Hello", "max_tokens": 480, "min_tokens": 480}


def _wait_for(condition, seconds=60.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def small_server(tiny_llama, tiny_tokenizer):
    import torch

    from tunelab.serve.app import create_app
    from tunelab.serve.models import attach_adapters

    # One compute thread: on a busy 2-core machine, spinning OpenMP workers can starve the
    # HTTP thread for seconds, and these tests poll the queue while a request runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # A long request must outlast the client's patience whatever the decoding speed:
    # 5 ms per forward makes LONG take >= 2.4 s, however fast the greedy loop gets.
    slow = tiny_llama.register_forward_pre_hook(lambda module, args: time.sleep(0.005))
    served = attach_adapters(tiny_llama, tiny_tokenizer, "tiny", [])
    server = LiveServer(create_app(served, GenerationSettings(max_new_tokens=8), max_queue=1, max_batch=1))
    yield server
    server.close()
    slow.remove()
    torch.set_num_threads(threads)


def test_full_queue_is_503(small_server):
    # max_queue=1, max_batch=1: of six simultaneous long requests one runs, one waits, the rest are refused.
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: httpx.post(small_server.url + "/v1/completions", json=LONG, timeout=120),
                                  range(6)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 3 and set(codes) <= {200, 503}
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "queue_full"
        else:
            assert response.json()["usage"]["completion_tokens"] == 480


def test_streaming_client_disconnect_cancels(small_server):
    with httpx.stream("POST", small_server.url + "/v1/completions", json={**LONG, "stream": True},
                      timeout=60) as response:
        next(response.iter_lines())  # generating now; leaving the block hangs up mid-answer
    _wait_for(lambda: small_server.engine.cancelled == 1)


def test_non_streaming_client_disconnect_cancels(small_server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.url + "/v1/completions", json=LONG,
                   timeout=httpx.Timeout(60, read=0.5))
    _wait_for(lambda: small_server.engine.cancelled == 1)


def test_engine_refuses_work_when_full_or_stopping(tiny_llama, tiny_tokenizer):
    async def scenario():
        engine = Engine(tiny_llama, tiny_tokenizer, max_queue=1)  # not started: jobs stay queued
        loop = asyncio.get_running_loop()
        first = Job([1, 2, 3], GenerationSettings(max_new_tokens=2), None, loop)
        engine.submit(first)
        with pytest.raises(QueueFull):
            engine.submit(Job([1, 2], GenerationSettings(), None, loop))
        engine.stop()
        with pytest.raises(ShuttingDown):
            engine.submit(Job([1, 2], GenerationSettings(), None, loop))
        return await asyncio.wait_for(first.events.get(), 5)

    assert asyncio.run(scenario()) == ("error", "the server is shutting down")


def test_engine_batches_compatible_jobs_only(tiny_llama, tiny_tokenizer):
    async def scenario():
        engine = Engine(tiny_llama, tiny_tokenizer, max_batch=8)
        loop = asyncio.get_running_loop()
        greedy = [Job([5, 6, 7][: i + 1], GenerationSettings(max_new_tokens=2 + i), None, loop) for i in range(3)]
        sampled = Job([5, 6], GenerationSettings(max_new_tokens=3, temperature=0.8, seed=1), None, loop)
        for job in [greedy[0], sampled, *greedy[1:]]:
            engine.submit(job)
        engine.start()
        try:
            results = [await asyncio.wait_for(_final(job), 30) for job in [*greedy, sampled]]
        finally:
            engine.stop()
        return engine, results

    engine, results = asyncio.run(scenario())
    assert engine.batches_run == 2 and engine.largest_batch == 3
    assert all(r.completion_tokens <= limit for r, limit in zip(results, [2, 3, 4, 3]))


async def _final(job: Job):
    while True:
        kind, value = await job.events.get()
        if kind != "text":
            return value


def test_adapter_that_is_not_a_run_is_a_user_error(tiny_llama, tiny_tokenizer, tmp_path):
    from tunelab.serve.models import attach_adapters

    with pytest.raises(TunelabError, match="no adapter_config.json"):
        attach_adapters(tiny_llama, tiny_tokenizer, "tiny", [str(tmp_path)])


def test_cli_serves_a_folder_and_shuts_down_on_ctrl_c(tiny_llama, tiny_tokenizer, tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), TUNELAB_API_KEY="from-env")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", str(folder), "--port", str(port), "--max-new-tokens", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _wait_for(lambda: _healthy(port) or proc.poll() is not None, 90)
        assert proc.poll() is None, proc.communicate()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == [str(folder)]
        reply = client.chat.completions.create(model=str(folder), messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_beam_search_is_refused_before_loading_anything():
    from tunelab.generation import from_preset
    from tunelab.serve.cli import run_server

    with pytest.raises(TunelabError, match="beam search"):
        run_server("does-not-matter", settings=from_preset("beam"))


def test_a_lora_run_folder_serves_its_base_and_itself(tiny_llama, tiny_tokenizer, tmp_path):
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.config import RunConfig, save_config
    from tunelab.generation import generate
    from tunelab.serve.models import load_for_serving

    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    run = tmp_path / "runs" / "doctor"
    torch.manual_seed(3)
    tuned = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False))
    tuned.save_pretrained(run)
    tiny_tokenizer.save_pretrained(run)
    cfg = RunConfig()
    cfg.model.name = str(base)
    save_config(cfg, run / "config.yaml")

    served = load_for_serving(str(run), [f"again={run}"])
    assert served.ids == {str(base): None, "doctor": "default", "again": "adapter_1"}
    prompt = [[{"role": "user", "content": "Hello"}]]
    settings = GenerationSettings(max_new_tokens=6)
    expected = generate(tuned.eval(), tiny_tokenizer, prompt, settings, progress=False)[0].text
    assert generate(served.model, served.tokenizer, prompt, settings, progress=False)[0].text == expected
    with served.model.disable_adapter():
        plain = generate(served.model, served.tokenizer, prompt, settings, progress=False)[0].text
    assert plain == generate(tiny_llama, tiny_tokenizer, prompt, settings, progress=False)[0].text
