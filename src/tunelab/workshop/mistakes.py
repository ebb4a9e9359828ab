"""Preference pairs from a model's own mistakes (``tunelab data mistakes``).

For every training prompt the model (typically the SFT run) answers, greedily or by
sampling several times; each answer that does not match the reference (whitespace and
case aside) becomes a pair with the reference as ``chosen`` and the model's answer as
``rejected``. What DPO then learns is exactly where this model goes wrong. For open-ended
tasks, where an answer that differs from the reference may be just as good, an LLM judge
(``tunelab.eval.judge``, pairwise in both orders) can keep only the answers it rates below
the reference.

The pairs are written in LLaMA-Factory's alpaca ranking shape (``instruction``,
``input``, ``system``, ``history``, ``chosen``, ``rejected``) with a ``ranking: true``
registry entry, so ``train.stage=dpo`` (and LLaMA-Factory) read the folder as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

RANKING_COLUMNS = {"prompt": "instruction", "query": "input", "system": "system", "history": "history",
                   "chosen": "chosen", "rejected": "rejected"}


@dataclass
class MistakeReport:
    prompts: int = 0
    answers: int = 0
    correct: int = 0
    empty: int = 0
    pairs: int = 0
    judged: int = 0
    """Wrong answers shown to the judge (0 without one)."""
    judge_dropped: int = 0
    """Of those, the ones the judge did not rate below the reference (ties, the model's wins, unparsed)."""
    sizes: dict[str, int] = field(default_factory=dict)


def same_answer(a: str, b: str) -> bool:
    """Equal once whitespace runs and case are ignored (the exact-match rule)."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _row(conv: Any, rejected: str) -> dict[str, Any]:
    messages = conv.messages
    system = messages[0].text if messages and messages[0].role == "system" else ""
    body = messages[1:] if system else messages
    history = [[body[i].text, body[i + 1].text] for i in range(0, len(body) - 2, 2)]
    row = {"instruction": body[-2].text, "input": "", "chosen": body[-1].text, "rejected": rejected,
           "source": conv.source}
    if system:
        row["system"] = system
    if history:
        row["history"] = history
    return row


def mistake_pairs(model_spec: str, datasets: list[str], out_dir: str | Path, *, dataset_dir: str | None = None,
                  max_samples: int | None = None, samples: int = 1, temperature: float = 0.8,
                  max_new_tokens: int = 128, batch_size: int = 8, seed: int = 42, name: str = "mistakes",
                  progress: bool = True, judge: Any = None) -> MistakeReport:
    """Answer every prompt of ``datasets`` with ``model_spec``; write the wrong answers as pairs.

    samples: answers per prompt (1 = greedy; more = sampled at ``temperature`` with ``seed``).
    judge: a ``tunelab.eval.judge.JudgeClient``; a wrong answer is then kept only when the judge
      prefers the reference to it (in both orders on average), for open-ended tasks where an
      answer that differs from the reference may be as good.
    """
    from tunelab.data.registry import load_datasets
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model

    if samples < 1:
        raise TunelabError(f"data mistakes: --samples {samples} must be at least 1")
    _check_free(Path(out_dir), name)
    convs = load_datasets(datasets, dataset_dir, max_samples, seed)
    if not convs:
        raise TunelabError(f"data mistakes: {', '.join(datasets)}: no rows")
    model, tokenizer = load_model(model_spec)
    prompts = [conv.to_openai()[:-1] for conv in convs]
    answers: list[list[str]] = [[] for _ in convs]
    for k in range(samples):
        settings = (from_preset("greedy", max_new_tokens=max_new_tokens) if samples == 1 else
                    from_preset("sampling", max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + k))
        for i, result in enumerate(generate(model, tokenizer, prompts, settings, batch_size, progress)):
            answers[i].append(result.text)
    options = {"model": model_spec, "samples": samples, "temperature": temperature if samples > 1 else 0,
               "max_new_tokens": max_new_tokens, "seed": seed}
    return pairs_from_answers(convs, answers, out_dir, name=name, label=f"{model_spec}'s wrong answers to "
                              f"{', '.join(datasets)}", options=options, judge=judge)


def _check_free(out: Path, name: str) -> None:
    if (out / f"{name}_train.jsonl").exists():
        raise TunelabError(f"{out}: already holds {name} pairs; give another --out or --name")


def pairs_from_answers(convs: list, answers: list[list[str]], out_dir: str | Path, *, name: str = "mistakes",
                       label: str = "a model's wrong answers", options: dict | None = None,
                       judge: Any = None) -> MistakeReport:
    """Write the answers (``answers[i]``: those given to ``convs[i]``) that miss the reference as pairs."""
    from tunelab.workshop.output import write_dataset

    out = Path(out_dir)
    _check_free(out, name)
    report = MistakeReport(prompts=len(convs))
    candidates: list[tuple[int, dict]] = []
    for i, given in enumerate(answers):
        seen: set[str] = set()
        for text in given:
            report.answers += 1
            answer, reference = text.strip(), convs[i].messages[-1].text
            if not answer:
                report.empty += 1
            elif same_answer(answer, reference):
                report.correct += 1
            elif " ".join(answer.split()) not in seen:
                seen.add(" ".join(answer.split()))
                candidates.append((i, _row(convs[i], answer)))
    rows = [row for _, row in candidates]
    info_options = dict(options or {})
    if judge is not None and candidates:
        rows = _judged(judge, convs, candidates, report)
        info_options["judge"] = {"model": judge.model, "base_url": judge.base_url}
    report.pairs = len(rows)
    if not rows:
        why = ("the judge preferred no reference to the model's answer" if judge is not None and candidates
               else f"of {report.answers} answers {report.correct} were right and {report.empty} empty")
        raise TunelabError(f"data mistakes: {why}: no pairs to write")
    info = {"description": f"Preference pairs from {label} ({report.correct} of {report.answers} answers were "
                           "right" + (f"; {report.judge_dropped} kept out by the judge" if judge is not None else "")
                           + ").",
            "options": info_options}
    report.sizes = write_dataset(out, name, {"train": rows}, info, file_prefix=f"{name}_",
                                 columns=RANKING_COLUMNS, ranking=True)
    return report


def _judged(judge: Any, convs: list, candidates: list[tuple[int, dict]], report: MistakeReport) -> list[dict]:
    """The candidate pairs whose reference the judge prefers to the model's answer."""
    from tunelab.eval.judge import judge_pairwise

    verdict = judge_pairwise(judge, [convs[i].to_openai()[:-1] for i, _ in candidates],
                             [row["chosen"] for _, row in candidates], [row["rejected"] for _, row in candidates],
                             names=("reference", "model"))
    kept = [row for (_, row), judged in zip(candidates, verdict["rows"]) if judged["winner"] == "reference"]
    report.judged = len(candidates)
    report.judge_dropped = len(candidates) - len(kept)
    return kept
