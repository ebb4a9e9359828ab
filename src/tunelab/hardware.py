"""What runs fast on this machine, decided once: precision and threads.

Training, generation, evaluation, serving and the benchmarks all ask this module,
so "bf16 or fp32?" and "how many threads?" have one answer per process.

- ``probe()``: CPU model and flags, torch's CPU capability, the cores this process
  may use and how busy the other ones are, the GPU, and a **measured** matmul rate
  in fp32, bf16 and fp16 on shapes like a small model's (cached per machine, torch
  version and thread count in ``$TUNELAB_CACHE/hardware``).
- ``training_precision(precision, bf16)``: whether training uses bf16 autocast.
- ``inference_dtype(precision)``: the weights dtype for generation and scoring.
- ``choose_threads()`` / ``apply_threads()``: the intra-op thread count.

Flags are not enough: torch on an AVX2-only CPU runs bf16 matmuls ~100x slower
than fp32, and a CPU whose flags promise avx512_bf16 can still be slow for a given
torch build. So the decision comes from the measured rates, never from flags alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

FAST_RATIO = 1.2
"""bf16 is used automatically only where it measured at least this much faster than fp32."""
SLOW_RATIO = 0.5
"""An explicit bf16/fp16 request below this fraction of the fp32 rate is warned about."""
MATMUL_SHAPE = (256, 576, 1536)
"""(tokens, in, out): a SmolLM2-sized MLP projection; small enough to time in ~0.1 s per dtype."""
FLAG_NAMES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")
PROBE_VERSION = 1


@dataclass
class Probe:
    """What this machine is and how fast it multiplies, in each precision."""

    cpu_model: str
    flags: dict[str, bool]
    capability: str
    """``torch.backends.cpu.get_cpu_capability()``: the kernels torch dispatches to."""
    logical_cpus: int
    cores_available: int
    """CPUs this process may run on (``os.sched_getaffinity``)."""
    other_busy_cores: float
    """Cores kept busy by other processes over a short sample (0 = idle machine)."""
    loadavg: float
    gpu: str | None
    gpu_bf16: bool
    gpu_fp16: bool
    gflops: dict[str, float]
    """Measured matmul GFLOP/s on CPU for fp32, bf16, fp16 (best of several)."""
    gflops_threads: int
    torch_version: str
    cached: bool = False

    @property
    def kind(self) -> str:
        """A short name for the CPU kind, as the benchmarks report it."""
        if self.bf16_fast:
            return f"{self.capability} with fast bf16"
        return f"{self.capability}, bf16 slow"

    @property
    def bf16_ratio(self) -> float:
        return self.gflops["bf16"] / max(self.gflops["fp32"], 1e-9)

    @property
    def bf16_fast(self) -> bool:
        return self.bf16_ratio >= FAST_RATIO

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind, "bf16_ratio": self.bf16_ratio}


# ---------------------------------------------------------------- reading the machine

def cpu_model_and_flags() -> tuple[str, dict[str, bool]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, {name: name in flags for name in FLAG_NAMES}


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _own_jiffies() -> int:
    try:
        parts = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime of all our threads
    except (OSError, IndexError, ValueError):
        return 0


class LoadMonitor:
    """Cores kept busy by *other* processes between two ``sample()`` calls (no sleeping)."""

    def __init__(self) -> None:
        self._last = (_cpu_jiffies(), _own_jiffies())

    def sample(self) -> float:
        machine, own = _cpu_jiffies(), _own_jiffies()
        (machine0, own0), self._last = self._last, (machine, own)
        if machine is None or machine0 is None or machine[1] <= machine0[1]:
            return 0.0
        busy = (machine[0] - machine0[0]) - (own - own0)
        return max(0.0, (os.cpu_count() or 1) * busy / (machine[1] - machine0[1]))


def other_busy_cores(seconds: float = 0.25) -> float:
    """How many cores other processes kept busy over ``seconds`` (0.0 when unknown)."""
    monitor = LoadMonitor()
    time.sleep(seconds)
    return monitor.sample()


def gpu_info() -> tuple[str | None, bool, bool]:
    import torch

    if not torch.cuda.is_available():
        return None, False, False
    return torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported(), True


def measure_matmul(dtype_name: str, budget: float = 0.12, shape=MATMUL_SHAPE) -> float:
    """Best GFLOP/s of one ``shape`` matmul in ``dtype_name`` within about ``budget`` seconds.

    One warm-up call, then repeats until the budget is spent; the best is kept, so a
    moment of interference does not lower the figure. A very slow dtype (bf16 on
    AVX2: ~1 GFLOP/s) stops after the first timed call.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    m, k, n = shape
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    flop = 2 * m * k * n
    with torch.inference_mode():
        a @ b
        best, deadline = float("inf"), time.perf_counter() + budget
        while True:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
            if time.perf_counter() > deadline:
                break
    return flop / best / 1e9


