"""``train.max_time``: fit the whole schedule into a wall-clock budget, measured as it goes.

``TimeBudget`` times every optimizer step (the first one of a process is left out: it
pays for allocation and warm-up), every evaluation and every checkpoint, and after 1, 2,
4 and then every 8 measured steps re-plans the number of optimizer steps T: the largest
T, at most what epochs/max_steps give, for which

    startup + training so far + (T - done) × s/step + evals and checkpoints still to come
    + final save <= budget.

Startup is measured at the first step: reading the data, loading the model and, for the
dpo and kto stages, the reference log-probs computed once before training (the stage
reports how long that took, so the time-budget line names it).

The learning-rate schedule is time-warped rather than rebuilt: scheduler step x maps to a
position u(x) on the configured schedule, linear from the current point (x0, u0) to
(T, end). So warm-up and decay end exactly at the re-planned last step, the LR is
continuous at every re-plan, and after warm-up it never rises, whether a re-plan
shortens the run or (as measurements improve) lengthens it again. Planned once at step
0, this is exactly the schedule built for T steps.

In a multi-process run every rank adopts the main process's plan (a broadcast at the
re-plan steps, which all ranks reach together), so all of them stop at the same step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from tunelab.errors import TunelabError

clock: Callable[[], float] = time.monotonic  # tests put a fake clock here

MIN_STEPS = 3  # one warm-up step (not measured), then at least two that are
WINDOW = 32  # step time: the mean of the latest 32 steps or of the latest 8, whichever is
RECENT = 8  # slower, so a machine that slows down is noticed soon (one that speeds up, later)
FIXED_SAVE_SECONDS = 3.0  # tokenizer, config, loss plot, README
WRITE_BYTES_PER_SECOND = 50e6  # a slow disk: better to finish early than late
EVAL_VS_TRAIN = 0.5  # an eval batch (forward only, ~1/3 of a train micro-batch), with margin


def fit_steps(done: int, limit: int, seconds_left: float, step_seconds: float,
              cost: Callable[[int], float]) -> int:
    """The largest T in (done, limit] with (T - done) × step_seconds + cost(T) <= seconds_left,
    or ``done`` when not even one more step fits. ``cost`` must not decrease with T."""
    def fits(total: int) -> bool:
        return (total - done) * step_seconds + cost(total) <= seconds_left

    lo, hi = done, limit
    while lo < hi:  # fits(lo) holds, or lo == done
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def events(done: int, end: int, every: int) -> int:
    """Evaluations (or checkpoints) every ``every`` steps in (done, end], plus one at ``end``."""
    if not every:
        return 0
    return end // every - done // every + (1 if end % every else 0)


def _agree(values: list) -> list:
    """The main process's ``values`` on every rank (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def _lambda_scheduler(scheduler: Any):
    inner = scheduler
    while inner is not None and not hasattr(inner, "lr_lambdas") and hasattr(inner, "scheduler"):
        inner = inner.scheduler  # accelerate / DeepSpeed wrappers
    if not hasattr(inner, "lr_lambdas"):
        raise TunelabError(f"train.max_time: the learning-rate scheduler ({type(scheduler).__name__}) "
                           "cannot be re-planned; drop train.max_time or the scheduler in the launcher config")
    return inner


def _mean(values) -> float:
    return sum(values) / len(values)


