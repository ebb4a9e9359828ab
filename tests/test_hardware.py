"""The hardware probe and the decisions made from it: precision and threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from tunelab import hardware
from tunelab.config import load_config
from tunelab.errors import TunelabError

# the probe times matmuls and the load monitor watches the machine: alone, not beside other tests
pytestmark = pytest.mark.serial

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""Makes torch dispatch as on an AVX2-only CPU (bf16 matmuls ~100x slower than fp32)."""


def fake_probe(fp32=150.0, bf16=1.3, fp16=1.2) -> hardware.Probe:
    return hardware.Probe(
        cpu_model="test CPU", flags={n: False for n in hardware.FLAG_NAMES}, capability="AVX2",
        logical_cpus=2, cores_available=2, other_busy_cores=0.0, loadavg=0.0, gpu=None,
        gpu_bf16=False, gpu_fp16=False, gflops={"fp32": fp32, "bf16": bf16, "fp16": fp16},
        gflops_threads=1, torch_version=torch.__version__)


SLOW, FAST = fake_probe(), fake_probe(fp32=150.0, bf16=700.0)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "_PROBE", None)


def test_measured_matmul_rates_are_real_and_cached(tmp_path):
    first = hardware.probe()
    assert not first.cached and all(v > 0 for v in first.gflops.values())
    assert first.gflops["fp32"] > 1.0  # any CPU torch runs on does more than 1 GFLOP/s in fp32
    assert first.cores_available >= 1 and first.capability == torch.backends.cpu.get_cpu_capability()
    files = list((tmp_path / "cache" / "hardware").glob("*.json"))
    assert len(files) == 1
    again = hardware.probe(refresh=False)
    assert again is first  # once per process
    hardware._PROBE = None
    cached = hardware.probe()
    assert cached.cached and cached.gflops == first.gflops
    assert hardware.probe(refresh=True).cached is False


def test_auto_picks_bf16_only_where_measured_faster():
    assert hardware.training_precision("auto", "auto", SLOW).value == "fp32"
    assert "not measured faster" in hardware.training_precision("auto", "auto", SLOW).reason
    assert hardware.training_precision("auto", "auto", FAST).value == "bf16"
    assert hardware.training_precision("auto", False, FAST).value == "fp32"
    assert hardware.training_precision("fp32", "auto", FAST).value == "fp32"


def test_explicit_bf16_on_a_slow_cpu_falls_back_with_both_rates_unless_forced():
    asked = hardware.training_precision("auto", True, SLOW)
    assert asked.value == "fp32"
    assert "1.3 GFLOP/s" in asked.warning and "150.0" in asked.warning and "train.bf16=force" in asked.warning
    assert hardware.training_precision("auto", "force", SLOW).value == "bf16"
    kept = hardware.training_precision("auto", True, FAST)
    assert kept.value == "bf16" and kept.warning is None


def test_inference_is_fp32_on_cpu_and_an_explicit_half_is_kept_with_a_warning():
    assert hardware.inference_dtype("auto", SLOW).value == "fp32"
    slow = hardware.inference_dtype("bf16", SLOW)
    assert slow.value == "bf16" and "much slower" in slow.warning
    assert hardware.inference_dtype("bf16", FAST).warning is None


def test_threads_leave_a_core_to_a_busy_process_and_obey_overrides(monkeypatch):
    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    assert hardware.choose_threads(busy=0.0, cores=2).threads == 2
    assert hardware.choose_threads(busy=1.0, cores=2).threads == 1
    assert hardware.choose_threads(busy=2.0, cores=2).threads == 1  # never zero
    assert hardware.choose_threads(busy=0.3, cores=4).threads == 4
    assert hardware.choose_threads(3).threads == 3
    monkeypatch.setenv(hardware.THREADS_ENV, "2")
    choice = hardware.choose_threads(busy=1.0, cores=2)
    assert choice.threads == 2 and "TUNELAB_THREADS" in choice.reason
    monkeypatch.setenv(hardware.THREADS_ENV, "lots")
    with pytest.raises(TunelabError, match="not a whole number"):
        hardware.choose_threads()
    monkeypatch.delenv(hardware.THREADS_ENV)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert hardware.choose_threads(busy=1.0, cores=4).threads == 2


