"""Threads under load: how much of its idle speed tunelab LoRA training keeps when another process runs.

    python benchmarks/threads_under_load.py [--steps 6] [--smoke]

Three runs of tunelab LoRA training (``train_throughput.py``'s tunelab child, each in
its own fresh process, same data, same steps):

- ``idle``: the machine as it is (meant to be idle), tunelab's automatic thread choice;
- ``auto``: one competing single-core busy process (``python -c 'while True: pass'``,
  started before the run and killed after it), tunelab's automatic thread choice;
- ``forced``: the same competing process, threads forced to every core
  (``TUNELAB_THREADS=<cores>``), which is what a fixed "use all cores" setting does.

Printed: tokens/s and threads of each run and the fraction of the idle speed that
``auto`` and ``forced`` keep. Target: ``auto`` keeps at least ``TARGET_KEPT`` of idle.
On a machine with one core there is nothing to choose, and the test is skipped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, ensure_src_on_path, run_child  # noqa: E402

TARGET_KEPT = 0.40
CASES = ("idle", "auto", "forced")
BUSY_LOOP = "while True: pass"


def busy_process() -> subprocess.Popen:
    """One process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _run(case: str, spec: str, data_file: Path, steps: int, workdir: Path, cores: int) -> dict[str, Any]:
    from train_throughput import tunelab_env

    env = tunelab_env()
    if case == "forced":
        env["TUNELAB_THREADS"] = str(cores)
    args = ["--child", "tunelab", "--method", "lora", "--spec", spec, "--data", str(data_file),
            "--steps", str(steps), "--out", str(workdir / "runs" / f"load_{case}")]
    saved = {k: os.environ.pop(k) for k in ("TUNELAB_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    busy = busy_process() if case != "idle" else None
    try:
        if busy is not None:
            time.sleep(0.5)  # running before tunelab looks at the load
        return run_child("train_throughput.py", args, env=env)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        os.environ.update(saved)


def measure(spec: str, data_file: Path, steps: int, workdir: Path, log=print) -> dict[str, Any]:
    """The three runs and the fractions of idle speed kept (``None`` figures on a 1-core machine)."""
    ensure_src_on_path()
    from tunelab import hardware

    cores = hardware.cores_available()
    if cores < 2:
        log(f"  skipped: {cores} core available, no thread count to choose")
        return {"cores": cores, "skipped": "one core", "runs": {}, "auto_kept": None, "forced_kept": None}
    busy_before = hardware.other_busy_cores(1.0)
    if busy_before >= 0.3:
        log(f"  warning: other processes already busy on {busy_before:.1f} core(s): 'idle' is not idle")
    runs: dict[str, dict] = {}
    for case in CASES:
        runs[case] = result = _run(case, spec, data_file, steps, workdir, cores)
        log(f"  {case:6s} {result['tokens_per_s']:7.1f} real tok/s  {result['s_per_step']:7.2f} s/step  "
            f"threads {result['threads']} (at end {result['threads_at_end']})  {result['precision']}")
    idle = runs["idle"]["tokens_per_s"]
    figures = {"cores": cores, "steps": steps, "busy_before": busy_before, "runs": runs,
               **{f"{c}_tokens_per_s": runs[c]["tokens_per_s"] for c in CASES},
               **{f"{c}_threads": runs[c]["threads"] for c in CASES},
               "auto_kept": runs["auto"]["tokens_per_s"] / idle, "forced_kept": runs["forced"]["tokens_per_s"] / idle}
    return figures


def print_summary(r: dict[str, Any], log=print) -> None:
    if r.get("skipped"):
        return
    met = "met" if r["auto_kept"] >= TARGET_KEPT else "not met"
    log(f"one busy process: automatic threads ({r['auto_threads']}) keep {100 * r['auto_kept']:.0f}% of idle speed "
        f"(target >= {100 * TARGET_KEPT:.0f}%: {met}); threads forced to {r['cores']} keep "
        f"{100 * r['forced_kept']:.0f}%")


def main(argv: list[str] | None = None) -> None:
    from train_throughput import prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model (plumbing only)")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tunelab-load-") as tmp:
        workdir = Path(args.workdir or tmp)
        spec, data_file = prepare(workdir, args.smoke, args.steps)
        result = measure(spec, data_file, args.steps, workdir)
    print_summary(result)
    emit(result)


if __name__ == "__main__":
    main()
