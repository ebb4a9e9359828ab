"""Where a training step's time goes: torch.profiler over a few steps, top operators table.

    python benchmarks/profile_train.py [--contender tunelab|plain] [--method lora|full] [--steps 3]

Step 1 warms up and is not profiled; the next ``--steps`` optimizer steps are. The
table is sorted by self CPU time (time spent in the operator itself, not in the
operators it calls), so its top rows are where the step's time actually goes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BUILTIN, ensure_src_on_path, model_path  # noqa: E402


def profiler_callback(first: int, last: int):
    """A TrainerCallback that profiles optimizer steps ``first..last`` (1-based)."""
    import torch
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == first:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == last:
                self.prof.__exit__(None, None, None)
                control.should_training_stop = True

    return Profile()


def run(contender: str, method: str, steps: int, rows: int, workdir: Path):
    """Train ``1 + steps`` steps under the profiler; return the profile."""
    from train_throughput import EXAMPLES_PER_STEP, prepare

    spec, data_file = prepare(workdir, False, max(rows // EXAMPLES_PER_STEP, steps + 1))
    callback = profiler_callback(2, 1 + steps)
    if contender == "tunelab":
        from tunelab.config import load_config
        from tunelab.train import train

        cfg = load_config(None, [f"model.name={spec}", f"data.train=[{data_file}]", f"method.name={method}",
                                 f"train.max_steps={1 + steps}", "train.lr=1e-4",
                                 f"output_dir={workdir / 'run'}", "overwrite=true"])
        train(cfg, callbacks=[callback])
    else:
        from plain_recipe import build_trainer

        build_trainer(model_path(spec), data_file, method, 1 + steps, workdir / "run", [callback]).train()
    return callback.prof


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contender", default="tunelab", choices=("tunelab", "plain"))
    parser.add_argument("--method", default="lora", choices=("lora", "full"))
    parser.add_argument("--steps", type=int, default=3, help="profiled optimizer steps (after one warm-up)")
    parser.add_argument("--rows", type=int, default=168, help="training rows to draw batches from")
    parser.add_argument("--top", type=int, default=20, help="rows of the operator table")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    ensure_src_on_path()
    with tempfile.TemporaryDirectory(prefix="tunelab-prof-") as tmp:
        prof = run(args.contender, args.method, args.steps, args.rows, Path(args.workdir or tmp))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40)
    print(f"{args.contender} {args.method} on {BUILTIN}, {args.steps} profiled steps:")
    print(table)


if __name__ == "__main__":
    main()