def test_apply_threads_sets_torch_and_respects_explicit_counts(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(hardware, "_APPLIED", None)
        assert hardware.apply_threads(1).threads == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv(hardware.THREADS_ENV, "2")
        hardware.apply_threads()
        assert torch.get_num_threads() == 2  # an explicit count applies on every call
    finally:
        torch.set_num_threads(before)


def test_load_monitor_sees_another_busy_process():
    monitor = hardware.LoadMonitor()
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"])
    spinner.wait()
    busy = monitor.sample()
    assert busy > 0.5  # a spinning process kept about one core busy; our own time is not counted


def test_thread_governor_follows_the_load(monkeypatch):
    from transformers import TrainerControl, TrainerState

    from tunelab.train.threads import ThreadGovernor

    monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
    now = [0.0]
    said: list[str] = []
    governor = ThreadGovernor(interval=30, clock=lambda: now[0], say=said.append)
    loads = iter([1.0, 0.0])
    governor.monitor.sample = lambda: next(loads)
    monkeypatch.setattr(hardware, "cores_available", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        state, control = TrainerState(), TrainerControl()
        governor.on_step_end(None, state, control)
        assert torch.get_num_threads() == 2  # too soon to look again
        now[0], state.global_step = 31.0, 5
        governor.on_step_end(None, state, control)
        assert torch.get_num_threads() == 1 and governor.changes == [(5, 1)]
        now[0], state.global_step = 62.0, 9
        governor.on_step_end(None, state, control)
        assert torch.get_num_threads() == 2 and governor.changes[-1] == (9, 2)
        assert said and "threads: 1 from step 5" in said[0]
    finally:
        torch.set_num_threads(before)


def test_train_bf16_accepts_auto_and_force_and_refuses_other_words():
    assert load_config(None, []).train.bf16 == "auto"
    assert load_config(None, ["train.bf16=force"]).train.bf16 == "force"
    with pytest.raises(TunelabError, match="train.bf16: 'maybe' is not one of"):
        load_config(None, ["train.bf16=maybe"])


def test_shipped_recipes_leave_precision_to_the_machine():
    from pathlib import Path

    import yaml

    for path in Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"):
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert values.get("train", {}).get("bf16", "auto") == "auto", path
        assert values.get("model", {}).get("precision", "auto") == "auto", path


def run_env(extra_env: dict[str, str], tmp_path) -> dict:
    env = {**os.environ, **extra_env, "TUNELAB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "tunelab", "env", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_env_on_an_avx2_cpu_decides_fp32_from_measurement(tmp_path):
    started = time.perf_counter()
    info = run_env(AVX2_ENV, tmp_path)
    probe, decided = info["probe"], info["decisions"]
    assert probe["capability"] == "AVX2"
    assert probe["gflops"]["bf16"] < hardware.SLOW_RATIO * probe["gflops"]["fp32"]
    assert decided["train_precision"]["value"] == "fp32"
    assert decided["train_bf16_true"]["value"] == "fp32" and "train.bf16=force" in decided["train_bf16_true"]["reason"]
    assert decided["threads"]["value"] >= 1 and info["versions"]["torch"]
    assert time.perf_counter() - started < 60


def test_env_prints_tables(tmp_path):
    env = {**os.environ, "TUNELAB_CACHE": str(tmp_path / "cache"), "COLUMNS": "160"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "env"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for text in ("torch cpu capability", "matmul GFLOP/s", "training precision (auto)", "threads"):
        assert text in done.stdout


def test_training_with_bf16_true_on_a_slow_cpu_warns_once_and_trains_fp32(tmp_path, tiny_dir, monkeypatch, capsys):
    from transformers import TrainerCallback

    from tunelab.train import train

    class Dtypes(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.bf16, self.seen = args.bf16, set()
            layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
            layer.register_forward_hook(lambda mod, inp, out: self.seen.add((out.dtype, mod.weight.dtype)))

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(8)),
                    encoding="utf-8")
    monkeypatch.setattr(hardware, "_PROBE", SLOW)
    watch = Dtypes()
    out = train(load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data}]", f"output_dir={tmp_path / 'run'}",
                                   "train.bf16=true", "train.max_steps=2", "train.batch_size=4"]), callbacks=[watch])
    err = capsys.readouterr().err
    assert err.count("warning: train.bf16=true, but bf16 matmul 1.3 GFLOP/s vs fp32 150.0") == 1
    assert watch.bf16 is False and watch.seen == {(torch.float32, torch.float32)}  # no autocast, fp32 weights
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "| precision | fp32 (bf16 measured 115x slower) |" in readme
    assert "| threads | 1 (set by $TUNELAB_THREADS) |" in readme
