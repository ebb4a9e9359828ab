"""tunelab studio's chat with a vision-language run: an attached image reaches the model as it
reaches ``tunelab serve`` (a ``data:`` URL, never a path), and a text-only model refuses images."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from studio_helpers import make_workspace
from vision_helpers import shapes_data, tower_dirs  # noqa: F401  (fixtures)

from tunelab.studio.app import create_app


@pytest.fixture
def ws(tmp_path, tiny_dir):
    return make_workspace(tmp_path / "ws", tiny_dir)


@pytest.fixture
def client(ws, monkeypatch):
    monkeypatch.chdir(ws)
    with TestClient(create_app(ws), base_url="http://127.0.0.1") as c:
        yield c


def test_chat_with_a_vision_run_takes_an_attached_image(client, ws, tower_dirs, shapes_data):
    import base64
    import shutil

    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer
    from tunelab.vision.compose import load_vlm
    from vision_helpers import conv, png, train_run

    shutil.copytree(tower_dirs["clip"], ws / "towers" / "clip")
    run = train_run(ws / "runs", "vlm", str(ws / "models" / "tiny"), str(ws / "towers" / "clip"), shapes_data,
                    **{"train.bf16": "false"})
    image = png(ws / "red.png", "red")
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    message = {"role": "user", "content": "What colour is it?", "images": [url]}
    with client.stream("POST", "/api/chat", json={"model": "runs/vlm", "messages": [message],
                                                  "settings": {"max_new_tokens": 4}}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "error" not in events[-1], events[-1]
    model, tokenizer = load_vlm(run)
    want = answer(model, tokenizer, conv(image), GenerationSettings(max_new_tokens=4))
    assert events[-1]["done"] and events[-1]["text"].strip() == want.strip()
    refused = client.post("/api/chat", json={"model": "models/tiny", "messages": [{**message, "images": ["/etc/x.png"]}]})
    assert refused.status_code == 422 and refused.json()["field"] == "images"
    with client.stream("POST", "/api/chat", json={"model": "models/tiny", "messages": [message]}) as response:
        last = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")][-1]
    assert last["error"].startswith("images:") and "text-only" in last["error"]
