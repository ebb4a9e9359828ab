"""SIGTERM (what ``kill`` and job schedulers send) during training: finish the step, save a
checkpoint, stop; the process's own handlers are back once training ends."""

from __future__ import annotations

import json
import os
import signal

import pytest
from transformers import TrainerCallback

from train_helpers import records, run_stage, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


class TermAt(TrainerCallback):
    """Send SIGTERM to this process as optimizer step ``step`` begins."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "echo.jsonl", [{"instruction": f"Repeat: fever {i}", "output": f"FEVER {i}"}
                                                 for i in range(16)])
    calls = []

    def previous(signum, frame):  # stands in for whatever the process had installed
        calls.append(signum)

    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_stage("sft", tiny_dir, data, tmp_path / "run", "train.max_steps=10", callbacks=[TermAt(2)])
        after_term, after_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, before_term)
    assert calls == []  # the first SIGTERM was the trainer's, not passed on
    assert after_term is previous and after_int is before_int  # handlers restored at train end
    out = tmp_path / "run"
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]  # the step finished, then it stopped
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"] == 2
    assert (checkpoint / "adapter_model.safetensors").is_file()
