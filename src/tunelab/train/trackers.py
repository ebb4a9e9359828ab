"""Experiment trackers (``train.report_to``) through transformers' own integrations.

Each tracker writes inside the run folder, offline, unless you point it elsewhere
with its own environment variable (which then wins):

| tracker | where | set here (if unset) |
|---|---|---|
| ``tensorboard`` | ``RUN/tb/`` (event files) | ``TENSORBOARD_LOGGING_DIR`` |
| ``wandb`` | ``RUN/wandb/`` (offline run; ``wandb sync`` uploads it later) | ``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_PROJECT=tunelab`` |
| ``mlflow`` | ``RUN/mlruns/`` (a local file store; ``mlflow ui --backend-store-uri RUN/mlruns``) | ``MLFLOW_TRACKING_URI``, ``MLFLOW_ALLOW_FILE_STORE=true``, ``MLFLOW_EXPERIMENT_NAME=tunelab`` |

A tracker whose package is missing is one line naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tunelab.errors import TunelabError

# tracker -> (modules any one of which makes it work, the tunelab extra that installs it)
PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
            "wandb": (("wandb",), "wandb"), "mlflow": (("mlflow",), "mlflow")}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check(report_to: str | list[str]) -> list[str]:
    """The trackers asked for, after checking each one's package (a one-line error if missing)."""
    trackers = [] if report_to in ("none", None) else list(report_to)
    for name in trackers:
        modules, extra = PACKAGES[name]
        if not any(_installed(m) for m in modules):
            raise TunelabError(f"train.report_to: {name} needs the '{modules[0]}' package: "
                               f"pip install 'tunelab[{extra}]'")
    return trackers


_SET: dict[str, str] = {}  # variables this process set, so a later run may set them again


def _point(variable: str, value: str) -> None:
    """Set ``variable`` unless the user set it (a value we set for an earlier run is replaced)."""
    if variable not in os.environ or os.environ[variable] == _SET.get(variable):
        os.environ[variable] = _SET[variable] = value


def configure(report_to: str | list[str], out: Path) -> list[str]:
    """Point each tracker at the run folder ``out``; returns TrainingArguments' ``report_to``."""
    trackers = check(report_to)
    out = Path(out).resolve()
    if "tensorboard" in trackers:
        _point("TENSORBOARD_LOGGING_DIR", str(out / "tb"))
    if "wandb" in trackers:
        _point("WANDB_MODE", "offline")
        _point("WANDB_DIR", str(out))
        _point("WANDB_PROJECT", "tunelab")
        _point("WANDB_NAME", out.name)
    if "mlflow" in trackers:
        _point("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
        _point("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a folder store without it
        _point("MLFLOW_EXPERIMENT_NAME", "tunelab")
        _point("MLFLOW_RUN_NAME", out.name)
    return trackers
