"""Every shipped recipe loads; accelerate configs parse; the quickstart data is real and readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import load_config

RECIPES = Path(__file__).parents[1] / "recipes"
TRAIN_RECIPES = sorted(RECIPES.glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in TRAIN_RECIPES}
    assert {"quickstart.yaml", "qwen2.5-0.5b-med-full.yaml", "qwen2.5-0.5b-med-lora.yaml",
            "stablelm-3b-4e1t-lora.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.data.train, "a training recipe names its data"
    from tunelab.train.methods import get_method

    get_method(cfg.method.name)
    assert cfg.output_dir.startswith("runs/")


def test_seed_settings_are_kept():
    stablelm = load_config(RECIPES / "stablelm-3b-4e1t-lora.yaml")
    assert (stablelm.method.r, stablelm.method.alpha, stablelm.method.dropout) == (16, 16, 0.1)
    assert sorted(stablelm.method.target_modules) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert stablelm.model.template == "human-assistant"
    full = load_config(RECIPES / "qwen2.5-0.5b-med-full.yaml")
    assert (full.method.name, full.train.batch_size, full.train.grad_accum, full.train.lr,
            full.train.scheduler, full.data.cutoff_len) == ("full", 2, 4, 1e-4, "cosine", 4000)


def test_quickstart_data_is_real_icd10cm():
    import simple_icd_10_cm as cm

    rows = [json.loads(line) for line in (RECIPES / "data" / "quickstart-icd10cm-norm.jsonl")
            .read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 48
    for row in rows:
        term = row["instruction"].split("Term: ", 1)[1].split("\n", 1)[0]
        assert term in cm.get_inclusion_term(row["code"])
        assert row["output"] == cm.get_description(row["code"])


def test_quickstart_data_reads_as_conversations():
    from tunelab.data.registry import load_dataset

    convs = load_dataset(str(RECIPES / "data" / "quickstart-icd10cm-norm.jsonl"))
    assert len(convs) == 48 and convs[0].messages[-1].role == "assistant"


@pytest.mark.parametrize("path", sorted((RECIPES / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert json.loads((RECIPES.parent / ds_file).read_text())["zero_optimization"]["stage"] in (2, 3)
