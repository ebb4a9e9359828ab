"""LLM-as-judge against any OpenAI-compatible endpoint (seed 003's 大模型评估).

- ``judge_pointwise``: one answer at a time, a 1-10 score with a reason for each
  dimension (fluency, relevance, consistency, creativity, completeness).
- ``judge_pairwise``: two answers to the same question; the judge sees them in both
  orders (A/B then B/A) so a judge that favours a position cancels out. Per row the
  first model gets 1 for a win, 0.5 for a tie, 0 for a loss in each order; the mean of
  the two orders decides (> 0.5 win, < 0.5 loss, else tie). Orders that disagree are
  counted as ``inconsistent`` (a measure of the judge's position bias).

Replies are parsed as JSON when they are JSON (fenced or not) and by pattern
otherwise; unparseable replies are retried once with a reminder, then counted.
Every request/reply pair is cached in a JSONL file keyed by a hash of the request, so
re-running costs nothing. The prompt templates are saved with the results.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.eval.metrics_text import parse_json_answer
from tunelab.io import append_jsonl

DIMENSIONS = {
    "fluency": "流畅度: is the language natural, grammatical and easy to read?",
    "relevance": "相关性: does it address the question and its context?",
    "consistency": "一致性: is it free of contradictions, with itself and with the question?",
    "creativity": "创造性: is it original and insightful rather than generic?",
    "completeness": "信息完整性: does it cover everything the question needs?",
}
_CHINESE_NAMES = {"流畅": "fluency", "相关": "relevance", "一致": "consistency", "创造": "creativity", "完整": "completeness"}

POINTWISE_PROMPT = """You are a strict, fair judge of answers written by an AI assistant.
Rate the answer below on each dimension with an integer from 1 (very poor) to 10 (excellent).

Dimensions:
{dimensions}

[Question]
{question}
{reference_block}
[Answer]
{answer}

Reply with JSON only, in this form:
{{{json_form}}}"""

PAIRWISE_PROMPT = """You are a strict, fair judge comparing two answers written by AI assistants.
Decide which answer is better overall (helpful, correct, relevant, fluent, complete).
Do not let the order of the answers or their length sway you. If they are equally good, say tie.

[Question]
{question}
{reference_block}
[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with JSON only: {{"winner": "A" | "B" | "tie", "reason": "<one sentence>"}}"""

REMINDER = "Your reply could not be parsed. Reply again with the JSON object only, nothing else."


@dataclass
class JudgeClient:
    """A chat-completions client with retries and a request-keyed JSONL cache."""

    base_url: str
    model: str
    api_key: str = field(default="EMPTY", repr=False)
    cache_path: str | None = None
    """JSONL cache file; a request seen before is answered from it without a call."""
    max_retries: int = 3
    timeout: float = 120.0
    temperature: float = 0.0
    calls: int = field(default=0, init=False)
    """HTTP requests actually sent (cache hits excluded)."""
    _cache: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.cache_path and Path(self.cache_path).is_file():
            for line in Path(self.cache_path).read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self._cache[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run

    def key(self, messages: list[dict[str, str]]) -> str:
        """Hash of what determines the reply (endpoint, model, messages, temperature)."""
        request = {"base_url": self.base_url.rstrip("/"), "model": self.model,
                   "messages": messages, "temperature": self.temperature}
        return hashlib.sha256(json.dumps(request, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The judge's reply text, from the cache or the endpoint."""
        key = self.key(messages)
        if key in self._cache:
            return self._cache[key]
        reply = self._request(messages)
        self._cache[key] = reply
        if self.cache_path:
            Path(self.cache_path).parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.cache_path, {"key": key, "model": self.model, "messages": messages, "reply": reply})
        return reply

    def _request(self, messages: list[dict[str, str]]) -> str:
        import openai

        if self._client is None:
            # Retries are ours (below) so they also cover malformed responses.
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY",
                                         max_retries=0, timeout=self.timeout)
        retryable = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            self.calls += 1
            try:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature)
                return response.choices[0].message.content or ""
            except (IndexError, AttributeError, TypeError, openai.APIResponseValidationError) as exc:
                raise TunelabError(f"judge {self.base_url}: not an OpenAI chat completion: {_line(exc)}") from exc
            except retryable as exc:
                last = exc
            except openai.APIStatusError as exc:  # 4xx: retrying will not help
                raise TunelabError(f"judge {self.base_url}: HTTP {exc.status_code}: {_line(exc)}") from exc
        raise TunelabError(f"judge {self.base_url}: failed after {self.max_retries + 1} attempts: {_line(last)}")


def _line(exc: Exception | None) -> str:
    text = str(exc or "").strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- parsing


def _dimension_of(name: str) -> str | None:
    name = str(name).strip().lower()
    if name in DIMENSIONS:
        return name
    return next((dim for zh, dim in _CHINESE_NAMES.items() if zh in name), None)


def _as_score(value: Any) -> float | None:
    if isinstance(value, dict):
        value = value.get("score", value.get("rating"))
    try:
        number = float(str(value).split("/")[0])
    except (TypeError, ValueError):
        return None
    return number if 1 <= number <= 10 else None