# ---------------------------------------------------------------- the probe, cached

def _cache_key(model: str, flags: dict[str, bool], threads: int) -> str:
    import torch

    env = {k: os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    text = json.dumps([PROBE_VERSION, model, flags, torch.__version__, threads, env,
                       platform.node()], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _cache_path(key: str) -> Path:
    from tunelab.models.builtin import cache_dir

    return cache_dir() / "hardware" / f"{key}.json"


def measure_rates(threads: int | None = None) -> dict[str, float]:
    """Matmul GFLOP/s in fp32, bf16 and fp16 with ``threads`` intra-op threads (now, uncached)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return {name: measure_matmul(name) for name in ("fp32", "bf16", "fp16")}
    finally:
        torch.set_num_threads(before)


_PROBE: Probe | None = None


def probe(refresh: bool = False) -> Probe:
    """The machine's probe: cheap facts read now, matmul rates from the cache when present."""
    global _PROBE
    if _PROBE is not None and not refresh:
        return _PROBE
    import torch

    model, flags = cpu_model_and_flags()
    threads = torch.get_num_threads()
    path = _cache_path(_cache_key(model, flags, threads))
    rates, cached = None, False
    if not refresh and path.is_file():
        try:
            rates, cached = json.loads(path.read_text(encoding="utf-8"))["gflops"], True
        except (OSError, ValueError, KeyError):
            rates = None
    if rates is None:
        rates = measure_rates()
        _save_rates(path, rates)
    gpu, gpu_bf16, gpu_fp16 = gpu_info()
    _PROBE = Probe(
        cpu_model=model, flags=flags, capability=torch.backends.cpu.get_cpu_capability(),
        logical_cpus=os.cpu_count() or 1, cores_available=cores_available(),
        other_busy_cores=round(other_busy_cores(0.1), 2), loadavg=os.getloadavg()[0],
        gpu=gpu, gpu_bf16=gpu_bf16, gpu_fp16=gpu_fp16, gflops=rates, gflops_threads=threads,
        torch_version=torch.__version__, cached=cached)
    return _PROBE


def _save_rates(path: Path, rates: dict[str, float]) -> None:
    from tunelab.io import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"gflops": rates, "measured_at": time.time()}))
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


# ---------------------------------------------------------------- decisions

@dataclass
class Decision:
    """One precision decision and the reason, as ``tunelab env`` and run READMEs show it."""

    value: str
    """``bf16``, ``fp16`` or ``fp32``."""
    reason: str
    warning: str | None = None


def _rates_text(p: Probe, half: str = "bf16") -> str:
    return (f"{half} matmul {p.gflops[half]:.1f} GFLOP/s vs fp32 {p.gflops['fp32']:.1f} "
            f"on this CPU ({p.capability})")


def training_precision(precision: str = "auto", bf16: Any = "auto", p: Probe | None = None) -> Decision:
    """Does training run under bf16 autocast here? ``bf16`` is train.bf16 (auto/true/false/force)."""
    import torch

    if bf16 is False or precision == "fp32":
        return Decision("fp32", "train.bf16=false" if bf16 is False else "model.precision=fp32")
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Decision("bf16", "GPU supports bf16")
        return Decision("fp32", "GPU without bf16 (model.precision=fp16 loads fp16 weights)")
    if bf16 == "force":
        return Decision("bf16", "train.bf16=force")
    p = p or probe()
    if bf16 == "auto":
        if p.bf16_fast:
            return Decision("bf16", f"measured faster: {_rates_text(p)}")
        return Decision("fp32", f"bf16 not measured faster: {_rates_text(p)}")
    if p.bf16_ratio < SLOW_RATIO:  # bf16: true on a CPU where it is slow
        return Decision("fp32", f"bf16 measured {1 / max(p.bf16_ratio, 1e-9):.0f}x slower",
                        warning=f"train.bf16=true, but {_rates_text(p)}: training in fp32 instead "
                                "(train.bf16=force keeps bf16)")
    return Decision("bf16", "train.bf16=true")


