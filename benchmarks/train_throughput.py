"""Training throughput: tunelab vs seed 003's plain transformers recipe, same data, same steps.

    python benchmarks/train_throughput.py [--steps 11] [--rounds 2] [--methods lora,full]

Contenders (``plan``), 8 examples per optimizer step each:

- ``tunelab``: ``tunelab.train.train`` with its defaults (batch 8, length-grouped,
  logits only where a label is, ``train.bf16: auto``, automatic threads), in the
  environment ``tunelab train`` sets up (OpenMP's default wait policy);
- ``plain``: the seed-003 recipe **as users write it** (``bf16=True``, batch 1 ×
  accumulation 8). On a CPU where bf16 measured much slower than fp32 it is ~100x
  slower, so there it runs ``SLOW_STEPS`` steps (one timed step after the warm-up),
  in the first round only, and for LoRA only;
- the plain recipe's **honest variants on this machine**: the precision
  ``tunelab.hardware.training_precision`` decides here (fp32 where bf16 is slow, bf16
  where it is fast) with batch 1 × accumulation 8 and with batch 8 × accumulation 1
  (dynamic padding); the faster one is the "best plain variant". Where that
  precision is bf16, the 1 × 8 variant *is* the recipe as written and runs once.

Each (contender, method) runs in its own fresh process, contenders alternating within
each round (rounds reverse the order) so that background load hits all alike. In
every child the clock starts at the end of the first optimizer step (model loading,
data preparation and the warm-up step are excluded) and stops at the end of the last.

- real tokens: non-padding tokens that go through the model (prompt + answer);
- supervised tokens: next-token targets that carry loss (the answer);
- peak RSS: the child's ``ru_maxrss`` (whole process: model load included);
- speedup vs the best plain variant: median over rounds of tunelab / the faster
  variant of the same round; vs another contender: median of same-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BUILTIN, build_data, emit, ensure_src_on_path, make_tiny_model, model_path,  # noqa: E402
                    peak_rss_mb, read_jsonl, run_child, step_timer_callback)

EXAMPLES_PER_STEP = 8
SLOW_STEPS = 2
"""Steps of the plain recipe as written where bf16 is slow: the warm-up and one timed step."""
SLOW_TIMEOUT = 4 * 3600
"""Seconds a child of that slow contender may take (one bf16 step there: minutes)."""


@dataclass(frozen=True)
class Contender:
    """One way of training, run in its own process."""

    name: str
    """Key prefix of its runs: ``tunelab``, ``plain`` (as written), ``plain_fp32_8x1``..."""
    who: str
    """``tunelab`` or ``plain``."""
    role: str
    """``tunelab``, ``as_written`` or ``variant``."""
    precision: str = "auto"
    """Plain recipe: ``bf16`` (``bf16=True``) or ``fp32``."""
    batch: int = EXAMPLES_PER_STEP
    steps: int | None = None
    """Fewer steps than the others (None: the profile's)."""
    rounds: int | None = None
    """Fewer rounds than the others (None: all)."""

    @property
    def label(self) -> str:
        if self.who == "tunelab":
            return "tunelab (defaults)"
        shape = f"{self.batch}x{EXAMPLES_PER_STEP // self.batch}"
        if self.role == "as_written":
            return f"plain as written (bf16=True, {shape})"
        return f"plain {self.precision} {shape}"

    def child_args(self) -> list[str]:
        if self.who == "tunelab":
            return ["--child", "tunelab"]
        return ["--child", "plain", "--precision", self.precision, "--batch", str(self.batch)]

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


def plan(method: str, precision: str, slow_bf16: bool, smoke: bool = False) -> list[Contender]:
    """The contenders of ``method`` on a machine where training ``precision`` is what tunelab decides.

    ``slow_bf16``: bf16 measured much slower than fp32 here (the recipe as written gets
    ``SLOW_STEPS`` steps, one round, LoRA only). ``smoke`` (tiny model) keeps every
    contender at full length.
    """
    short = slow_bf16 and not smoke
    contenders = [Contender("tunelab", "tunelab", "tunelab")]
    if method == "lora" or not short:
        contenders.append(Contender("plain", "plain", "as_written", "bf16", 1,
                                    steps=SLOW_STEPS if short else None, rounds=1 if short else None))
    for batch in (1, EXAMPLES_PER_STEP):
        if (precision, batch) != ("bf16", 1):  # that one is the recipe as written
            contenders.append(Contender(f"plain_{precision}_{batch}x{EXAMPLES_PER_STEP // batch}", "plain",
                                        "variant", precision, batch))
    return contenders


def candidates(contenders: list[Contender], precision: str) -> list[Contender]:
    """The plain contenders that count for "best plain variant": those in ``precision``."""
    return [c for c in contenders if c.who == "plain" and c.precision == precision]


# ------------------------------------------------------------------ children


def _model_facts(model) -> dict[str, Any]:
    """Parameter counts the FLOP formulas need (see mfu.py)."""
    from torch import nn

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    embed = base.get_input_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    tied = head is not None and embed is not None and head.weight is embed.weight
    # Matmul weights of the body: everything but embeddings, the head, norms and LoRA.
    body = sum(m.weight.numel() for n, m in base.named_modules()
               if isinstance(m, nn.Linear) and m is not head and "lora_" not in n)
    config = base.config
    return {"params_total": total, "tied_head": tied, "params_body_matmul": body,
            "params_head": head_params, "params_lora": lora,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "heads": config.num_attention_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads}


def child_tunelab(spec: str, data_file: str, method: str, steps: int, out: str, extra: list[str]) -> dict:
    ensure_src_on_path()
    from tunelab.config import load_config
    from tunelab.train import train

    timer = step_timer_callback()
    cfg = load_config(None, [f"model.name={spec}", f"data.train=[{data_file}]", f"method.name={method}",
                             f"train.max_steps={steps}", f"train.batch_size={EXAMPLES_PER_STEP}",
                             "train.grad_accum=1", "train.lr=1e-4",
                             f"output_dir={out}", "overwrite=true", *extra])
    train(cfg, callbacks=[timer])
    return {**timer.summary(cfg.train.grad_accum), **_model_facts(timer.model),
            "peak_rss_mb": peak_rss_mb()}


def child_plain(spec: str, data_file: str, method: str, steps: int, out: str,
                precision: str = "bf16", batch: int = 1) -> dict:
    from plain_recipe import build_trainer

    timer = step_timer_callback()
    trainer = build_trainer(model_path(spec), data_file, method, steps, out, callbacks=[timer],
                            bf16=precision == "bf16", batch_size=batch, examples_per_step=EXAMPLES_PER_STEP)
    trainer.train()
    return {**timer.summary(trainer.args.gradient_accumulation_steps), **_model_facts(trainer.model),
            "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------ parent


def subset(data_dir: Path, rows: int, workdir: Path) -> Path:
    """The first ``rows`` training rows (already shuffled by the builder), shared by all."""
    path = workdir / f"train_{rows}.jsonl"
    if not path.is_file():
        picked = read_jsonl(data_dir / "train.jsonl", limit=rows)
        if len(picked) < rows:
            raise SystemExit(f"the training set has only {len(picked)} rows; fewer steps, please")
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked), encoding="utf-8")
    return path


