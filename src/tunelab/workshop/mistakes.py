"""Preference pairs from a model's own mistakes (``tunelab data mistakes``).

For every training prompt the model (typically the SFT run) answers, greedily or by
sampling several times; each answer that does not match the reference (whitespace and
case aside) becomes a pair with the reference as ``chosen`` and the model's answer as
``rejected``. What DPO then learns is exactly where this model goes wrong.

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
                  progress: bool = True) -> MistakeReport:
    """Answer every prompt of ``datasets`` with ``model_spec``; write the wrong answers as pairs.

    samples: answers per prompt (1 = greedy; more = sampled at ``temperature`` with ``seed``).
    """
    from tunelab.data.registry import load_datasets
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model
    from tunelab.workshop.output import write_dataset

    if samples < 1:
        raise TunelabError(f"data mistakes: --samples {samples} must be at least 1")
    out = Path(out_dir)
    if (out / f"{name}_train.jsonl").exists():
        raise TunelabError(f"{out}: already holds {name} pairs; give another --out or --name")
    convs = load_datasets(datasets, dataset_dir, max_samples, seed)
    if not convs:
        raise TunelabError(f"data mistakes: {', '.join(datasets)}: no rows")
    model, tokenizer = load_model(model_spec)
    prompts = [conv.to_openai()[:-1] for conv in convs]
    report = MistakeReport(prompts=len(convs))
    seen: dict[int, set[str]] = {i: set() for i in range(len(convs))}
    rows = []
    for k in range(samples):
        settings = (from_preset("greedy", max_new_tokens=max_new_tokens) if samples == 1 else
                    from_preset("sampling", max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + k))
        for i, result in enumerate(generate(model, tokenizer, prompts, settings, batch_size, progress)):
            report.answers += 1
            answer, reference = result.text.strip(), convs[i].messages[-1].text
            if not answer:
                report.empty += 1
            elif same_answer(answer, reference):
                report.correct += 1
            elif " ".join(answer.split()) not in seen[i]:
                seen[i].add(" ".join(answer.split()))
                rows.append(_row(convs[i], answer))
    report.pairs = len(rows)
    if not rows:
        raise TunelabError(f"data mistakes: the model answered all {report.answers} prompts right: no pairs to write")
    info = {"description": f"Preference pairs from {model_spec}'s wrong answers to {', '.join(datasets)} "
                           f"({report.correct} of {report.answers} answers were right).",
            "options": {"model": model_spec, "samples": samples, "temperature": temperature if samples > 1 else 0,
                        "max_new_tokens": max_new_tokens, "seed": seed}}
    report.sizes = write_dataset(out, name, {"train": rows}, info, file_prefix=f"{name}_",
                                 columns=RANKING_COLUMNS, ranking=True)
    return report
