"""``train.max_time``: the re-planned schedule fits the budget, on a fake clock.

Every run here measures time on a clock that only the test advances (``Tick``: so many
seconds inside each optimizer step and each eval batch), so no outcome depends on how
fast this machine is.
"""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from tunelab.config import load_config, parse_duration
from tunelab.errors import TunelabError
from tunelab.train import budget, train

from test_train_engine import StopAt  # noqa: E402  (tests are on sys.path: pytest prepends their folder)
from train_helpers import feedback_rows, pair_rows, records, run_stage, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """40 rows: 10 optimizer steps per epoch at batch 4."""
    path = tmp_path_factory.mktemp("data") / "echo.jsonl"
    rows = [{"instruction": f"Repeat: fever {i}", "output": f"FEVER {i}"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(budget, "clock", fake)
    return fake


class Tick(TrainerCallback):
    """Advance the fake clock: ``first`` s in the first step of a run, then ``step(n)`` s in
    optimizer step n, and ``eval_batch`` s per eval batch. Records the plan after each step
    and the scheduler's learning rate after the last one."""

    def __init__(self, clock, step=2.0, first=20.0, eval_batch=0.0):
        self.clock, self.first, self.eval_batch = clock, first, eval_batch
        self.step = step if callable(step) else (lambda n: step)
        self.plans: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.clock.now += self.step(state.global_step + 1) if self.started else self.first
        self.started = True

    def on_prediction_step(self, args, state, control, **kwargs):
        self.clock.now += self.eval_batch

    def on_step_end(self, args, state, control, **kwargs):
        self.plans.append(state.max_steps)

    def on_train_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.end_lr = lr_scheduler.get_last_lr()[0]


def run(tiny_dir, data_file, out, *overrides, callbacks=()):
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={out}",
                             "train.bf16=false", "train.batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0.1",
                             "data.group_by_length=false", *overrides])
    return train(cfg, callbacks=list(callbacks))


def logged(out, key):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def assert_warmup_then_decay(lrs):
    """Rises to one peak, then never rises again."""
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(b <= a + 1e-12 for a, b in zip(lrs[peak:], lrs[peak + 1:])), lrs


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("1h30m", 5400), ("90s", 90), ("1h 5s", 3605),
                                           ("1.5h", 5400), (90, 90), (12.5, 12.5), ("600", 600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10 minutes", "-5m", "0", "0m", "m", "5x", "1h-5m", -3, True])
def test_bad_max_time_is_one_line_error_naming_the_key(text):
    with pytest.raises(TunelabError, match=r"^train\.max_time: ") as info:
        load_config(None, [f"train.max_time={text}"])
    assert "\n" not in str(info.value)


def test_fit_steps_and_events():
    # 2 s a step, 10 s left, an eval of 1 s every 3 steps plus one at the end
    assert budget.events(0, 7, 3) == 3 and budget.events(3, 6, 3) == 1 and budget.events(0, 7, 0) == 0
    assert budget.fit_steps(0, 100, 10.0, 2.0, lambda t: budget.events(0, t, 3) * 1.0) == 4  # 8 s + 2 evals
    assert budget.fit_steps(0, 2, 1e9, 2.0, lambda t: 0.0) == 2  # never beyond the configured steps
    assert budget.fit_steps(5, 100, 1.0, 2.0, lambda t: 0.0) == 5  # not even one more step fits


@pytest.mark.parametrize("batch, accum", [(4, 1), (2, 2)])
def test_budget_shortens_the_schedule_to_fit(tiny_dir, data_file, tmp_path, clock, capsys, batch, accum):
    tick = Tick(clock)  # 20 s for the first step, then 2 s a step
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=40", "train.max_time=1m",
              f"train.batch_size={batch}", f"train.grad_accum={accum}", callbacks=[tick])
    # planned before step 3: 22 s spent, 38 s left, ~3 s for the final save -> 17 more steps
    assert [s for s, _ in logged(out, "loss")] == list(range(1, 20))
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 19
    assert clock.now - 1000 + budget.FIXED_SAVE_SECONDS <= 60
    lrs = [lr for _, lr in logged(out, "learning_rate")]
    assert_warmup_then_decay(lrs)
    assert lrs[-1] < 0.05 * max(lrs)  # the last step is at the end of the cosine, not cut mid-way
    assert tick.end_lr == pytest.approx(0.0, abs=1e-9)
    line = "1m: 19 of 40 planned steps (measured 2 s/step, 3 s reserved for eval and save)"
    assert f"| time budget | {line} |" in (out / "README.md").read_text(encoding="utf-8")
    assert f"time budget {line}" in capsys.readouterr().out


def test_a_budget_that_is_not_needed_changes_nothing(tiny_dir, data_file, tmp_path, clock):
    plain = run(tiny_dir, data_file, tmp_path / "plain", "train.epochs=1.2")
    timed = run(tiny_dir, data_file, tmp_path / "timed", "train.epochs=1.2", "train.max_time=1h",
                callbacks=[Tick(clock)])
    for key in ("loss", "learning_rate"):
        assert logged(timed, key) == logged(plain, key)
        assert len(logged(plain, key)) == 12
    readme = (timed / "README.md").read_text(encoding="utf-8")
    assert "| time budget | 1h: all 12 planned steps fit (measured 2 s/step" in readme


