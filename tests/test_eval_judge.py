"""LLM-as-judge against a real OpenAI-compatible HTTP server on loopback (not a mock object).

The server below is a deterministic stand-in judge: it answers chat completions the way
an LLM judge would, in JSON or loose text, sometimes badly, sometimes with a 500.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab.errors import TunelabError
from tunelab.eval.judge import (DIMENSIONS, JudgeClient, judge_files, judge_pairwise, judge_pointwise,
                                parse_pairwise, parse_pointwise)


def _section(text: str, name: str) -> str:
    match = re.search(rf"\[{name}\]\n(.*?)(?:\n\n|\n\[|$)", text, flags=re.DOTALL)
    return match.group(1).strip() if match else ""


def _pointwise_reply(prompt: str, reminded: bool) -> str:
    answer = _section(prompt, "Answer")
    score = min(10, 2 + len(answer.split()))
    if "GARBAGE" in answer and not reminded:
        return "Hmm, I think this answer is fine overall."
    if "LOOSE" in answer:
        return "\n".join(f"{d.capitalize()}: {score}/10 - plain text verdict" for d in DIMENSIONS)
    body = {d: {"score": score, "reason": f"{d} judged on {len(answer)} chars"} for d in DIMENSIONS}
    return "```json\n" + json.dumps(body) + "\n```"


def _pairwise_reply(prompt: str) -> str:
    if "BIASED" in _section(prompt, "Question"):
        return '{"winner": "A", "reason": "the first one"}'  # a judge with position bias
    a, b = _section(prompt, "Answer A"), _section(prompt, "Answer B")
    if ("good" in a) == ("good" in b):
        return "Both are equally good. Verdict: tie"
    return "[[A]] is better" if "good" in a else '{"winner": "B", "reason": "B is good"}'


class JudgeServer:
    """``/v1/chat/completions`` in OpenAI's format; counts requests; ``fail_first`` 500s."""

    def __init__(self):
        self.requests = 0
        self.fail_next = 0
        self.status_override: int | None = None
        self.malformed = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                if server.malformed:
                    self._send(200, {"id": "x", "object": "chat.completion", "choices": []})
                    return
                if server.status_override or server.fail_next:
                    status = server.status_override or 500
                    server.fail_next = max(0, server.fail_next - 1)
                    self._send(status, {"error": {"message": "judge overloaded", "type": "server_error"}})
                    return
                messages = body["messages"]
                prompt = messages[0]["content"]
                if "Rate the answer" in prompt:
                    reply = _pointwise_reply(prompt, reminded=len(messages) > 1)
                else:
                    reply = _pairwise_reply(prompt)
                self._send(200, {
                    "id": f"chatcmpl-{server.requests}", "object": "chat.completion", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": reply}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    srv = JudgeServer()
    yield srv
    srv.close()


QUESTIONS = ["What should I do with a fever?", [{"role": "user", "content": "感冒怎么办"}], "Say hello"]
ANSWERS = ["Drink water and rest.", "LOOSE 多喝水 注意休息", "GARBAGE hello there"]


def test_pointwise_parses_json_loose_text_and_recovers_with_a_reminder(server, tmp_path):
    client = JudgeClient(server.base_url, "judge-1", cache_path=str(tmp_path / "cache.jsonl"))
    result = judge_pointwise(client, QUESTIONS, ANSWERS, references=["Rest.", "多休息", "Hello!"])
    rows = result["rows"]
    assert rows[0]["scores"]["fluency"] == 6 and "judged on 21 chars" in rows[0]["reasons"]["fluency"]
    assert rows[1]["scores"] == dict.fromkeys(DIMENSIONS, 5) and rows[1]["reasons"]["relevance"] == "plain text verdict"
    assert rows[2]["scores"]["completeness"] == 5  # parsed from the reply to the reminder
    assert server.requests == 4  # 3 rows + 1 reminder
    summary = result["summary"]
    assert summary["judge_fluency"] == pytest.approx((6 + 5 + 5) / 3)
    assert summary["judge_overall"] == pytest.approx(16 / 3) and summary["judge_unparsed"] == 0
    assert "Rate the answer" in result["prompt_template"] and result["judge_model"] == "judge-1"

    # a re-run answers from the cache: no request at all, same result
    again = JudgeClient(server.base_url, "judge-1", cache_path=str(tmp_path / "cache.jsonl"))
    assert judge_pointwise(again, QUESTIONS, ANSWERS, references=["Rest.", "多休息", "Hello!"]) == result
    assert server.requests == 4 and again.calls == 0
    # another judge model is another request
    other = JudgeClient(server.base_url, "judge-2", cache_path=str(tmp_path / "cache.jsonl"))
    judge_pointwise(other, QUESTIONS[:1], ANSWERS[:1])
    assert server.requests == 5


def test_pairwise_runs_both_orders_and_cancels_position_bias(server):
    client = JudgeClient(server.base_url, "judge")
    questions = ["q1", "q2", "BIASED q3", "q4"]
    model_a = ["a good answer", "a poor answer", "one answer", "good too"]
    model_b = ["a poor answer", "a good answer", "other answer", "good as well"]
    result = judge_pairwise(client, questions, model_a, model_b, names=("base", "tuned"))
    winners = [r["winner"] for r in result["rows"]]
    assert winners == ["base", "tuned", "tie", "tie"]
    biased = result["rows"][2]
    assert (biased["order_ab"], biased["order_ba"]) == ("A", "A")  # always "A": inconsistent
    summary = result["summary"]
    assert summary == {"wins_a": 1, "wins_b": 1, "ties": 2, "win_rate_a": 0.5, "inconsistent": 1,
                       "judge_unparsed": 0}
    assert server.requests == 8  # two orders per row


def test_retries_on_server_errors_and_fails_fast_on_client_errors(server):
    server.fail_next = 2
    client = JudgeClient(server.base_url, "judge", max_retries=3)
    reply = client.complete([{"role": "user", "content": "[Answer A]\ngood\n\n[Answer B]\nbad"}])
    assert reply == "[[A]] is better"
    assert client.calls == 3 and server.requests == 3
    server.status_override = 401
    with pytest.raises(TunelabError, match="HTTP 401"):
        JudgeClient(server.base_url, "judge").complete([{"role": "user", "content": "x"}])


def test_malformed_response_is_a_one_line_error(server):
    server.malformed = True
    with pytest.raises(TunelabError, match="not an OpenAI chat completion"):
        JudgeClient(server.base_url, "judge").complete([{"role": "user", "content": "x"}])


def test_pairwise_names_come_from_the_report_layout(tmp_path):
    from tunelab.eval.judge import _model_names

    a, b = tmp_path / "base" / "qa" / "predictions.jsonl", tmp_path / "tuned" / "qa" / "predictions.jsonl"
    assert _model_names(a, b) == ("base", "tuned")
    assert _model_names(tmp_path / "x.jsonl", tmp_path / "y.jsonl") == ("x", "y")


def test_unreachable_endpoint_is_a_one_line_error():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = JudgeClient(f"http://127.0.0.1:{port}/v1", "judge", max_retries=1, timeout=5)
    with pytest.raises(TunelabError, match="failed after 2 attempts"):
        client.complete([{"role": "user", "content": "x"}])


def test_parsers_on_loose_replies():
    assert parse_pairwise("After careful thought, the winner is B.") == "B"
    assert parse_pairwise('```json\n{"winner": "tie"}\n```') == "tie"
    assert parse_pairwise("两个回答一样好，平局") == "tie"
    assert parse_pairwise("I cannot decide.") is None
    found = parse_pointwise("流畅度：8分，语句通顺\n相关性: 7/10\n创造性 = 11", list(DIMENSIONS))
    assert found["fluency"] == {"score": 8.0, "reason": "语句通顺"}
    assert found["relevance"]["score"] == 7.0
    assert "creativity" not in found  # 11 is out of the 1-10 range
    assert parse_pointwise('{"scores": {"fluency": 9}, "reason": "ok"}', ["fluency"])["fluency"]["score"] == 9


def test_judge_cli_pointwise_and_pairwise(server, tmp_path, capsys):
    from tunelab.cli import main

    a, b = tmp_path / "base" / "predictions.jsonl", tmp_path / "tuned" / "predictions.jsonl"
    for path, answers in ((a, ["poor", "poor"]), (b, ["good", "good"])):
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"问题{i}"}],
                                            "reference": "参考", "prediction": ans}, ensure_ascii=False) + "\n"
                                for i, ans in enumerate(answers)), encoding="utf-8")
    out = tmp_path / "pairwise.json"
    assert main(["eval", "judge", "--pred", str(a), "--pred-b", str(b), "--base-url", server.base_url,
                 "--model", "judge", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["wins_b"] == 2 and printed["win_rate_a"] == 0.0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["models"] == {"a": "base", "b": "tuned"} and "[Answer A]" in saved["prompt_template"]
    assert (tmp_path / "pairwise.json.cache.jsonl").is_file()

    out = tmp_path / "pointwise.json"
    assert main(["eval", "judge", "--pred", str(b), "--base-url", server.base_url, "--model", "judge",
                 "--dimensions", "fluency,relevance", "--out", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert list(saved["dimensions"]) == ["fluency", "relevance"] and saved["summary"]["judge_fluency"] == 3
    assert main(["eval", "judge", "--pred", str(b), "--base-url", server.base_url, "--model", "judge",
                 "--dimensions", "beauty", "--out", str(out)]) == 1
    assert "unknown dimension 'beauty'" in capsys.readouterr().err


def test_evaluate_with_a_judge_adds_pointwise_means_and_a_pairwise_verdict(server, tmp_path, tiny_llama,
                                                                           tiny_tokenizer):
    from tunelab.config import load_config
    from tunelab.eval.run import evaluate

    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    data = tmp_path / "qa.jsonl"
    data.write_text('{"instruction": "Say hello", "output": "Hello!"}\n'
                    '{"instruction": "感冒怎么办", "output": "多喝水"}\n', encoding="utf-8")
    cfg = load_config(None, [f"eval.models=[{folder},{folder}]", f"eval.datasets=[{data}]",
                             "eval.metrics=[em]", "eval.max_new_tokens=4", f"eval.output_dir={tmp_path / 'ev'}"])
    client = JudgeClient(server.base_url, "judge", cache_path=str(tmp_path / "ev" / "judge_cache.jsonl"))
    report = evaluate(cfg, progress=False, judge=client)
    for name in ("tiny", "tiny-2"):
        assert 1 <= report["results"]["qa"][name]["judge_fluency"] <= 10
        assert (tmp_path / "ev" / name / "qa" / "judge_pointwise.json").is_file()
    pair = report["judge"]["pairwise"]["qa"]
    assert (pair["a"], pair["b"], pair["ties"], pair["inconsistent"]) == ("tiny", "tiny-2", 2, 0)  # same answers
    md = (tmp_path / "ev" / "report.md").read_text(encoding="utf-8")
    assert "pairwise in both orders: tiny wins 0, tiny-2 wins 0, ties 2" in md and "| judge_overall |" in md


def test_judge_comes_from_the_recipe(tmp_path, monkeypatch):
    from tunelab.config import load_config
    from tunelab.errors import TunelabError
    from tunelab.eval.run import judge_from_config

    assert judge_from_config(load_config(None)) is None
    with pytest.raises(TunelabError, match="go together"):
        judge_from_config(load_config(None, ["eval.judge_model=j"]))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    cfg = load_config(None, [f"output_dir={tmp_path}", "eval.judge_base_url=http://127.0.0.1:9/v1",
                             "eval.judge_model=j", "eval.judge_api_key_env=MY_JUDGE_KEY"])
    client = judge_from_config(cfg)
    assert (client.base_url, client.model, client.api_key) == ("http://127.0.0.1:9/v1", "j", "sk-test")
    assert client.cache_path == str(tmp_path / "eval" / "judge_cache.jsonl")