def parse_pointwise(reply: str, dimensions: list[str]) -> dict[str, dict[str, Any]]:
    """``{dimension: {"score": 1-10, "reason": str}}`` for the dimensions found in ``reply``.

    JSON first (``{"fluency": {"score": 8, "reason": ...}}`` or ``{"fluency": 8}``), then
    loose text such as ``Fluency: 8/10 - reads well`` or ``流畅度：8分``.
    """
    found: dict[str, dict[str, Any]] = {}
    data = parse_json_answer(reply)
    if data:
        scores = data.get("scores", data) if isinstance(data.get("scores"), dict) else data
        for name, value in scores.items():
            dim, number = _dimension_of(name), _as_score(value)
            if dim in dimensions and number is not None:
                reason = value.get("reason", "") if isinstance(value, dict) else str(data.get("reason", ""))
                found[dim] = {"score": number, "reason": str(reason)}
    for line in reply.splitlines():
        match = re.match(r"\W*([A-Za-z\u4e00-\u9fff]+)\W*[:：=]?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10|分)?\W*(.*)", line)
        if match:
            dim, number = _dimension_of(match.group(1)), _as_score(match.group(2))
            if dim in dimensions and dim not in found and number is not None:
                found[dim] = {"score": number, "reason": match.group(3).strip()}
    return found