def tunelab_env() -> dict[str, str]:
    """What ``tunelab train`` sets before torch loads (cli.main), for tunelab's children:
    nothing today (OpenMP's default wait policy); kept as the one place to say so."""
    return {}


def measure(spec: str, data_file: Path, methods: list[str], steps: int, rounds: int | dict[str, int],
            workdir: Path, extra: list[str], precision: str, slow_bf16: bool, log=print,
            threads: int | None = None) -> dict[str, Any]:
    """Run every (contender, method) for its rounds, alternating; return the plan, raw runs and summaries.

    ``rounds``: one count for every method, or a count per method.
    """
    per_method = rounds if isinstance(rounds, dict) else {m: rounds for m in methods}
    plans = {m: plan(m, precision, slow_bf16) for m in methods}
    for method in methods:
        for c in plans[method]:
            if c.steps is not None:
                log(f"  note: {c.label} ({method}) runs {c.steps} steps = 1 warm-up + {c.steps - 1} timed, "
                    f"{c.rounds or per_method[method]} round(s): bf16 is much slower than fp32 on this CPU")
    runs: dict[str, list[dict]] = {}
    for r in range(max(per_method.values())):
        for method in methods:
            if r >= per_method[method]:
                continue
            order = plans[method] if r % 2 == 0 else plans[method][::-1]
            for c in order:
                if c.rounds is not None and r >= c.rounds:
                    continue
                key = f"{c.name}_{method}"
                args = [*c.child_args(), "--method", method, "--spec", spec, "--data", str(data_file),
                        "--steps", str(c.steps or steps), "--out", str(workdir / "runs" / key)]
                args += [a for x in extra for a in ("--tunelab", x)] if c.who == "tunelab" else []
                result = run_child("train_throughput.py", args, threads=threads,
                                   timeout=SLOW_TIMEOUT if c.steps else 3600,
                                   env=tunelab_env() if c.who == "tunelab" else None)
                result.update(round=r, contender=c.name)
                runs.setdefault(key, []).append(result)
                log(f"  round {r + 1}/{per_method[method]} {key:20s} {result['tokens_per_s']:7.1f} real tok/s  "
                    f"{result['s_per_step']:7.2f} s/step  {result['precision']}  {result['threads']} thread(s)  "
                    f"peak RSS {result['peak_rss_mb']:6.0f} MiB  padding {100 * result['padding_fraction']:4.1f}%")
    return {"plan": {m: [c.describe() for c in plans[m]] for m in methods}, "runs": runs,
            "summary": {m: summarise(runs, m, plans[m], precision) for m in methods}}


