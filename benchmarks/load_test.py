"""Load test for ``tunelab serve``: N concurrent clients, requests/s, latency percentiles, tokens/s.

    # against a running server
    python benchmarks/load_test.py --url http://127.0.0.1:8000/v1 --model builtin:smollm2-135m-instruct
    # or start one in-process on the builtin model, once per --max-batch value
    python benchmarks/load_test.py --clients 8 --requests 32 --max-tokens 32 --max-batch 1 8

Each client is a thread with the official ``openai`` client that streams its answers,
so time to first token is measured too. Greedy decoding, a fixed token budget
(``min_tokens`` = ``max_tokens`` by default, so every request generates the same number
of tokens and runs compare). Prints a table and, as the last line, JSON.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILTIN, emit, ensure_src_on_path, machine_info  # noqa: E402

QUESTIONS = [
    "What should a pregnant woman with a 38 degree fever do?",
    "孕妇感冒发烧38度应该怎么办呢?",
    "Give the standard ICD-10-CM term for: Acute appendicitis NOS",
    "What are the common symptoms of influenza?",
    "高血压患者日常饮食需要注意什么?",
    "Explain what a LoRA adapter is in one sentence.",
    "How much water should an adult drink per day?",
    "糖尿病的早期症状有哪些?",
]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def one_request(client, model: str, index: int, max_tokens: int, fixed: bool) -> dict[str, Any]:
    """Stream one chat answer; returns latency, time to first token and token count."""
    start = time.perf_counter()
    first = None
    usage = None
    extra = {"min_tokens": max_tokens} if fixed else {}
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body=extra,
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start,
            "tokens": usage.completion_tokens if usage else 0}


def run_load(url: str, model: str, api_key: str, clients: int, requests: int, max_tokens: int,
             fixed: bool) -> dict[str, Any]:
    """``requests`` requests spread over ``clients`` concurrent clients; summary figures."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=600)
    one_request(client, model, 0, 2, False)  # warm-up: first-call costs are not load
    errors: list[str] = []

    def task(i: int):
        try:
            return one_request(client, model, i, max_tokens, fixed)
        except Exception as exc:  # counted and reported, the load goes on
            errors.append(f"{type(exc).__name__}: {exc}")
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for r in pool.map(task, range(requests)) if r is not None]
    wall = time.perf_counter() - start
    latencies = [r["latency"] for r in results] or [0.0]
    ttfts = [r["ttft"] for r in results] or [0.0]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "requests": requests, "ok": len(results), "errors": len(errors),
        "first_error": errors[0] if errors else None, "wall_s": round(wall, 2),
        "requests_per_s": round(len(results) / wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "completion_tokens": tokens,
        **{f"latency_p{q}_s": round(percentile(latencies, q), 3) for q in (50, 90, 99)},
        "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p90_s": round(percentile(ttfts, 90), 3),
    }


class InProcessServer:
    """``tunelab serve`` in a background thread on a free loopback port."""

    def __init__(self, spec: str, max_batch: int, max_queue: int, threads: int | None):
        import torch
        import uvicorn

        from tunelab.serve.app import create_app
        from tunelab.serve.models import load_for_serving

        if threads:
            torch.set_num_threads(threads)
        served = load_for_serving(spec)
        self.model_id = next(iter(served.ids))
        app = create_app(served, max_queue=max_queue, max_batch=max_batch)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="base URL of a running server (default: start one in-process)")
    parser.add_argument("--model", help="model id to request (default: the served base model)")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--serve", default=BUILTIN, help="model spec to serve in-process (without --url)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[8],
                        help="in-process: one run per engine batch size (e.g. 1 8)")
    parser.add_argument("--threads", type=int, help="in-process: torch threads")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--free-length", action="store_true",
                        help="let answers end at end-of-sequence (default: exactly max-tokens each)")
    args = parser.parse_args(argv)
    ensure_src_on_path()
    runs = []
    if args.url:
        runs.append({"server": args.url, **run_load(args.url, args.model or BUILTIN, args.api_key, args.clients,
                                                    args.requests, args.max_tokens, not args.free_length)})
    for max_batch in ([] if args.url else args.max_batch):
        server = InProcessServer(args.serve, max_batch, max(64, args.requests), args.threads)
        try:
            figures = run_load(server.url, args.model or server.model_id, args.api_key, args.clients,
                               args.requests, args.max_tokens, not args.free_length)
        finally:
            server.close()
        runs.append({"server": f"in-process {args.serve}", "max_batch": max_batch, **figures})
    _print_table(runs)
    emit({"benchmark": "load_test", "machine": machine_info(), "runs": runs})
    return 0


def _print_table(runs: list[dict[str, Any]]) -> None:
    columns = ["max_batch", "clients", "ok", "errors", "wall_s", "requests_per_s", "tokens_per_s",
               "latency_p50_s", "latency_p90_s", "latency_p99_s", "ttft_p50_s"]
    print(" | ".join(columns))
    for run in runs:
        print(" | ".join(str(run.get(c, "-")) for c in columns))


if __name__ == "__main__":
    raise SystemExit(main())
