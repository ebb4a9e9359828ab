"""Keep the intra-op thread count right while a run trains and the machine's load changes.

A run that starts on an idle 2-core machine uses 2 threads; if another process then
takes a core, every OpenMP region waits on a descheduled thread and steps become
many times slower. Every ``interval`` seconds this callback looks at how busy the
other processes kept the cores since the last look and re-applies
``tunelab.hardware.choose_threads``. An explicit ``--threads``/``$TUNELAB_THREADS``
is never changed.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback

from tunelab import hardware


class ThreadGovernor(TrainerCallback):
    def __init__(self, interval: float = 30.0, clock=time.monotonic, say=print):
        self.interval, self.clock, self.say = interval, clock, say
        self.monitor = hardware.LoadMonitor()
        self.last = clock()
        self.changes: list[tuple[int, int]] = []  # (step, threads)

    def on_step_end(self, args, state, control, **kwargs):
        if hardware.requested_threads() is not None or self.clock() - self.last < self.interval:
            return
        import torch

        self.last = self.clock()
        choice = hardware.choose_threads(busy=self.monitor.sample())
        if choice.threads != torch.get_num_threads():
            torch.set_num_threads(choice.threads)
            self.changes.append((state.global_step, choice.threads))
            if state.is_world_process_zero:
                self.say(f"threads: {choice.threads} from step {state.global_step} ({choice.reason})")
