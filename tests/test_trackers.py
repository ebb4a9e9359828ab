"""train.report_to: transformers' tracker integrations, writing inside the run folder."""

from __future__ import annotations

import json
import os

import pytest

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import trackers, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": f"say {i}", "input": "", "output": f"好 {i}"} for i in range(12)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_report_to_parses_names_lists_and_none():
    assert load_config(None, ["train.report_to=tensorboard,mlflow"]).train.report_to == ["tensorboard", "mlflow"]
    assert load_config(None, ["train.report_to=[wandb]"]).train.report_to == ["wandb"]
    assert load_config(None, ["train.report_to=none"]).train.report_to == "none"
    assert load_config(None).train.report_to == "none"
    with pytest.raises(TunelabError, match="train.report_to: 'comet' is not one of"):
        load_config(None, ["train.report_to=comet"])


@pytest.mark.parametrize("name,extra", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, name, extra):
    monkeypatch.setattr(trackers, "_installed", lambda module: False)
    with pytest.raises(TunelabError, match=rf"train.report_to: {name} needs the '\w+' package: "
                                           rf"pip install 'tunelab\[{extra}\]'"):
        trackers.check([name])


def test_missing_tracker_stops_the_run_in_one_line(monkeypatch, tmp_path, data_file, tiny_dir):
    monkeypatch.setattr(trackers, "_installed", lambda module: False)
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]",
                             f"output_dir={tmp_path / 'run'}", "train.report_to=wandb"])
    with pytest.raises(TunelabError, match="pip install 'tunelab\\[wandb\\]'"):
        train(cfg)


def test_trackers_point_into_the_run_folder(monkeypatch, tmp_path):
    for var in ("TENSORBOARD_LOGGING_DIR", "WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(trackers, "_installed", lambda module: True)
    assert trackers.configure(["tensorboard", "wandb", "mlflow"], tmp_path / "a") == ["tensorboard", "wandb", "mlflow"]
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str((tmp_path / "a" / "tb").resolve())
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str((tmp_path / "a").resolve())
    assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / "a" / "mlruns").resolve().as_uri()
    trackers.configure(["tensorboard"], tmp_path / "b")  # a second run in the same process moves along
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str((tmp_path / "b" / "tb").resolve())
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "/elsewhere")  # the user's own setting wins
    trackers.configure(["tensorboard"], tmp_path / "c")
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == "/elsewhere"


def test_tensorboard_event_files_open_in_tensorboards_reader(tiny_dir, tmp_path, data_file, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={tmp_path / 'run'}",
                             "train.bf16=false", "train.batch_size=4", "train.max_steps=4", "train.report_to=tensorboard"])
    out = train(cfg)
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events, "no event file in RUN/tb"
    reader = EventAccumulator(str(out / "tb"))
    reader.Reload()
    losses = reader.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [e.value for e in losses] == pytest.approx(logged, rel=1e-5)


def test_mlflow_logs_the_losses_into_the_run_folder(tiny_dir, tmp_path, data_file, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={tmp_path / 'run'}",
                             "train.bf16=false", "train.batch_size=4", "train.max_steps=3", "train.report_to=mlflow"])
    out = train(cfg)
    assert (out / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(logged, rel=1e-5)
