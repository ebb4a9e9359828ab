"""Data hygiene: text clean-up, exact and near-duplicate removal, length limits, leak checks.

``clean(train, test, out_dir)`` runs the steps in order and writes the surviving
rows (in their own format) with a ``dataset_info.json``; the returned
``CleanReport`` says, per split, how many rows each step dropped and why.

- duplicates: exact = same normalised prompt+answer (case, punctuation, spacing and
  Unicode width ignored); near = estimated Jaccard of character 5-grams >= threshold,
  leaving out 5-grams found in over half the rows (a shared prompt template would
  otherwise make every row look alike).
- leakage: a test row whose *prompt* equals (or nearly equals) a training prompt;
  by default the training copy goes (the test set stays comparable between runs).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import TunelabError
from tunelab.workshop.items import Item, export_splits, load_items
from tunelab.workshop.near import NearIndex, normalize
from tunelab.workshop.output import write_dataset

LEAK_ACTIONS = ("drop-train", "drop-test", "report")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_WORDS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\s\u3400-\u9fff\uf900-\ufaff]+")


def tidy(text: str) -> str:
    """Unicode NFC, no control or zero-width characters, no trailing spaces, <= 1 blank line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).translate(_ZERO_WIDTH)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = _BLANK_LINES.sub("\n\n", _TRAILING.sub("\n", text))
    return text.strip()


def tidy_value(value: Any) -> Any:
    """``tidy`` applied to every string inside a row (messages and history included)."""
    if isinstance(value, str):
        return tidy(value)
    if isinstance(value, list):
        return [tidy_value(v) for v in value]
    if isinstance(value, dict):
        return {k: tidy_value(v) for k, v in value.items()}
    return value


def rough_token_count(text: str) -> int:
    """Tokens without a tokenizer: each CJK character and each other word counts one."""
    return len(_WORDS.findall(text))


def token_counter(tokenizer: Any | None) -> Callable[[str], int]:
    """Count with ``tokenizer`` (an object, a path/model spec) or roughly when None."""
    if tokenizer is None:
        return rough_token_count
    if isinstance(tokenizer, (str, Path)):
        from tunelab.models import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer))
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class CleanReport:
    """Rows in, rows out and the reason for every drop, per split."""

    rows_in: dict[str, int] = field(default_factory=dict)
    rows_out: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    tidied: dict[str, int] = field(default_factory=dict)
    leaks: list[tuple[str, str, str, float]] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)
    out_dir: Path | None = None

    def drop(self, split: str, reason: str, example: str) -> None:
        counts = self.dropped.setdefault(split, {})
        counts[reason] = counts.get(reason, 0) + 1
        self.examples.setdefault(f"{split}: {reason}", example)


def tidy_items(items: list[Item], split: str, report: CleanReport) -> list[Item]:
    """Clean every text field; rows whose answer is empty afterwards are dropped."""
    kept = []
    for item in items:
        row = tidy_value(item.row)
        if row != item.row:
            report.tidied[split] = report.tidied.get(split, 0) + 1
            item = Item(row, _retidy(item), item.source, item.dataset, item.fmt, item.remapped)
        if not item.answer.strip():
            report.drop(split, "empty answer after clean-up", item.source)
        else:
            kept.append(item)
    return kept


def _retidy(item: Item):
    conv = item.conv
    for message in conv.messages:
        for part in message.content:
            if hasattr(part, "text"):
                part.text = tidy(part.text)
    return conv


def length_filter(items: list[Item], split: str, report: CleanReport, count: Callable[[str], int],
                  min_tokens: int | None, max_tokens: int | None) -> list[Item]:
    if min_tokens is None and max_tokens is None:
        return items
    kept = []
    for item in items:
        n = count(item.text)
        if min_tokens is not None and n < min_tokens:
            report.drop(split, f"shorter than {min_tokens} tokens", item.source)
        elif max_tokens is not None and n > max_tokens:
            report.drop(split, f"longer than {max_tokens} tokens", item.source)
        else:
            kept.append(item)
    return kept


