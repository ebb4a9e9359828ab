"""Run folders: refuse to clobber, then write everything eval/chat/serve/export need.

Layout (see docs/architecture.md)::

    config.yaml  adapter_*.safetensors | model.safetensors + config.json
    tokenizer files + chat_template.jinja  metrics.jsonl  loss.png
    trainer_state.json  README.md  checkpoints/checkpoint-N/
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, save_config
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "adapter_config.json", "model.safetensors")


def holds_run(path: Path) -> bool:
    """True when ``path`` already contains (part of) a training run."""
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def prepare_output_dir(cfg: RunConfig) -> tuple[Path, str | None]:
    """Create ``cfg.output_dir`` and find the checkpoint to resume from, if any.

    A folder that already holds a run is refused unless ``overwrite`` is true or
    ``train.resume`` finds a checkpoint in it to continue from.
    """
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise TunelabError(f"output_dir: {out} exists and is not a folder")
    checkpoint = find_checkpoint(out, cfg.train.resume)
    if holds_run(out) and checkpoint is None:
        if not cfg.overwrite:
            hint = " and has no checkpoint to resume from" if cfg.train.resume else ""
            raise TunelabError(
                f"output_dir: {out} already holds a run{hint}; pass overwrite=true to replace it"
                + ("" if cfg.train.resume else " or train.resume=auto to continue it"))
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "checkpoints" / ".staging", ignore_errors=True)  # a save cut short
    return out, checkpoint


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a ``checkpoint-N`` folder was saved at."""
    import json

    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state["global_step"])


def find_checkpoint(out: Path, resume: str | None) -> str | None:
    """The checkpoint to resume from: the newest under ``out/checkpoints`` for ``auto``."""
    if not resume:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file():
            raise TunelabError(f"train.resume: {path} is not a checkpoint folder (no trainer_state.json)")
        return str(path)
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / "checkpoints"
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def plot_losses(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Train and eval loss against the optimizer step, written to ``path`` (PNG)."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.4)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    preference = any("reward_margin" in r or "eval_reward_margin" in r for r in records)
    ax.set_ylabel("loss (mean per pair)" if preference else "loss (mean per supervised token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    if preference:  # the dpo stage: reward margin (train) and reward accuracy (held-out pairs)
        ax2 = ax.twinx()
        for key, label, color in (("reward_margin", "reward margin", "tab:green"),
                                  ("eval_reward_accuracy", "eval reward accuracy", "tab:red")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax2.plot(*zip(*points), label=label, color=color, linewidth=1.2, linestyle="--")
        ax2.set_ylabel("reward margin / accuracy")
        more = ax2.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _last(records: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def write_readme(out: Path, cfg: RunConfig, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """A short human summary of the run."""
    data = ", ".join(cfg.data.train) + (f" (eval: {', '.join(cfg.data.eval)})" if cfg.data.eval else "")
    rows = [
        ("model", f"`{cfg.model.name}`"),
        ("method", f"{cfg.method.name} — {summary.get('trainable', '')}"),
        ("data", data),
        ("examples", f"{summary.get('train_examples')} train, {summary.get('eval_examples', 0)} eval; "
                     f"{summary.get('encode', '')}"),
        ("batching", f"{'packed' if cfg.data.packing or cfg.train.stage == 'pt' else 'padded'} rows, batch {cfg.train.batch_size} × "
                     f"accumulation {cfg.train.grad_accum} × {summary.get('processes', 1)} process(es); "
                     f"efficiency {_fmt(summary.get('efficiency'), '.1%')} real tokens"),
        ("steps", f"{summary.get('steps')} optimizer steps, {_fmt(summary.get('epochs'), '.2f')} epochs"),
        ("time", f"{_fmt(summary.get('seconds'), '.1f')} s, {_fmt(summary.get('tokens_per_second'), '.0f')} "
                 "real tokens/s"),
        ("final train loss", _fmt(_last(records, "loss"))),
        ("final eval loss", _fmt(_last(records, "eval_loss"))),
        ("precision", summary.get("precision") or f"train.bf16={cfg.train.bf16}"),
        ("threads", summary.get("threads", "—")),
    ]
    if cfg.train.stage != "sft":
        rows.insert(2, ("stage", cfg.train.stage + (f" ({cfg.train.pref_loss})" if cfg.train.stage == "dpo" else "")))
    if _last(records, "eval_reward_accuracy") is not None:
        rows.append(("final eval reward accuracy / margin", f"{_fmt(_last(records, 'eval_reward_accuracy'))} / "
                                                             f"{_fmt(_last(records, 'eval_reward_margin'))}"))
    if summary.get("time_budget"):
        after_steps = 1 + [key for key, _ in rows].index("steps")
        rows.insert(after_steps, ("time budget", summary["time_budget"].removeprefix("time budget ")))
    lines = [f"# Run `{out.name}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', chr(92) + '|')} |" for k, v in rows]  # "||" would split cells
    lines += ["", "![loss](loss.png)", "",
              f"Use it: `tunelab chat {out}` · `tunelab eval {out} ...` · `tunelab export {out} --merge OUT`", ""]
    return atomic_write_text(out / "README.md", "\n".join(lines))


def save_run(trainer, tokenizer, cfg: RunConfig, out: Path, summary: dict[str, Any],
             records: list[dict[str, Any]]) -> None:
    """Write the final weights/adapter, tokenizer, config, state, plot and README (main process)."""
    trainer.save_model(str(out))  # adapter or full weights, safetensors; main process only
    if not trainer.is_world_process_zero():
        return
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; config.yaml says it all
    tokenizer.save_pretrained(str(out))  # keeps the chat template (chat_template.jinja)
    save_config(cfg, out / "config.yaml")
    trainer.state.save_to_json(str(out / "trainer_state.json"))
    plot_losses(records, out / "loss.png", f"{cfg.method.name} on {cfg.model.name}")
    write_readme(out, cfg, summary, records)