def _same_round_ratio(ours: list[dict], theirs: list[dict]) -> float:
    """Median of tokens/s ratios of runs from the same round (ratio of medians if none share one)."""
    by_round = {r["round"]: r["tokens_per_s"] for r in theirs}
    ratios = [r["tokens_per_s"] / by_round[r["round"]] for r in ours if r.get("round") in by_round]
    if ratios:
        return statistics.median(ratios)
    return statistics.median(r["tokens_per_s"] for r in ours) / statistics.median(r["tokens_per_s"] for r in theirs)


def summarise(runs: dict[str, list[dict]], method: str, contenders: list[Contender],
              precision: str) -> dict[str, Any]:
    """Per-contender medians, the best plain variant, and tunelab's ratio to every plain contender."""
    table: dict[str, dict[str, Any]] = {}
    for c in contenders:
        rs = runs.get(f"{c.name}_{method}")
        if not rs:
            continue
        table[c.name] = {
            "label": c.label, "role": c.role, "precision": rs[0]["precision"], "batch": c.batch,
            "grad_accum": EXAMPLES_PER_STEP // c.batch, "runs": len(rs), "timed_steps": rs[0]["timed_steps"],
            "threads": rs[0]["threads"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
            "supervised_tokens_per_s": statistics.median(r["supervised_tokens_per_s"] for r in rs),
            "s_per_step": statistics.median(r["s_per_step"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
        }
    ours = runs[f"tunelab_{method}"]
    pool = [c.name for c in candidates(contenders, precision) if c.name in table]
    best = max(pool, key=lambda n: table[n]["tokens_per_s"])
    per_round = []
    for run in ours:
        rivals = [r["tokens_per_s"] for n in pool for r in runs[f"{n}_{method}"] if r["round"] == run["round"]]
        if rivals:
            per_round.append(run["tokens_per_s"] / max(rivals))
    for name, row in table.items():
        row["tunelab_speedup"] = 1.0 if name == "tunelab" else _same_round_ratio(ours, runs[f"{name}_{method}"])
    t = table["tunelab"]
    return {
        "contenders": table, "precision_decided": precision,
        "best_plain": best, "best_plain_label": table[best]["label"],
        "speedup_vs_best_plain": statistics.median(per_round),
        "speedup_vs_best_plain_per_round": per_round,
        "speedup_vs_as_written": table["plain"]["tunelab_speedup"] if "plain" in table else None,
        "peak_rss_ratio_vs_best_plain": t["peak_rss_mb"] / table[best]["peak_rss_mb"],
        "tunelab_precision": t["precision"], "tunelab_threads": t["threads"],
        "tunelab_tokens_per_s": t["tokens_per_s"], "tunelab_supervised_tokens_per_s": t["supervised_tokens_per_s"],
        "tunelab_peak_rss_mb": t["peak_rss_mb"],
        "best_plain_tokens_per_s": table[best]["tokens_per_s"], "best_plain_peak_rss_mb": table[best]["peak_rss_mb"],
        "as_written_tokens_per_s": table["plain"]["tokens_per_s"] if "plain" in table else None,
        "as_written_timed_steps": table["plain"]["timed_steps"] if "plain" in table else None,
    }


def print_table(summary: dict[str, dict], kind: str, log=print) -> None:
    log(f"CPU kind: {kind}")
    log(f"{'method':6s} {'contender':36s} {'prec':4s} {'real tok/s':>10s} {'sup tok/s':>9s} {'s/step':>7s} "
        f"{'steps':>5s} {'peak RSS MiB':>12s} {'tunelab is':>10s}")
    for method, s in summary.items():
        for name, row in s["contenders"].items():
            mark = " (best plain)" if name == s["best_plain"] else ""
            log(f"{method:6s} {row['label'] + mark:36s} {row['precision']:4s} {row['tokens_per_s']:10.1f} "
                f"{row['supervised_tokens_per_s']:9.1f} {row['s_per_step']:7.2f} {row['timed_steps']:5d} "
                f"{row['peak_rss_mb']:12.0f} {row['tunelab_speedup']:9.2f}x")
        written = ("not run (bf16 slow here)" if s["speedup_vs_as_written"] is None
                   else f"{s['speedup_vs_as_written']:.2f}x")
        log(f"{method:6s} tunelab vs best plain variant ({s['best_plain_label']}): "
            f"{s['speedup_vs_best_plain']:.2f}x real tokens/s, peak RSS ratio {s['peak_rss_ratio_vs_best_plain']:.2f}; "
            f"vs plain as written: {written}")


def prepare(workdir: Path, smoke: bool, steps: int) -> tuple[str, Path]:
    """(model spec, training file) shared by every contender."""
    data_dir = build_data(workdir)
    spec = str(make_tiny_model(workdir / "tiny-model", data_dir)) if smoke else BUILTIN
    if not smoke:
        model_path(spec)  # convert the builtin model once, before any timing child starts
    return spec, subset(data_dir, steps * EXAMPLES_PER_STEP, workdir)


def decided_precision() -> tuple[str, bool]:
    """(training precision tunelab decides on this machine, bf16 much slower than fp32 here)."""
    ensure_src_on_path()
    from tunelab import hardware

    probe = hardware.probe()
    return hardware.training_precision("auto", "auto", probe).value, probe.bf16_ratio < hardware.SLOW_RATIO


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating repeats of every contender")
    parser.add_argument("--methods", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model: checks the plumbing only")
    parser.add_argument("--threads", type=int, help="intra-op threads per child (default: each decides)")
    parser.add_argument("--tunelab", action="append", default=[], metavar="KEY=VALUE",
                        help="extra tunelab config override (e.g. data.packing=true)")
    # child mode (internal)
    parser.add_argument("--child", choices=("tunelab", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "tunelab":
            emit(child_tunelab(args.spec, args.data, args.method, args.steps, args.out, args.tunelab))
        else:
            emit(child_plain(args.spec, args.data, args.method, args.steps, args.out, args.precision, args.batch))
        return
    from common import cpu_kind
    from tunelab import hardware

    precision, slow_bf16 = decided_precision()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        spec, data_file = prepare(workdir, args.smoke, args.steps)
        result = measure(spec, data_file, args.methods.split(","), args.steps, args.rounds, workdir,
                         args.tunelab, precision, slow_bf16, threads=args.threads)
    print_table(result["summary"], cpu_kind(hardware.probe()))
    emit(result["summary"])


if __name__ == "__main__":
    main()