class TimeBudget(TrainerCallback, ExportableState):
    """Re-plans the step count and warps the LR schedule so the run fits ``seconds``.

    The clock starts when the object is made (``train`` makes it first thing, so loading
    the data and the model counts). The warp ``[x0, u0, T]`` is stored in each
    checkpoint's trainer_state.json, so a resumed run continues the LR curve where it was
    and then gets a fresh budget for the rest of the schedule.
    """

    def __init__(self, seconds: float, text: str | None = None, eval_rows: int = 0,
                 clock_fn: Callable[[], float] | None = None):
        self.seconds = float(seconds)
        self.text = text or f"{seconds:g}s"
        self.eval_rows = eval_rows
        self.clock = clock_fn or clock
        self.began = self.clock()
        self.anchor: list | None = None  # [x0, u0, T]
        self.configured = 0  # the steps epochs/max_steps give: the plan never exceeds it
        self.planned = 0
        self.steps: deque[float] = deque(maxlen=WINDOW)
        self.evals: list[float] = []
        self.saves: list[float] = []
        self.step_seconds: float | None = None
        self.reserved = 0.0  # eval and save seconds over the run, at the latest plan
        self.startup = 0.0  # seconds from the clock's start to the first step, measured there
        self.before: dict[str, float] = {}  # named, measured parts of the startup (see ``record``)
        self.short = False
        self._measured = 0
        self._planned_at = 0
        self._mark: float | None = None
        self._train_began = self.began
        self._first_done = False
        self._scheduler = None
        self._originals: list = []

    def record(self, seconds: dict[str, float]) -> None:
        """Note named work done before training, timed on ``clock`` (the dpo reference log-probs):
        it is part of the measured startup, and the time-budget line says how much it took."""
        self.before.update(seconds)

    def state(self) -> dict:
        return {"args": {"seconds": self.seconds, "text": self.text}, "attributes": {"anchor": self.anchor}}

    # -- the LR warp ------------------------------------------------------------------

    def position(self, x: float) -> float:
        """Where scheduler step ``x`` sits on the configured schedule (0 .. configured)."""
        if self.anchor is None:
            return float(x)
        x0, u0, end = self.anchor
        return min(float(self.configured), u0 + (self.configured - u0) * (x - x0) / (end - x0))

    def _install(self) -> None:
        # Plain functions: LambdaLR's state_dict stores them as None, so checkpoints stay
        # loadable with weights_only=True; the anchor travels in trainer_state.json instead.
        self._scheduler.lr_lambdas = [lambda x, f=f: f(self.position(x)) for f in self._originals]

    def replan(self, done: int, total: int) -> None:
        """From step ``done`` on, reach the schedule's end at step ``total``."""
        self.anchor = [done, self.position(done), total]
        self._install()

    # -- measuring and planning -------------------------------------------------------

    def _costs(self, args, state, model, train_dataloader) -> None:
        world = max(1, args.world_size)
        self.eval_every = state.eval_steps if self.eval_rows and args.eval_strategy == "steps" else 0
        self.eval_batches = math.ceil(self.eval_rows / (args.per_device_eval_batch_size * world))
        self.accum = args.gradient_accumulation_steps
        per_epoch = 0
        if train_dataloader is not None and hasattr(train_dataloader, "__len__"):
            per_epoch = max(1, math.ceil(len(train_dataloader) / self.accum))
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        self.save_every = {"steps": state.save_steps, "epoch": per_epoch}.get(strategy, 0)
        params = list(model.parameters()) if model is not None else []
        trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
        moments = sum(p.numel() * 8 for p in params if p.requires_grad)  # AdamW, fp32
        weights = trainable if hasattr(model, "peft_config") else sum(p.numel() * p.element_size() for p in params)
        self.final_save = FIXED_SAVE_SECONDS + weights / WRITE_BYTES_PER_SECOND
        self.checkpoint_guess = FIXED_SAVE_SECONDS + (weights + moments) / WRITE_BYTES_PER_SECOND

    def plan(self, done: int) -> int:
        """The step count that fits what is left of the budget, from the measurements so far."""
        step = self.step_seconds = max(_mean(self.steps), _mean(list(self.steps)[-RECENT:]))
        per_eval = _mean(self.evals) if self.evals else EVAL_VS_TRAIN * self.eval_batches * step / self.accum
        per_save = _mean(self.saves) if self.saves else self.checkpoint_guess

        def cost(total: int) -> float:
            return (events(done, total, self.eval_every) * per_eval
                    + events(done, total, self.save_every) * per_save + self.final_save)

        left = self.seconds - self.startup - (self.clock() - self._train_began)
        fit = fit_steps(done, self.configured, left, step, cost)
        floor = max(done + 1, min(self.configured, MIN_STEPS))
        total = max(fit, floor)
        self.short = fit < floor
        self.reserved = sum(self.evals) + sum(self.saves) + cost(total)
        return total

    def _lap(self) -> float:
        now = self.clock()
        lap, self._mark = now - self._mark, now
        return lap

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, train_dataloader=None,
                       **kwargs):
        self._train_began = self.clock()
        self.startup = self._train_began - self.began
        self.configured = self.planned = state.max_steps
        self._costs(args, state, model, train_dataloader)
        self._scheduler = _lambda_scheduler(lr_scheduler)
        self._originals = list(self._scheduler.lr_lambdas)
        name = type(self).__name__
        saved = (state.stateful_callbacks.get(name) or {}).get("attributes", {}).get("anchor")
        state.stateful_callbacks.setdefault(name, self.state())  # a checkpoint made without a budget
        end = min(saved[2], self.configured) if saved else 0
        if state.global_step < end:  # resumed: continue the warped schedule
            self.anchor = [saved[0], saved[1], end]
            self._install()
            state.max_steps = self.planned = end
        self._mark = self._train_began

    def on_step_begin(self, args, state, control, **kwargs):
        n = self._measured
        if n < 1 or not (n & (n - 1) == 0 or n % RECENT == 0) or self._planned_at == n:
            return
        self._planned_at = n
        total, short = _agree([self.plan(state.global_step), self.short])
        self.short = short
        if total != state.max_steps:
            self.replan(state.global_step, total)
            state.max_steps = self.planned = total

    def on_step_end(self, args, state, control, **kwargs):
        lap = self._lap()
        if self._first_done:
            self.steps.append(lap)
            self._measured += 1
        self._first_done = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, **kwargs):
        if self._mark is not None:
            self.evals.append(self._lap())

    def on_save(self, args, state, control, **kwargs):
        if self._mark is not None:
            self.saves.append(self._lap())

    def on_train_end(self, args, state, control, **kwargs):
        self._mark = None  # an evaluation after training is not part of the plan

    def describe(self) -> str:
        """One line for the log and the run README: steps planned against steps configured, and why."""
        head = f"time budget {self.text}"
        if self.step_seconds is None:
            return f"{head}: {self.planned} of {self.configured} planned steps (too few to measure)"
        why = (f"measured {self.step_seconds:.3g} s/step, {self._startup_text()}"
               f"{self.reserved:.0f} s reserved for eval and save")
        if self.short and self.planned <= MIN_STEPS:
            return f"{head}: too short, ran the minimum {self.planned} of {self.configured} planned steps ({why})"
        if self.short:
            return f"{head}: ran out at {self.planned} of {self.configured} planned steps ({why})"
        if self.planned < self.configured:
            return f"{head}: {self.planned} of {self.configured} planned steps ({why})"
        return f"{head}: all {self.configured} planned steps fit ({why})"

    def _startup_text(self) -> str:
        """``"12 s before the first step (10 s dpo reference log-probs), "``; empty when nothing to say."""
        if round(self.startup) < 1 and not self.before:
            return ""
        parts = ", ".join(f"{seconds:.0f} s {name}" for name, seconds in self.before.items())
        return f"{self.startup:.0f} s before the first step" + (f" ({parts})" if parts else "") + ", "


def from_config(train_cfg) -> TimeBudget | None:
    """The budget ``train.max_time`` asks for (its clock starts now), or None."""
    from tunelab.config import parse_duration

    value = train_cfg.max_time
    if value is None:
        return None
    return TimeBudget(parse_duration(value), value if isinstance(value, str) else f"{value:g}s")