def dedup(items: list[Item], split: str, report: CleanReport, near: float | None = 0.8) -> list[Item]:
    """Keep the first of each group of exact (and, unless ``near`` is None, near) duplicates."""
    seen: dict[str, str] = {}
    index = NearIndex(near) if near else None
    signatures = index.signatures_for([item.text for item in items]) if index is not None else []
    sources: list[str] = []
    kept = []
    for position, item in enumerate(items):
        key = normalize(item.prompt) + "\x00" + normalize(item.answer)
        if key in seen:
            report.drop(split, "exact duplicate", f"{item.source} = {seen[key]}")
            continue
        seen[key] = item.source
        if index is not None:
            sig = signatures[position]
            match = index.query(sig)
            if match is not None:
                report.drop(split, f"near duplicate (>= {near:g})", f"{item.source} ~ {sources[match[0]]} ({match[1]:.2f})")
                continue
            index.add(sig)
            sources.append(item.source)
        kept.append(item)
    return kept


def find_leaks(train: list[Item], test: list[Item], near: float | None = 0.8) -> list[tuple[int, int, str, float]]:
    """``(test_index, train_index, kind, similarity)`` for test prompts found in training."""
    exact: dict[str, int] = {}
    for i, item in enumerate(train):
        exact.setdefault(normalize(item.prompt), i)
    index = NearIndex(near) if near else None
    test_sigs = []
    if index is not None:
        # One boilerplate estimate over both splits: they share the prompt template.
        signatures = index.signatures_for([item.prompt for item in train + test])
        for sig in signatures[: len(train)]:
            index.add(sig)
        test_sigs = signatures[len(train):]
    leaks = []
    for j, item in enumerate(test):
        key = normalize(item.prompt)
        if key in exact:
            leaks.append((j, exact[key], "exact", 1.0))
        elif index is not None:
            match = index.query(test_sigs[j])
            if match is not None:
                leaks.append((j, match[0], "near", match[1]))
    return leaks


def remove_leaks(train: list[Item], test: list[Item], report: CleanReport, near: float | None,
                 action: str) -> tuple[list[Item], list[Item]]:
    if action not in LEAK_ACTIONS:
        raise TunelabError(f"leak action: must be one of {', '.join(LEAK_ACTIONS)}, got {action!r}")
    leaks = find_leaks(train, test, near)
    report.leaks = [(test[j].source, train[i].source, kind, sim) for j, i, kind, sim in leaks]
    if action == "drop-train":
        bad = {i for _, i, _, _ in leaks}
        for i in sorted(bad):
            report.drop("train", "leaks into test", f"{train[i].source}")
        train = [item for i, item in enumerate(train) if i not in bad]
    elif action == "drop-test":
        bad = {j for j, _, _, _ in leaks}
        for j in sorted(bad):
            report.drop("test", "leaks from train", f"{test[j].source}")
        test = [item for j, item in enumerate(test) if j not in bad]
    return train, test


def clean(
    train: list[str | Path],
    out_dir: str | Path,
    test: list[str | Path] | None = None,
    name: str = "clean",
    dataset_dir: str | Path | None = None,
    near: float | None = 0.8,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    tokenizer: Any | None = None,
    leak_action: str = "drop-train",
) -> CleanReport:
    """Clean ``train`` (and ``test``) datasets into ``out_dir`` as ``<name>_train/test.jsonl``.

    near: Jaccard threshold for near duplicates and near leaks (None: exact only).
    min_tokens/max_tokens: length limits counted with ``tokenizer`` (or roughly).
    leak_action: ``drop-train`` (default), ``drop-test`` or ``report``.
    """
    if near is not None and not 0 < near <= 1:
        raise TunelabError(f"near: a similarity in (0, 1], got {near}")
    report = CleanReport()
    count = token_counter(tokenizer)
    splits = {"train": [i for spec in train for i in load_items(spec, dataset_dir)]}
    if test:
        splits["test"] = [i for spec in test for i in load_items(spec, dataset_dir)]
    for split, items in splits.items():
        report.rows_in[split] = len(items)
        items = tidy_items(items, split, report)
        items = length_filter(items, split, report, count, min_tokens, max_tokens)
        splits[split] = dedup(items, split, report, near)
    if test:
        splits["train"], splits["test"] = remove_leaks(splits["train"], splits["test"], report, near, leak_action)
    report.rows_out = {split: len(items) for split, items in splits.items()}
    _write(splits, out_dir, name, report)
    return report


def _write(splits: dict[str, list[Item]], out_dir: str | Path, name: str, report: CleanReport) -> None:
    rows, fmt = export_splits(splits)
    info = {"description": "cleaned by tunelab data clean", "dropped": report.dropped,
            "leaks": len(report.leaks), "rows_in": report.rows_in}
    write_dataset(out_dir, name, rows, info, formatting=fmt, file_prefix=f"{name}_")
    report.out_dir = Path(out_dir)
