"""What the New-run page shows before launch, each from the library function that owns it.

- the data: ``tunelab.data.commands.stats`` (``tunelab data stats``: counts, formats, token
  lengths, how many exceed cutoff_len) and a rendered example from
  ``tunelab.data.render.encode`` (what the trainer encodes) with its supervised tokens marked;
- the machine: ``tunelab.env.environment`` (``tunelab env``: measured rates, precision,
  threads), measured once per studio in the background;
- memory: ``tunelab.export.estimate`` (``tunelab estimate``), for the methods it models.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from tunelab.errors import TunelabError
from tunelab.studio.workspace import Workspace

PREVIEW_ROWS = 2
LIBRARY_LOCK = threading.RLock()
"""Held while request threads first touch transformers: its lazy imports are not thread-safe
(two threads importing at once got "cannot import name 'AutoTokenizer'")."""


def warm_up() -> None:
    """Import what the panels and chat use, once, holding the lock their requests wait for."""
    with LIBRARY_LOCK:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

        import tunelab.data.commands  # noqa: F401
        import tunelab.export.estimate  # noqa: F401
        import tunelab.models  # noqa: F401


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str, template: str | None):
    from tunelab.models import load_tokenizer

    return load_tokenizer(spec, template=template)


def tokenizer_for(ws: Workspace, model: str, template: str | None):
    spec = ws.model_spec(model)
    if template and template.endswith(".jinja"):
        template = str(ws.path(template, "model.template", must_exist=True))
    return _tokenizer(spec, template or None)


def _absolute(ws: Workspace, specs: list[str], dataset_dir: str | None) -> tuple[list[str], str | None]:
    """Dataset specs checked inside the workspace, as the library (running anywhere) can read them."""
    folder = str(ws.path(dataset_dir, "data.dataset_dir", must_exist=True)) if dataset_dir else None
    out = []
    for spec in specs:
        ws.dataset_files(spec, dataset_dir)
        path = ws.path(spec, "data.train")
        out.append(str(path) if path.exists() else spec)  # a registered name stays a name
    return out, folder


def data_stats(ws: Workspace, model: str, template: str | None, specs: list[str], dataset_dir: str | None,
               cutoff_len: int) -> dict[str, Any]:
    """``tunelab data stats`` for the chosen datasets under the chosen model's chat template."""
    from tunelab.data.commands import stats

    if not specs:
        raise TunelabError("data.train: pick at least one dataset")
    absolute, folder = _absolute(ws, specs, dataset_dir)
    with LIBRARY_LOCK:
        result = stats(absolute, tokenizer_for(ws, model, template), folder, cutoff_len)
    result["datasets"] = dict(zip(specs, result["datasets"].values()))
    return result


def segments(tokenizer: Any, example: dict[str, list[int]]) -> list[dict[str, Any]]:
    """An encoded example as runs of text, each supervised (in the loss) or not."""
    from tunelab.data.render import IGNORE_INDEX

    ids, labels = example["input_ids"], example["labels"]
    out, start = [], 0
    while start < len(ids):
        learn = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == learn:
            end += 1
        out.append({"text": tokenizer.decode(ids[start:end]), "learn": learn, "tokens": end - start})
        start = end
    return out


def preview(ws: Workspace, model: str, template: str | None, spec: str, dataset_dir: str | None,
            cutoff_len: int, mask_history: bool, train_on_prompt: bool, n: int = PREVIEW_ROWS) -> list[dict]:
    """The first ``n`` conversations as the trainer encodes them, supervised runs marked."""
    from tunelab.data.registry import load_dataset
    from tunelab.data.render import encode

    (absolute,), folder = _absolute(ws, [spec], dataset_dir)
    with LIBRARY_LOCK:
        tokenizer = tokenizer_for(ws, model, template)
    out = []
    for conv in load_dataset(absolute, folder)[:n]:
        example = encode(tokenizer, conv, cutoff_len, "truncate", mask_history, train_on_prompt)
        source = _short_source(ws, conv.source)
        if example is None:
            out.append({"source": source, "dropped": f"no answer token within cutoff_len={cutoff_len}"})
            continue
        supervised = sum(label != -100 for label in example["labels"])
        out.append({"source": source, "tokens": len(example["input_ids"]), "supervised": supervised,
                    "segments": segments(tokenizer, example)})
    return out


def _short_source(ws: Workspace, source: str | None) -> str | None:
    if not source:
        return source
    root = str(ws.root) + "/"
    return source[len(root):] if source.startswith(root) else source


class Hardware:
    """``tunelab env``'s decisions, measured once in a background thread."""

    def __init__(self) -> None:
        self._info: dict[str, Any] | None = None
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._measure, name="tunelab-studio-env", daemon=True)
            self._thread.start()

    def _measure(self) -> None:
        try:
            from tunelab.env import environment

            with LIBRARY_LOCK:
                self._info = environment()
        except Exception as exc:  # the page says it, the studio keeps working
            self._error = f"{type(exc).__name__}: {exc}"

    def view(self) -> dict[str, Any]:
        self.start()
        if self._error:
            return {"ready": False, "error": self._error}
        if self._info is None:
            return {"ready": False}
        probe, decisions = self._info["probe"], self._info["decisions"]
        return {"ready": True, "cpu": probe["cpu_model"], "kind": probe["kind"], "gpu": probe["gpu"],
                "cores": probe["cores_available"], "gflops": probe["gflops"], "decisions": decisions,
                "versions": {k: v for k, v in self._info["versions"].items()
                             if k in ("python", "tunelab", "torch", "transformers", "peft")}}

    @property
    def train_precision(self) -> str:
        if self._info is None:
            return "fp32"
        return self._info["decisions"]["train_precision"]["value"]


def memory_estimate(ws: Workspace, model: str, method: str, batch: int, seq: int, r: int,
                    gradient_checkpointing: bool, precision: str, freeze_layers: int = 2) -> dict[str, Any]:
    """``tunelab estimate`` for the run's settings, or why there is none for this method."""
    from tunelab.export.estimate import METHODS, estimate, load_config, model_shape

    family = "lora" if method in ("dora", "rslora", "pissa", "olora", "loraplus") else method
    if family not in METHODS:
        return {"available": False, "reason": f"no memory model for method '{method}' "
                                              f"(tunelab estimate covers {', '.join(METHODS)})"}
    spec = ws.model_spec(model)
    with LIBRARY_LOCK:
        shape = model_shape(load_config(spec))
        result = estimate(shape, family, "fp32" if family == "qlora" else precision, batch, seq,
                          gradient_checkpointing, r=r, freeze_layers=freeze_layers)
    return {"available": True, **result.to_dict()}
