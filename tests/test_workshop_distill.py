"""Distillation against a real local HTTP server speaking the OpenAI chat API."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.workshop.distill import distill, load_distill_config, make_config

SRC = str(Path(__file__).resolve().parents[1] / "src")


class StyleServer:
    """Answers "[grumpy] <question>"; fails the first ``fail_first`` attempts of chosen questions."""

    def __init__(self, delay: float = 0.0, fail_first: dict[str, int] | None = None, status: int = 500) -> None:
        self.delay, self.fail_first, self.status = delay, dict(fail_first or {}), status
        self.requests: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with server.lock:
                    server.requests[question] += 1
                    attempt = server.requests[question]
                time.sleep(server.delay)
                if attempt <= server.fail_first.get(question, 0):
                    self._send(server.status, {"error": {"message": "try again", "type": "server_error"}})
                    return
                style = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
                if "silence" in question:
                    style, question = "", ""
                self._send(200, {
                    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "tiny-styler",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant",
                                             "content": f"[{style}] {question}" if question else " "}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload):
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def total(self) -> int:
        return sum(self.requests.values())


QUESTIONS = [f"问题{i}: what is {i} plus {i}?" for i in range(30)]


def _config(tmp_path: Path, url: str, **extra) -> Path:
    (tmp_path / "questions.jsonl").write_text(
        "".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    data = {"base_url": url, "model": "tiny-styler", "instruction": "grumpy", "questions": "questions.jsonl",
            "output": "out/grumpy.jsonl", "concurrency": 3, "backoff": 0.01, "api_key_env": "TUNELAB_TEST_KEY",
            **extra}
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_distill_writes_records_with_provenance_and_retries_failures(tmp_path):
    flaky = {QUESTIONS[3]: 2, QUESTIONS[7]: 1}
    with StyleServer(fail_first=flaky) as server:
        report = distill(_config(tmp_path, server.url))
    assert report.requested == 30 and report.retries == 3 and not report.failed
    assert server.total == 33 and server.requests[QUESTIONS[3]] == 3
    rows = _rows(tmp_path / "out/grumpy.jsonl")
    assert [r["instruction"] for r in rows] == QUESTIONS  # question order, not completion order
    assert rows[5]["output"] == f"[grumpy] {QUESTIONS[5]}" and rows[5]["input"] == ""
    assert rows[5]["distill"]["model"] == "tiny-styler" and rows[5]["distill"]["prompt"] == "grumpy"
    assert "system" not in rows[5]


def test_limit_then_resume_never_repeats_finished_requests(tmp_path):
    config = _config(tmp_path, "")
    with StyleServer() as server:
        config = _config(tmp_path, server.url)
        first = distill(load_distill_config(config, limit=12))
        assert (first.requested, first.skipped_by_limit, server.total) == (12, 18, 12)
        (tmp_path / "out/grumpy.jsonl.cache").rename(tmp_path / "no-cache")  # resume must not rely on the cache
        second = distill(config)
    assert (second.done_before, second.requested, second.cached) == (12, 18, 0)
    assert server.total == 30 and max(server.requests.values()) == 1
    assert [r["instruction"] for r in _rows(tmp_path / "out/grumpy.jsonl")] == QUESTIONS


def test_killed_process_resumes_without_repeating(tmp_path):
    with StyleServer(delay=0.05) as server:
        config = _config(tmp_path, server.url, concurrency=2)
        script = f"import sys; sys.path.insert(0, {SRC!r}); from tunelab.workshop.distill import distill; distill({str(config)!r})"
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 60
        while server.total < 10 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.kill()
        proc.wait()
        output = tmp_path / "out/grumpy.jsonl"
        finished = set()
        for line in output.read_text(encoding="utf-8").splitlines():
            try:
                finished.add(json.loads(line)["instruction"])
            except json.JSONDecodeError:  # killed mid-write: that request counts as unfinished
                pass
        assert 0 < len(finished) < 30
        before = Counter(server.requests)
        report = distill(config)
    asked_again = {q for q in server.requests if server.requests[q] > before[q]}
    assert not asked_again & finished
    assert report.done_before == len(finished)
    assert report.done_before + report.cached + report.requested == 30
    assert sorted(r["instruction"] for r in _rows(output)) == sorted(QUESTIONS)


def test_cache_serves_a_new_output_without_requests(tmp_path):
    with StyleServer() as server:
        config = _config(tmp_path, server.url, cache_dir="cache")
        distill(config)
        again = distill(load_distill_config(config, output="out/copy.jsonl"))
    assert server.total == 30 and again.cached == 30 and again.requested == 0
    assert _rows(tmp_path / "out/copy.jsonl") == _rows(tmp_path / "out/grumpy.jsonl")


def test_permanent_failures_are_reported_not_written(tmp_path):
    with StyleServer(fail_first={QUESTIONS[0]: 99}, status=503) as server:
        report = distill(_config(tmp_path, server.url, max_retries=2))
    assert len(report.failed) == 1 and report.failed[0].startswith("question 1:")
    assert server.requests[QUESTIONS[0]] == 3 and report.requested == 29
    with StyleServer(fail_first={QUESTIONS[0]: 99}, status=400) as server:  # a client error: no retry
        (tmp_path / "out/grumpy.jsonl").unlink()
        (tmp_path / "out/grumpy.jsonl.cache").rename(tmp_path / "old-cache")
        report = distill(_config(tmp_path, server.url, max_retries=2))
    assert server.requests[QUESTIONS[0]] == 1 and len(report.failed) == 1


def test_rate_limit_spaces_requests(tmp_path):
    with StyleServer() as server:
        start = time.monotonic()
        distill(load_distill_config(_config(tmp_path, server.url), rate_limit=50.0, concurrency=4))
        elapsed = time.monotonic() - start
    assert server.total == 30 and elapsed >= 29 / 50 * 0.95


def test_config_errors(tmp_path):
    with pytest.raises(TunelabError, match="unknown key 'modle'"):
        make_config({"base_url": "x", "modle": "m", "questions": [], "output": "o"})
    with pytest.raises(TunelabError, match="model: missing"):
        make_config({"base_url": "x", "questions": [], "output": "o"})
    (tmp_path / "q.csv").write_text("text\nhello\n", encoding="utf-8")
    config = make_config({"base_url": "http://127.0.0.1:9/v1", "model": "m", "questions": "q.csv", "output": "o.jsonl"},
                         tmp_path)
    with pytest.raises(TunelabError, match=r"q\.csv:2: column 'question': missing \(columns: text\)"):
        distill(config)


def test_cli_distill(tmp_path, capsys):
    from tunelab.cli import main

    with StyleServer() as server:
        config = _config(tmp_path, server.url, instruction="请使用广东话风格来回答", keep_instruction=True)
        assert main(["data", "distill", str(config), "--limit", "5"]) == 0
        assert main(["data", "distill", str(config)]) == 0
    out = capsys.readouterr().out
    assert "already done (resumed)" in out and server.total == 30
    rows = _rows(tmp_path / "out/grumpy.jsonl")
    assert rows[0]["system"] == "请使用广东话风格来回答" and rows[0]["output"].startswith("[请使用广东话风格来回答] ")


def test_empty_answers_are_failures_not_data(tmp_path):
    with StyleServer() as server:
        config = make_config({"base_url": server.url, "model": "m", "questions": ["hello", "silence please"],
                              "output": "o.jsonl"}, tmp_path)
        report = distill(config)
    assert report.requested == 1 and report.failed == ["question 2: empty answer from tiny-styler"]
    assert [r["instruction"] for r in _rows(tmp_path / "o.jsonl")] == ["hello"]