@pytest.mark.parametrize("profile, seconds", [("speeds up", 60), ("slows down", 80)])
def test_replanning_keeps_the_lr_falling(tiny_dir, data_file, tmp_path, clock, profile, seconds):
    if profile == "speeds up":  # first planned 10 steps, then 15 once decay has begun
        tick = Tick(clock, step=lambda n: 4.0 if n <= 5 else 1.0)
    else:  # first planned 38 steps, then 21
        tick = Tick(clock, step=lambda n: 1.0 if n <= 9 else 4.0)
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=40", f"train.max_time={seconds}",
              callbacks=[tick])
    plans = tick.plans[2:]  # from the first plan, made before step 3
    changes = [b - a for a, b in zip(plans, plans[1:]) if b != a]
    assert changes and all(c > 0 if profile == "speeds up" else c < 0 for c in changes)
    steps = [s for s, _ in logged(out, "learning_rate")]
    assert steps == list(range(1, tick.plans[-1] + 1)) and steps[-1] < 40  # stopped where planned
    lrs = [lr for _, lr in logged(out, "learning_rate")]
    assert_warmup_then_decay(lrs)  # a plan that grows after the decay began does not raise the lr
    assert tick.end_lr == pytest.approx(0.0, abs=1e-9)
    assert clock.now - 1000 + budget.FIXED_SAVE_SECONDS <= seconds


def test_evaluations_are_measured_and_reserved(tiny_dir, data_file, tmp_path, clock):
    tick = Tick(clock, eval_batch=1.0)  # 8 held-out rows at batch 4: 2 s an eval
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=40", "train.max_time=60",
              "data.val_size=8", "train.eval_steps=5", callbacks=[tick])
    # 20 + 14 × 2 s of steps + 3 evals × 2 s + ~3 s of final save <= 60; a 16th step would not fit
    assert [s for s, _ in logged(out, "eval_loss")] == [5, 10, 15]
    assert logged(out, "loss")[-1][0] == 15
    assert "60s: 15 of 40 planned steps (measured 2 s/step, 9 s reserved" in (out / "README.md").read_text()


def test_a_budget_too_short_still_runs_a_few_steps(tiny_dir, data_file, tmp_path, clock, capsys):
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=40", "train.max_time=5",
              callbacks=[Tick(clock)])
    assert [s for s, _ in logged(out, "loss")] == [1, 2, 3]
    assert "time budget 5s: too short, ran the minimum 3 of 40 planned steps" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_continues_the_planned_schedule(tiny_dir, data_file, tmp_path, clock):
    common = ["train.max_steps=40", "train.save_strategy=steps", "train.save_steps=4"]
    out = tmp_path / "run"
    run(tiny_dir, data_file, out, *common, callbacks=[StopAt(6)])  # a checkpoint without a budget
    second = Tick(clock)
    run(tiny_dir, data_file, out, *common, "train.max_time=1m", "train.resume=auto",
        callbacks=[second, StopAt(10)])
    before = dict(logged(out, "learning_rate"))
    assert second.plans[-1] < 40
    third = Tick(clock)
    run(tiny_dir, data_file, out, *common, "train.max_time=1m", "train.resume=auto", callbacks=[third])
    after = logged(out, "learning_rate")
    assert [s for s, _ in after] == list(range(1, third.plans[-1] + 1))  # every step once
    assert dict(after)[9] == before[9]  # the warped schedule came back from checkpoint-8
    assert_warmup_then_decay([lr for _, lr in after])
    assert third.end_lr == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_the_reference_precompute_is_measured_and_planned_for(tiny_dir, tmp_path, clock, monkeypatch, capsys,
                                                              stage):
    from tunelab.train import preference

    compute, make = preference.precompute_reference, budget.from_config

    def slow_reference(*args, **kwargs):  # 30 s on the budget's clock
        clock.now += 30.0
        return compute(*args, **kwargs)

    made = []
    monkeypatch.setattr(preference, "precompute_reference", slow_reference)
    monkeypatch.setattr(budget, "from_config", lambda train_cfg: made.append(make(train_cfg)) or made[-1])
    data = write_jsonl(tmp_path / "data.jsonl", pair_rows() if stage == "dpo" else feedback_rows())
    out = run_stage(stage, tiny_dir, data, tmp_path / "run", "method.name=full", "train.max_steps=40",
                    "train.max_time=45", callbacks=[Tick(clock, step=1.0, first=2.0)])
    (plan,) = made
    assert plan.before == {f"{stage} reference log-probs": 30.0} and plan.startup == 30.0
    # planned before step 3: 30 s of reference and 3 s of steps spent, ~3 s for the final save -> 10 steps
    assert plan.planned == 10 and [r["step"] for r in records(out) if "loss" in r] == list(range(1, 11))
    line = (f"45s: 10 of 40 planned steps (measured 1 s/step, 30 s before the first step "
            f"(30 s {stage} reference log-probs), 3 s reserved for eval and save)")
    assert f"time budget {line}" in capsys.readouterr().out
    assert f"| time budget | {line} |" in (out / "README.md").read_text(encoding="utf-8")
