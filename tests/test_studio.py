"""tunelab studio at the API level: the workspace guard, the bind rules, the form/YAML schema,
real detached training jobs (stop, re-attach, resume, failure), the preflight panels and chat."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from studio_helpers import QUICKSTART_DATA, logged_steps, make_workspace, tiny_recipe, wait_for

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.studio import forms
from tunelab.studio.app import create_app
from tunelab.studio.cli import check_bind
from tunelab.studio.jobs import JobRecord, alive_and_ours, start_ticks

BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_dir):
    root = make_workspace(tmp_path_factory.mktemp("studio") / "ws", tiny_dir)
    outside = root.parent / "outside.jsonl"
    outside.write_text(QUICKSTART_DATA.read_text(encoding="utf-8"), encoding="utf-8")
    (root / "link.jsonl").symlink_to(outside)
    (root / "reg").mkdir()
    (root / "reg" / "dataset_info.json").write_text(json.dumps({"escape": {"file_name": "../../outside.jsonl"}}))
    return root


@pytest.fixture
def client(ws, monkeypatch):
    monkeypatch.chdir(ws)  # as `tunelab studio` does: recipes name paths relative to the workspace
    with TestClient(create_app(ws, stall_after=120, stop_timeout=30), base_url=BASE) as c:
        yield c


def compose(client, text, changes=None):
    return client.post("/api/recipe", json={"yaml": text, "changes": changes or {}})


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize("method, url, body", [
    ("get", "/api/file?path=../outside.jsonl", None),
    ("get", "/api/file?path=/etc/passwd", None),
    ("get", "/api/file?path=link.jsonl", None),  # a symlink inside pointing outside
    ("get", "/api/recipe/file?path=../../../etc/hostname", None),
    ("get", "/api/run?run=../..", None),
    ("post", "/api/data/stats", {"model": "models/tiny", "datasets": ["../outside.jsonl"]}),
    ("post", "/api/data/stats", {"model": "models/tiny", "datasets": ["escape"], "dataset_dir": "reg"}),
    ("post", "/api/data/preview", {"model": "/usr/lib", "dataset": "data/test.jsonl"}),
    ("post", "/api/recipe", {"yaml": "data:\n  train: [../outside.jsonl]\n"}),
    ("post", "/api/runs", {"yaml": tiny_recipe("../escaped-run", 2)}),
    ("post", "/api/run/stop", {"run": "../../.."}),
    ("post", "/api/chat", {"model": "../models", "messages": [{"role": "user", "content": "hi"}]}),
    ("post", "/api/compares", {"name": "x", "models": ["models/tiny"], "datasets": ["/etc/passwd"]}),
    ("post", "/api/compares", {"name": "../x", "models": ["models/tiny"], "datasets": ["data/test.jsonl"]}),
])
def test_paths_outside_the_workspace_get_4xx(client, ws, method, url, body):
    response = client.request(method.upper(), url, json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.status_code in (403, 422)
    assert "outside the workspace" in response.json()["error"] or "name:" in response.json()["error"]
    assert not (ws.parent / "escaped-run").exists()


def test_files_inside_the_workspace_are_served_sandboxed(client):
    response = client.get("/api/file?path=data/test.jsonl")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == "sandbox"
    assert "Standard term" in response.text


def test_a_run_base_model_outside_the_workspace_is_refused(client, ws, tmp_path):
    run = ws / "runs" / "foreign"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {tmp_path}\n")
    (run / "metrics.jsonl").write_text("")
    response = client.post("/api/chat", json={"model": "runs/foreign", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 403 and "base of runs/foreign" in response.json()["error"]


def test_non_loopback_bind_needs_a_token(ws, capsys):
    with pytest.raises(TunelabError, match="--token"):
        check_bind("0.0.0.0", None)
    assert check_bind("127.0.0.1", None) is None
    assert len(check_bind("0.0.0.0", "auto")) >= 24
    assert main(["studio", "--workspace", str(ws), "--host", "0.0.0.0", "--port", "8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: studio: --host 0.0.0.0") and err.count("\n") == 1  # one line, no traceback


def test_token_is_required_by_header_or_cookie(ws, monkeypatch):
    monkeypatch.chdir(ws)
    with TestClient(create_app(ws, token="s3cret", loopback=False), base_url="http://studio.lan") as c:
        assert c.get("/api/info").status_code == 401
        assert c.get("/", follow_redirects=False).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/info", headers={"Authorization": "Bearer s3cret"}).json()["token"] is True
        login = c.get("/?token=s3cret", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        assert c.get("/api/info").status_code == 200  # the cookie the redirect set


def test_loopback_studio_refuses_other_hosts_and_origins(client):
    assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 403  # DNS rebinding
    assert client.post("/api/recipe", json={"yaml": ""}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/recipe", json={"yaml": ""}, headers={"Origin": BASE}).status_code == 200
    # a form post from another page cannot pass for JSON
    assert client.post("/api/runs", content="yaml=x", headers={"Content-Type": "text/plain"}).status_code == 422


# ---------------------------------------------------------------- one schema: form, YAML, `tunelab train`


def test_quickstart_round_trips_through_the_form(client, ws, capsys):
    text = client.get("/api/recipe/file?path=recipes/quickstart.yaml").json()["yaml"]
    shown = compose(client, text).json()
    assert shown["yaml"] == text  # untouched text keeps its comments
    assert shown["values"] == forms.values_of(load_config(ws / "recipes" / "quickstart.yaml"))
    changes = {"model.name": "models/tiny", "train.max_steps": "12", "method.r": "4", "train.bf16": "false",
               "data.train": [f"recipes/data/{QUICKSTART_DATA.name}", "data/test.jsonl"], "output_dir": "runs/rt"}
    edited = compose(client, text, changes).json()
    path = ws / "rt.yaml"
    path.write_text(edited["yaml"], encoding="utf-8")
    cfg = load_config(path)  # the file `tunelab train` takes
    assert forms.values_of(cfg) == edited["values"]
    assert (cfg.model.name, cfg.train.max_steps, cfg.method.r, cfg.train.bf16) == ("models/tiny", 12, 4, False)
    assert cfg.data.train[1] == "data/test.jsonl" and cfg.train.lr == 2e-3  # the recipe's own value kept
    again = compose(client, edited["yaml"]).json()
    assert again["values"] == edited["values"]
    assert main(["train", str(path), "--print-config"]) == 0
    assert capsys.readouterr().out == cfg.to_yaml()


def test_a_form_edit_replaces_an_alias_spelling(client):
    edited = compose(client, "train:\n  learning_rate: 0.1\n", {"train.lr": "0.05"}).json()
    assert yaml.safe_load(edited["yaml"]) == {"train": {"lr": 0.05}}


@pytest.mark.parametrize("text, changes, field, message", [
    ("", {"train.lr": "abc"}, "train.lr", "train.lr: 'abc' is not a number"),
    ("", {"train.batch_size": "2.5"}, "train.batch_size", "not a whole number"),
    ("", {"train.batch_size": "0"}, "train.batch_size", "train.batch_size: 0 must be at least 1"),
    ("", {"train.scheduler": "sometimes"}, "train.scheduler", "is not one of cosine, linear"),
    ("", {"method.name": "magic"}, "method.name", "is not one of full, freeze, lora"),
    ("", {"train.max_time": "soon"}, "train.max_time", "is not a duration"),
    ("train:\n  lr: fast\n", {}, "train.lr", "train.lr: 'fast' is not a number"),
    ("train:\n  learning_rat: 1\n", {}, "train.learning_rat", "did you mean 'train.lr'?"),
    ("train: [1\n", {}, "yaml", "invalid YAML"),
    ("", {"data.train": ["data/missing.jsonl"]}, "data.train", "data/missing.jsonl"),
])
def test_a_bad_value_is_one_error_naming_its_field(client, text, changes, field, message):
    response = compose(client, text, changes)
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field and message in body["error"] and "\n" not in body["error"]


def test_launch_without_data_names_the_field(client):
    response = client.post("/api/runs", json={"yaml": "output_dir: runs/nodata\n"})
    assert response.status_code == 422 and response.json()["field"] == "data.train"


def test_schema_comes_from_the_config(client):
    fields = {f["key"]: f for f in client.get("/api/schema").json()["fields"]}
    assert fields["train.lr"]["help"] == "Peak learning rate." and fields["train.lr"]["kind"] == "float"
    assert "adalora" in fields["method.name"]["choices"] and fields["train.bf16"]["choices"] == [True, False, "auto", "force"]
    assert fields["method.r"]["methods"][0] == "lora" and fields["data.max_samples"]["optional"]


# ---------------------------------------------------------------- preflight panels


def test_stats_preview_and_estimate_are_the_library_answers(client, ws):
    from tunelab.data.commands import stats
    from tunelab.export.estimate import estimate, load_config as model_config, model_shape
    from tunelab.models import load_tokenizer

    body = {"model": "models/tiny", "datasets": [f"recipes/data/{QUICKSTART_DATA.name}"], "cutoff_len": 128}
    got = client.post("/api/data/stats", json=body).json()
    tokenizer = load_tokenizer(str(ws / "models" / "tiny"))
    want = stats([str(ws / "recipes" / "data" / QUICKSTART_DATA.name)], tokenizer, None, 128)
    assert got["conversations"] == 48 and got["tokens"] == want["tokens"] and got["over_cutoff"] == want["over_cutoff"]
    assert want["over_cutoff"] == 48  # the tiny BPE spends ~3 tokens a word: every row is longer than 128
    dropped = client.post("/api/data/preview", json={**body, "dataset": body["datasets"][0]}).json()["examples"]
    assert dropped[0]["dropped"] == "no answer token within cutoff_len=128"
    body["cutoff_len"] = 512
    preview = client.post("/api/data/preview", json={**body, "dataset": body["datasets"][0]}).json()["examples"]
    first = json.loads(QUICKSTART_DATA.read_text(encoding="utf-8").splitlines()[0])
    learned = "".join(s["text"] for s in preview[0]["segments"] if s["learn"])
    assert learned.startswith(first["output"])  # the answer (and its end-of-turn marker) is what is learned
    assert first["output"] not in "".join(s["text"] for s in preview[0]["segments"] if not s["learn"])
    assert sum(s["tokens"] for s in preview[0]["segments"] if s["learn"]) == preview[0]["supervised"]
    est = client.post("/api/estimate", json={"model": "models/tiny", "method": "lora", "batch_size": 4,
                                             "cutoff_len": 64, "r": 4}).json()
    assert est["total"] == estimate(model_shape(model_config(str(ws / "models" / "tiny"))), "lora", "fp32", 4, 64,
                                    r=4).to_dict()["total"]
    assert client.post("/api/estimate", json={"model": "models/tiny", "method": "ia3"}).json()["available"] is False


# ---------------------------------------------------------------- jobs


def _run(client, run):
    return client.get(f"/api/run?run={run}").json()


def test_stop_reattach_and_resume_a_real_training_job(ws, monkeypatch):
    monkeypatch.chdir(ws)
    with TestClient(create_app(ws, stop_timeout=60), base_url=BASE) as first:
        launched = first.post("/api/runs", json={"yaml": tiny_recipe("runs/job", 400, save_strategy='"no"')})
        assert launched.status_code == 200, launched.text
        record = JobRecord.load(ws / "runs" / "job")
        assert record.pgid == record.pid != os.getpgid(0)  # its own process group
        assert Path(record.log).parent == ws / "runs" / "job" / "studio"  # a file, not a pipe
        wait_for(lambda: _run(first, "runs/job")["step"] >= 3, 120, "three logged steps")
    # The first studio is gone; the job is not. A new studio finds it.
    with TestClient(create_app(ws, stop_timeout=60), base_url=BASE) as second:
        view = _run(second, "runs/job")
        assert view["status"] == "running" and view["pid"] == record.pid and view["total_steps"] == 400
        assert second.post("/api/run/stop", json={"run": "runs/job"}).json()["status"] == "stopping"
        stopped = wait_for(lambda: (v := _run(second, "runs/job"))["status"] == "stopped" and v, 60, "the stop")
        assert stopped["resumable"] and stopped["checkpoints"]
        at = int(stopped["checkpoints"][-1].split("-")[1])
        assert logged_steps(ws / "runs" / "job")[-1] == at  # checkpointed at the step it stopped
        assert not alive_and_ours(JobRecord.load(ws / "runs" / "job"))
        # resume: edit the plan down so that the test is short (the recipe is the run's own file)
        recipe = ws / "runs" / "job" / "studio" / "recipe.yaml"
        recipe.write_text(recipe.read_text(encoding="utf-8").replace("max_steps: 400", f"max_steps: {at + 6}"))
        assert second.post("/api/run/resume", json={"run": "runs/job"}).json()["status"] == "running"
        done = wait_for(lambda: (v := _run(second, "runs/job"))["status"] == "finished" and v, 120, "the resumed run")
    assert logged_steps(ws / "runs" / "job") == list(range(1, at + 7))  # no step lost or repeated
    assert any(n.startswith("resuming from") for n in done["notes"])
    assert (ws / "runs" / "job" / "adapter_model.safetensors").is_file()
    assert len(JobRecord.load(ws / "runs" / "job").history) == 1


def test_a_failed_job_shows_its_error_line(client, ws):
    response = client.post("/api/runs", json={"yaml": tiny_recipe("runs/bad", 5).replace("val_size: 8", "val_size: 100")})
    assert response.status_code == 200
    view = wait_for(lambda: (v := _run(client, "runs/bad"))["status"] == "failed" and v, 90, "the failure")
    assert view["error"].startswith("data.val_size: 100 leaves no training or no eval examples")
    assert not view["resumable"]
    again = client.post("/api/runs", json={"yaml": tiny_recipe("runs/bad", 5)})
    assert again.status_code == 422 and again.json()["field"] == "output_dir"  # never over an existing run


def test_a_record_names_its_process_exactly(tmp_path):
    me = JobRecord(kind="train", folder=str(tmp_path), command=[], cwd=".", log="", pid=os.getpid(),
                   pgid=os.getpgid(0), start_ticks=start_ticks(os.getpid()), boot_id=None, started_at=time.time(),
                   studio_pid=os.getpid())
    assert alive_and_ours(me)
    me.start_ticks += 1  # the same pid, another process (pid reuse)
    assert not alive_and_ours(me)


def test_a_job_with_no_step_for_a_while_is_stalled(ws, tmp_path):
    from tunelab.studio.runs import status_of

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    old = time.time() - 100
    os.utime(folder / "metrics.jsonl", (old, old))
    record = JobRecord(kind="train", folder=str(folder), command=[], cwd=".", log="", pid=1, pgid=1,
                       start_ticks=None, boot_id=None, started_at=old - 10, studio_pid=0)
    assert status_of(folder, record, [], stall_after=60)["stalled"]
    assert not status_of(folder, record, [], stall_after=300)["stalled"]


# ---------------------------------------------------------------- chat


def test_chat_streams_the_serve_engine_answer(client, ws, tiny_llama, tiny_tokenizer):
    from tunelab.generation import GenerationSettings, generate

    messages = [{"role": "user", "content": "Normalise: fever"}]
    with client.stream("POST", "/api/chat", json={"model": "models/tiny", "system": "Be brief.", "messages": messages,
                                                  "settings": {"max_new_tokens": 12}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    pieces = [e["text"] for e in events if "text" in e and not e.get("done")]
    done = events[-1]
    want = generate(tiny_llama, tiny_tokenizer, [[{"role": "system", "content": "Be brief."}, *messages]],
                    GenerationSettings(max_new_tokens=12), progress=False)[0]
    assert len(pieces) > 1 and "".join(pieces) == want.text == done["text"]
    assert done["completion_tokens"] == want.completion_tokens
    bad = client.post("/api/chat", json={"model": "models/tiny", "messages": messages, "settings": {"top_p": "x"}})
    assert bad.status_code == 422 and bad.json()["field"] == "generation.top_p"

