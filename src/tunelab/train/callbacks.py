"""Trainer callbacks: metrics.jsonl, a progress bar with tokens/s, and Ctrl-C that saves.

All of them act on the main process only (``state.is_world_process_zero``) where they
write or print, so a multi-process run produces one log and one bar.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tunelab.io import append_jsonl, write_jsonl


class MetricsLogger(TrainerCallback):
    """Appends every logged record (train and eval) to ``metrics.jsonl``, with throughput."""

    def __init__(self, path: Path, trainer_ref: Any, resume_step: int | None = None):
        self.path = Path(path)
        self.trainer = trainer_ref
        self.start = None
        self.tokens_at_start = 0
        self.records: list[dict[str, Any]] = []
        if resume_step is not None:
            self._keep_until(resume_step)

    def _keep_until(self, step: int) -> None:
        """On resume: keep the log up to the checkpoint; steps after it will be run again."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
        self.records = kept
        if int(os.environ.get("RANK", "0")) == 0:
            write_jsonl(self.path, self.records)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        self.tokens_at_start = self.trainer.real_tokens_seen

    def tokens_per_second(self) -> float | None:
        if self.start is None:
            return None
        elapsed = time.monotonic() - self.start
        done = self.trainer.real_tokens_seen - self.tokens_at_start
        return done / elapsed if elapsed > 0 and done else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        if "loss" in logs:
            tps = self.tokens_per_second()
            if tps:
                record["tokens_per_second"] = round(tps, 1)
            if self.trainer.efficiency is not None:
                record["efficiency"] = round(self.trainer.efficiency, 4)
        self.records.append(record)
        if state.is_world_process_zero:
            append_jsonl(self.path, record)


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps showing loss, learning rate and real tokens per second."""

    def __init__(self, metrics: MetricsLogger):
        self.metrics = metrics
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            if self.bar.total != state.max_steps:  # train.max_time re-planned the run
                self.bar.total = state.max_steps
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        if "loss" in logs:
            self.postfix["loss"] = f"{logs['loss']:.4f}"
        if "learning_rate" in logs:
            self.postfix["lr"] = f"{logs['learning_rate']:.2e}"
        if "eval_loss" in logs:
            self.postfix["eval"] = f"{logs['eval_loss']:.4f}"
        tps = self.metrics.tokens_per_second()
        if tps:
            self.postfix["tok/s"] = f"{tps:.0f}"
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SaveOnInterrupt(TrainerCallback):
    """First Ctrl-C or SIGTERM (what ``kill`` and job schedulers send): finish the current
    step, save a checkpoint, stop. A second signal of the same kind acts as it normally would."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        self.interrupted = True
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              "(send it again to abort)", flush=True)
        fallback = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, self._previous.get(signum) or fallback)

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
            self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
