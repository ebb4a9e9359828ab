"""The plain functions behind ``tunelab data check|stats|preview``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunelab.data.images import image_problems
from tunelab.data.registry import load_dataset
from tunelab.data.render import chat_messages, encode, mark_supervised, token_ids
from tunelab.errors import TunelabError


@dataclass
class CheckReport:
    """Rows read per dataset and every problem found, as ``file:line: field: what``."""

    rows: dict[str, int] = field(default_factory=dict)
    formats: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        total = sum(self.rows.values())
        formats = ", ".join(f"{n} {fmt}" for fmt, n in sorted(self.formats.items())) or "none"
        head = f"{_plural(total, 'conversation')} in {_plural(len(self.rows), 'dataset')} ({formats})"
        if self.ok:
            return f"OK: {head}"
        return f"{_plural(len(self.problems), 'problem')}; {head} readable"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def check(specs: Sequence[str], dataset_dir: str | None = None) -> CheckReport:
    """Read every dataset fully and collect all problems instead of stopping at the first."""
    report = CheckReport()
    for spec in specs:
        known = len(report.problems)
        try:
            convs = load_dataset(spec, dataset_dir, on_error=report.problems.append)
        except TunelabError as exc:  # a whole-file problem: missing file, bad registry entry...
            report.problems.append(str(exc))
            continue
        report.rows[spec] = len(convs)
        report.formats.update(c.meta.get("format", "?") for c in convs)
        report.problems.extend(image_problems(convs, dataset_dir))  # every missing/unreadable image
        if not convs and len(report.problems) == known:
            report.problems.append(f"{spec}: no records")
    return report


def _percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual length from the data, not an interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


def stats(specs: Sequence[str], tokenizer: Any, dataset_dir: str | None = None,
          cutoff_len: int = 1024) -> dict[str, Any]:
    """Counts, formats and rendered token lengths (min/p50/p95/max, how many exceed cutoff_len)."""
    per_dataset: dict[str, int] = {}
    formats: Counter = Counter()
    lengths: list[int] = []
    turns: list[int] = []
    for spec in specs:
        convs = load_dataset(spec, dataset_dir)
        per_dataset[spec] = len(convs)
        for conv in convs:
            formats[conv.meta.get("format", "?")] += 1
            try:
                lengths.append(len(token_ids(tokenizer, chat_messages(conv))))
            except TunelabError as exc:
                raise TunelabError(f"{conv.source}: {exc}") from None
            turns.append(sum(m.role == "assistant" for m in conv.messages))
    if not lengths:
        raise TunelabError(f"{', '.join(specs)}: no records")
    lengths.sort()
    return {
        "conversations": len(lengths),
        "datasets": per_dataset,
        "formats": dict(formats),
        "multi_turn": sum(t > 1 for t in turns),
        "tokens": {"min": lengths[0], "p50": _percentile(lengths, 50), "p95": _percentile(lengths, 95),
                   "max": lengths[-1], "total": sum(lengths)},
        "cutoff_len": cutoff_len,
        "over_cutoff": sum(n > cutoff_len for n in lengths),
    }


def format_stats(result: dict[str, Any]) -> str:
    """Human-readable lines for ``stats``' result."""
    tok = result["tokens"]
    lines = [f"conversations  {result['conversations']} ({result['multi_turn']} multi-turn)"]
    lines += [f"  {name}  {n}" for name, n in result["datasets"].items()]
    lines.append("formats        " + ", ".join(f"{k} {v}" for k, v in sorted(result["formats"].items())))
    lines.append(f"tokens         min {tok['min']}  p50 {tok['p50']}  p95 {tok['p95']}  "
                 f"max {tok['max']}  total {tok['total']}")
    share = 100 * result["over_cutoff"] / result["conversations"]
    lines.append(f"over cutoff    {result['over_cutoff']} ({share:.1f}%) longer than {result['cutoff_len']} tokens")
    return "\n".join(lines)


def preview(spec: str, tokenizer: Any, dataset_dir: str | None = None, n: int = 2,
            cutoff_len: int = 1024, mask_history: bool = False, train_on_prompt: bool = False) -> list[str]:
    """The first ``n`` conversations rendered, supervised tokens wrapped in ``[[ ]]``."""
    out = []
    for conv in load_dataset(spec, dataset_dir)[:n]:
        example = encode(tokenizer, conv, cutoff_len, "truncate", mask_history, train_on_prompt)
        if example is None:
            out.append(f"# {conv.source}: dropped (no answer token within cutoff_len={cutoff_len})")
        else:
            out.append(f"# {conv.source} ({len(example['input_ids'])} tokens)\n"
                       + mark_supervised(tokenizer, example))
    return out
