"""``icd10cm-text``: a domain corpus for continued pre-training, from ``simple-icd-10-cm``.

The ICD-10-CM tabular list written out as running text: one document per chapter (its
title, range, blocks and notes) and one per 3-character category (its place in the
chapter and block, then every code below it with its description, inclusion terms,
includes/excludes notes and coding instructions). Held-out ``validation`` and ``test``
documents are whole categories, so domain perplexity is measured on text the model
never saw.

``exclude``: rows of other datasets (JSONL files with a ``term`` field, such as
``icd10cm-norm``'s ``validation.jsonl`` and ``test.jsonl``) whose terms must not appear
in the corpus, so continued pre-training cannot leak a test answer.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.workshop.builtin.icd10cm import LICENSE, SOURCE, _icd, code_meta
from tunelab.workshop.output import write_dataset


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _sentence(label: str, items: list[str] | str) -> str:
    items = [items] if isinstance(items, str) else list(items)
    items = [i.strip().rstrip(".") for i in items if i and i.strip()]
    return f"{label}: {'; '.join(items)}." if items else ""


def _code_lines(cm: Any, code: str, banned: set[str]) -> list[str]:
    """One paragraph line per code: description, then its terms and instructions."""
    terms = [t for t in cm.get_inclusion_term(code) if _norm(t) not in banned]
    parts = [f"{code} {cm.get_description(code)}.",
             _sentence("Also written as", terms),
             _sentence("Includes", [t for t in cm.get_includes(code) if _norm(t) not in banned]),
             _sentence("Excludes1 (never coded together)", cm.get_excludes1(code)),
             _sentence("Excludes2 (may be coded together)", cm.get_excludes2(code)),
             _sentence("Code first", cm.get_code_first(code)),
             _sentence("Use additional code", cm.get_use_additional_code(code)),
             _sentence("Code also", cm.get_code_also(code)),
             _sentence("Note", cm.get_notes(code))]
    return [" ".join(p for p in parts if p)]


def category_document(cm: Any, category: str, banned: set[str]) -> str:
    """A category and every code below it, as running text."""
    meta = code_meta(cm, category)
    head = (f"ICD-10-CM category {category}: {cm.get_description(category)}. It belongs to chapter "
            f"{meta['chapter']} ({meta['chapter_title']})")
    if meta["block"] and meta["block"] != category:
        head += f", block {meta['block']} ({cm.get_description(meta['block'])})"
    lines = [head + "."]
    for code in [category, *cm.get_descendants(category)]:
        lines += _code_lines(cm, code, banned)
    return "\n".join(lines)


def chapter_document(cm: Any, chapter: str) -> str:
    blocks = [b for b in cm.get_children(chapter) if cm.is_block(b)]
    lines = [f"ICD-10-CM chapter {chapter}: {cm.get_description(chapter)}."]
    lines += [f"Block {b}: {cm.get_description(b)}." for b in blocks]
    for label, items in (("Includes", cm.get_includes(chapter)), ("Excludes1", cm.get_excludes1(chapter)),
                         ("Excludes2", cm.get_excludes2(chapter)), ("Note", cm.get_notes(chapter))):
        sentence = _sentence(label, items)
        if sentence:
            lines.append(sentence)
    return "\n".join(lines)


def _banned_terms(exclude: str | None) -> set[str]:
    banned: set[str] = set()
    for name in [p.strip() for p in (exclude or "").split(",") if p.strip()]:
        path = Path(name)
        if not path.is_file():
            raise TunelabError(f"icd10cm-text: exclude: {path}: no such file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunelabError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("term"), str):
                raise TunelabError(f"{path}:{number}: term: missing (exclude needs rows with a 'term' field)")
            banned.add(_norm(row["term"]))
    return banned


def build_icd10cm_text(
    out_dir: str | Path,
    chapters: str | int | None = None,
    max_docs: int | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    exclude: str | None = None,
    seed: int = 42,
) -> dict[str, int]:
    """Build ``icd10cm-text`` into ``out_dir`` (rows ``{"text", "doc", "chapter"}``); return split sizes.

    chapters: comma-separated chapter numbers to keep (e.g. ``"11,19"``; default: all 22).
    max_docs: at most this many category documents (a seeded sample), plus the chapter ones.
    validation_fraction/test_fraction: share of category documents held out.
    exclude: comma-separated JSONL files whose ``term`` values are removed from the text.
    """
    if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise TunelabError("icd10cm-text: validation_fraction and test_fraction must be in [0, 1) and sum below 1")
    cm = _icd()
    all_chapters = [c for c in cm.get_all_codes(with_dots=True) if cm.is_chapter(c)]
    wanted = [c.strip() for c in str(chapters).split(",") if c.strip()] if chapters else all_chapters
    unknown = [c for c in wanted if c not in all_chapters]
    if unknown:
        raise TunelabError(f"icd10cm-text: chapters: no chapter {unknown[0]!r} (chapters are 1..{len(all_chapters)})")
    banned = _banned_terms(exclude)
    categories = [c for c in cm.get_all_codes(with_dots=True)
                  if cm.is_category(c) and code_meta(cm, c)["chapter"] in wanted]
    rng = random.Random(seed)
    rng.shuffle(categories)
    if max_docs is not None:
        categories = categories[:max_docs]
    n_val, n_test = round(validation_fraction * len(categories)), round(test_fraction * len(categories))
    rows = [{"text": category_document(cm, c, banned), "doc": c, "chapter": code_meta(cm, c)["chapter"]}
            for c in categories]
    splits = {"validation": rows[:n_val], "test": rows[n_val:n_val + n_test], "train": rows[n_val + n_test:]}
    splits["train"] += [{"text": chapter_document(cm, ch), "doc": f"chapter {ch}", "chapter": ch} for ch in wanted]
    rng.shuffle(splits["train"])
    info = {
        "description": f"ICD-10-CM as running text for continued pre-training: {len(categories)} category "
                       f"documents and {len(wanted)} chapter documents"
                       + (f"; {len(banned)} excluded terms" if banned else "") + ".",
        "source": SOURCE, "license": LICENSE,
        "options": dict(chapters=chapters, max_docs=max_docs, validation_fraction=validation_fraction,
                        test_fraction=test_fraction, exclude=exclude, seed=seed),
        "characters": {s: sum(len(r["text"]) for r in rows) for s, rows in splits.items()},
    }
    return write_dataset(out_dir, "icd10cm-text", splits, info, columns={"prompt": "text"})