def inference_dtype(precision: str = "auto", p: Probe | None = None) -> Decision:
    """Weights dtype for generation, evaluation, BERTScore and serving.

    ``auto`` on a CPU is fp32: decoding a small model is bound by memory traffic and
    per-token overhead, and fp32 gives the answers the fp32 master weights were
    trained to give. An explicit bf16/fp16 is kept (it is also a memory choice) but
    warned about where this CPU measured it much slower than fp32.
    """
    import torch

    if precision == "fp32":
        return Decision("fp32", "model.precision=fp32")
    if torch.cuda.is_available():
        if precision in ("bf16", "fp16"):
            return Decision(precision, f"model.precision={precision}")
        return (Decision("bf16", "GPU supports bf16") if torch.cuda.is_bf16_supported()
                else Decision("fp16", "GPU without bf16"))
    if precision == "auto":
        return Decision("fp32", "CPU: fp32 weights (half precision is not decode-bound faster)")
    p = p or probe()
    if p.gflops[precision] < SLOW_RATIO * p.gflops["fp32"]:
        return Decision(precision, f"model.precision={precision}",
                        warning=f"model.precision={precision}, but {_rates_text(p, precision)}: "
                                "expect it to be much slower (model.precision=auto uses fp32 here)")
    return Decision(precision, f"model.precision={precision}")


# ---------------------------------------------------------------- threads

THREADS_ENV = "TUNELAB_THREADS"


def requested_threads(value: Any = None) -> int | None:
    """An explicit thread count from ``value`` or ``$TUNELAB_THREADS`` (None = decide)."""
    raw = value if value not in (None, "", "auto") else os.environ.get(THREADS_ENV, "")
    if raw in (None, "", "auto"):
        return None
    try:
        threads = int(raw)
    except (TypeError, ValueError):
        raise TunelabError(f"threads: {raw!r} is not a whole number (--threads or ${THREADS_ENV})") from None
    if threads < 1:
        raise TunelabError(f"threads: {threads} must be >= 1 (--threads or ${THREADS_ENV})")
    return threads


@dataclass
class ThreadChoice:
    threads: int
    reason: str
    busy: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def choose_threads(value: Any = None, busy: float | None = None, cores: int | None = None) -> ThreadChoice:
    """Intra-op threads: the cores this process may use minus those other processes keep busy.

    OpenMP parallel regions wait for their slowest thread; on 2 cores with one other
    busy process, 2 threads made training steps 20x slower than 1 thread (the second
    thread is descheduled half the time). So a core counts as taken when another
    process used at least half of it over the sample.
    """
    explicit = requested_threads(value)
    if explicit is not None:
        source = "--threads" if value not in (None, "", "auto") else f"${THREADS_ENV}"
        return ThreadChoice(explicit, f"set by {source}")
    cores = cores or cores_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1:  # torchrun siblings share the cores: split them, ignore each other's load
        return ThreadChoice(max(1, cores // local), f"{local} processes share {cores} core(s)")
    busy = other_busy_cores() if busy is None else busy
    taken = int(busy + 0.5)
    threads = max(1, min(cores, cores - taken))
    why = (f"{cores} core(s) available, other processes busy on {busy:.1f}"
           + ("" if threads == cores else f": using {threads}"))
    return ThreadChoice(threads, why, busy)


_APPLIED: ThreadChoice | None = None


def apply_threads(value: Any = None, force: bool = False) -> ThreadChoice:
    """Set torch's intra-op threads and return the choice.

    An explicit count (``value``, ``$TUNELAB_THREADS``) is applied every time. Otherwise
    the count is decided from the load once per process (again with ``force``): later
    calls keep what was decided, or what the caller has since set with torch itself.
    """
    global _APPLIED
    if _APPLIED is not None and not force and requested_threads(value) is None:
        return _APPLIED
    import torch

    choice = choose_threads(value)
    torch.set_num_threads(choice.threads)
    _APPLIED = choice
    return choice


def set_threads(value: Any) -> ThreadChoice:
    """An explicit thread count for this process and the processes it starts (``--threads``)."""
    threads = requested_threads(value)
    if threads is None:
        return apply_threads(force=True)
    os.environ[THREADS_ENV] = str(threads)
    return apply_threads(force=True)


def applied_threads() -> ThreadChoice | None:
    return _APPLIED


def warn(text: str) -> None:
    """One warning line on stderr (main process only), as every decision warning is shown."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)