def parse_pairwise(reply: str) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` or None from a judge reply (JSON or loose text)."""
    data = parse_json_answer(reply)
    if data and "winner" in data:
        value = str(data["winner"]).strip().strip("[]\"' ").lower()
        if value in ("a", "b"):
            return value.upper()
        if value in ("tie", "draw", "equal", "平局", "相同"):
            return "tie"
    text = reply.strip()
    patterns = [(r"\[\[\s*([AB])\s*\]\]", None), (r"winner\W*(?:is\W*)?(?:answer\s*)?\b([AB]|tie)\b", None),
                (r"\banswer\s*([AB])\s+is\s+better", None), (r"\b(tie|draw)\b|平局|一样好", "tie"),
                (r"^\W*([AB])\W*$", None)]
    for pattern, fixed in patterns:
        match = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if match:
            value = fixed or match.group(1)
            return "tie" if value.lower() == "tie" else value.upper()
    return None


# ---------------------------------------------------------------- judging


def question_text(prompt: Any) -> str:
    """A prompt (string or chat messages) as the text the judge reads."""
    if isinstance(prompt, str):
        return prompt
    messages = [m for m in prompt or [] if isinstance(m, dict)]
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def _reference_block(reference: Any) -> str:
    return f"\n[Reference answer]\n{reference}\n" if reference not in (None, "") else ""


def _ask(client: JudgeClient, prompt: str, parse, complete) -> tuple[Any, str]:
    """Ask once; if the parse is incomplete, remind the judge once and merge."""
    messages = [{"role": "user", "content": prompt}]
    reply = client.complete(messages)
    parsed = parse(reply)
    if not complete(parsed):
        retry = client.complete(messages + [{"role": "assistant", "content": reply},
                                            {"role": "user", "content": REMINDER}])
        again = parse(retry)
        if isinstance(parsed, dict):
            parsed = {**again, **parsed}
        elif parsed is None:
            parsed = again
        reply = f"{reply}\n---\n{retry}"
    return parsed, reply


def judge_pointwise(client: JudgeClient, questions: list[Any], answers: list[str],
                    references: list[Any] | None = None, dimensions: list[str] | None = None) -> dict[str, Any]:
    """Score each answer 1-10 on each dimension; per-row reasons and per-dimension means."""
    dims = list(dimensions or DIMENSIONS)
    for dim in dims:
        if dim not in DIMENSIONS:
            raise TunelabError(f"judge: unknown dimension '{dim}' (known: {', '.join(DIMENSIONS)})")
    listing = "\n".join(f"- {d}: {DIMENSIONS[d]}" for d in dims)
    form = ", ".join(f'"{d}": {{"score": <1-10>, "reason": "<one sentence>"}}' for d in dims)
    refs = references or [None] * len(answers)
    rows, unparsed = [], 0
    for index, (question, answer, ref) in enumerate(zip(questions, answers, refs)):
        prompt = POINTWISE_PROMPT.format(dimensions=listing, question=question_text(question),
                                         reference_block=_reference_block(ref), answer=answer, json_form=form)
        parsed, reply = _ask(client, prompt, lambda r: parse_pointwise(r, dims), lambda p: len(p) == len(dims))
        unparsed += len(parsed) < len(dims)
        rows.append({"index": index, "scores": {d: parsed.get(d, {}).get("score") for d in dims},
                     "reasons": {d: parsed.get(d, {}).get("reason", "") for d in dims}, "reply": reply})
    summary: dict[str, Any] = {}
    for dim in dims:
        values = [r["scores"][dim] for r in rows if r["scores"][dim] is not None]
        summary[f"judge_{dim}"] = sum(values) / len(values) if values else None
    means = [v for v in summary.values() if v is not None]
    summary["judge_overall"] = sum(means) / len(means) if means else None
    summary["judge_unparsed"] = unparsed
    return {"mode": "pointwise", "judge_model": client.model, "base_url": client.base_url,
            "prompt_template": POINTWISE_PROMPT, "dimensions": {d: DIMENSIONS[d] for d in dims},
            "summary": summary, "rows": rows}


_FIRST_SCORE = {"A": 1.0, "B": 0.0, "tie": 0.5}  # the first model's points when it is shown as A


def judge_pairwise(client: JudgeClient, questions: list[Any], answers_a: list[str], answers_b: list[str],
                   references: list[Any] | None = None, names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Compare two models' answers row by row, in both orders (see the module docstring)."""
    if len(answers_a) != len(answers_b):
        raise TunelabError(f"judge: {len(answers_a)} answers from {names[0]} but {len(answers_b)} from {names[1]}")
    refs = references or [None] * len(answers_a)
    rows, counts = [], {"a": 0, "b": 0, "tie": 0, "inconsistent": 0, "unparsed": 0}
    for index, (question, a, b, ref) in enumerate(zip(questions, answers_a, answers_b, refs)):
        verdicts = []
        for first, second in ((a, b), (b, a)):
            prompt = PAIRWISE_PROMPT.format(question=question_text(question), reference_block=_reference_block(ref),
                                            answer_a=first, answer_b=second)
            verdict, reply = _ask(client, prompt, parse_pairwise, lambda v: v is not None)
            verdicts.append((verdict, reply))
        points = []
        if verdicts[0][0] is not None:
            points.append(_FIRST_SCORE[verdicts[0][0]])
        if verdicts[1][0] is not None:  # second order shows model a as "B"
            points.append(1.0 - _FIRST_SCORE[verdicts[1][0]])
        if not points:
            counts["unparsed"] += 1
            outcome, score = None, None
        else:
            score = sum(points) / len(points)
            outcome = "a" if score > 0.5 else "b" if score < 0.5 else "tie"
            counts[outcome] += 1
            counts["inconsistent"] += len(points) == 2 and points[0] != points[1]
        rows.append({"index": index, "winner": {"a": names[0], "b": names[1], "tie": "tie"}.get(outcome),
                     "score_a": score, "order_ab": verdicts[0][0], "order_ba": verdicts[1][0],
                     "reply_ab": verdicts[0][1], "reply_ba": verdicts[1][1]})
    decided = len(rows) - counts["unparsed"]
    summary = {"wins_a": counts["a"], "wins_b": counts["b"], "ties": counts["tie"],
               "win_rate_a": (counts["a"] + 0.5 * counts["tie"]) / decided if decided else None,
               "inconsistent": counts["inconsistent"], "judge_unparsed": counts["unparsed"]}
    return {"mode": "pairwise", "judge_model": client.model, "base_url": client.base_url,
            "models": {"a": names[0], "b": names[1]}, "prompt_template": PAIRWISE_PROMPT,
            "summary": summary, "rows": rows}


def _model_names(a: Path, b: Path) -> tuple[str, str]:
    """Name two predictions files by the first parent folders that differ
    (``<out>/<model>/<test>/predictions.jsonl`` gives the model names), else their stems."""
    pa, pb = a.resolve().parents, b.resolve().parents
    for depth in range(min(3, len(pa), len(pb))):
        if pa[depth].name != pb[depth].name and pa[depth].name and pb[depth].name:
            return pa[depth].name, pb[depth].name
    return (a.stem, b.stem) if a.stem != b.stem else ("A", "B")


def judge_files(client: JudgeClient, pred_path: str, pred_b_path: str | None = None, out: str | None = None,
                dimensions: list[str] | None = None, with_reference: bool = True) -> dict[str, Any]:
    """Judge a predictions file (fields ``prompt``, ``prediction``, optional ``reference``).

    With ``pred_b_path`` the two files are compared pairwise (rows matched by order),
    else each answer is scored pointwise. The result (summary, rows, prompt template)
    is written to ``out`` as JSON when given.
    """
    from tunelab.eval.metrics import read_column
    from tunelab.io import write_json

    questions = read_column(pred_path, "prompt")
    answers = read_column(pred_path, "prediction")
    references = None
    if with_reference:
        try:
            references = read_column(pred_path, "reference")
        except TunelabError:
            references = None  # reference is optional for a judge
    if pred_b_path:
        answers_b = read_column(pred_b_path, "prediction")
        if len(answers_b) != len(answers):
            raise TunelabError(f"{pred_path} has {len(answers)} rows but {pred_b_path} has {len(answers_b)}")
        names = _model_names(Path(pred_path), Path(pred_b_path))
        result = judge_pairwise(client, questions, answers, answers_b, references, names)
    else:
        result = judge_pointwise(client, questions, answers, references, dimensions)
    result["calls"] = client.calls
    if out:
        write_json(out, result)
    return result
