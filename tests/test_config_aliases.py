"""Hugging Face / peft / LLaMA-Factory names as aliases, and suggestions drawn from names and aliases."""

from __future__ import annotations

import pytest

from tunelab import aliases
from tunelab.aliases import ALIASES
from tunelab.config import load_config, section_fields
from tunelab.errors import TunelabError

# a value each aliased field accepts, as written on the command line -> what the config holds
SAMPLES = {
    "overwrite": ("true", True), "name": ("some/model", "some/model"),
    "train": ("a.jsonl", ["a.jsonl"]), "eval": ("[b.jsonl,c.jsonl]", ["b.jsonl", "c.jsonl"]),
    "cutoff_len": ("77", 77), "r": ("4", 4), "alpha": ("9", 9), "dropout": ("0.1", 0.1),
    "target_modules": ("[q_proj,v_proj]", ["q_proj", "v_proj"]), "lr": ("1e-3", 1e-3),
    "epochs": ("2.5", 2.5), "batch_size": ("3", 3), "grad_accum": ("5", 5), "scheduler": ("linear", "linear"),
    "resume": ("auto", "auto"), "early_stopping_patience": ("3", 3), "neftune_alpha": ("5.0", 5.0),
}
CASES = [(section, alias, field) for section, table in ALIASES.items() for alias, field in table.items()]


@pytest.fixture(autouse=True)
def fresh_notes():
    aliases._NOTED.clear()
    yield
    aliases._NOTED.clear()


def value_of(cfg, section, field):
    return getattr(getattr(cfg, section) if section else cfg, field)


@pytest.mark.parametrize("section,alias,field", CASES, ids=[f"{s or 'top'}.{a}" for s, a, _ in CASES])
def test_every_alias_sets_its_field_with_a_note(section, alias, field, capsys):
    raw, expected = ("freeze", "freeze") if (section, field) == ("method", "name") else SAMPLES[field]
    dotted = f"{section}.{alias}" if section else alias
    cfg = load_config(None, [f"{dotted}={raw}"])
    assert value_of(cfg, section, field) == pytest.approx(expected) if isinstance(expected, float) \
        else value_of(cfg, section, field) == expected
    tunelab_name = f"{section}.{field}" if section else field
    assert f"'{dotted}' is tunelab's '{tunelab_name}'" in capsys.readouterr().err
    load_config(None, [f"{dotted}={raw}"])
    assert capsys.readouterr().err == ""  # the note is printed once per process


def test_the_issue_example_on_the_quickstart_recipe():
    cfg = load_config("recipes/quickstart.yaml", ["train.learning_rate=1e-3", "method.lora_rank=4"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.method.r == 4


def test_aliases_inside_a_yaml_recipe(tmp_path, capsys):
    path = tmp_path / "hf.yaml"
    path.write_text("train:\n  learning_rate: 3.0e-4\n  num_train_epochs: 2\n  lr_scheduler_type: linear\n"
                    "method:\n  lora_r: 4\n  lora_alpha: 8\n  lora_target: all\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.scheduler) == (3e-4, 2, "linear")
    assert (cfg.method.r, cfg.method.alpha, cfg.method.target_modules) == (4, 8, "all-linear")
    assert "'method.lora_r' is tunelab's 'method.r'" in capsys.readouterr().err


@pytest.mark.parametrize("key,field,raw,expected", [
    ("learning_rate", ("train", "lr"), "1e-3", 1e-3),
    ("num_train_epochs", ("train", "epochs"), "2", 2),
    ("per_device_train_batch_size", ("train", "batch_size"), "2", 2),
    ("gradient_accumulation_steps", ("train", "grad_accum"), "4", 4),
    ("lora_rank", ("method", "r"), "16", 16),
    ("cutoff_len", ("data", "cutoff_len"), "512", 512),   # a tunelab name that one section has
    ("lr", ("train", "lr"), "0.01", 0.01),
])
def test_bare_top_level_names_go_to_their_one_section(key, field, raw, expected, capsys):
    cfg = load_config(None, [f"{key}={raw}", "train.max_steps=3"])  # joins an existing section
    assert getattr(getattr(cfg, field[0]), field[1]) == expected
    assert cfg.train.max_steps == 3
    assert f"'{key}' is tunelab's '{field[0]}.{field[1]}'" in capsys.readouterr().err


def test_a_field_given_twice_in_a_recipe_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  learning_rate: 1.0e-4\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"'train.learning_rate' and 'train.lr' both set train.lr; keep one"):
        load_config(path)
    path.write_text("learning_rate: 1.0e-3\ntrain:\n  lr: 1.0e-4\n", encoding="utf-8")
    with pytest.raises(TunelabError, match="'learning_rate' and 'train.lr' both set train.lr; keep one"):
        load_config(path)


def test_an_override_by_alias_replaces_the_recipes_field(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1.0e-3\nmethod:\n  r: 8\n", encoding="utf-8")
    cfg = load_config(path, ["train.learning_rate=1e-4", "lora_rank=4", "train.lr=5e-4"])
    assert (cfg.train.lr, cfg.method.r) == (5e-4, 4)  # the last override wins, whatever its name


def test_bare_names_two_sections_share_are_not_guessed():
    with pytest.raises(TunelabError, match="unknown config key 'batch_size'"):
        load_config(None, ["batch_size=4"])  # train.batch_size or eval.batch_size


@pytest.mark.parametrize("key,suggestion", [
    ("train.learning_rat", "train.lr"),            # the issue: not 'train.early_stopping_patience'
    ("train.learning_rates", "train.lr"),
    ("train.num_train_epoch", "train.epochs"),
    ("train.gradient_accumulation", "train.grad_accum"),
    ("train.lr_scheduler", "train.scheduler"),
    ("method.lora_rnk", "method.r"),
    ("method.lora_alpa", "method.alpha"),
    ("method.alpah", "method.alpha"),
    ("train.lora_rank", "method.r"),               # right name, wrong section
    ("train.cutoff_len", "data.cutoff_len"),
    ("model.lr", "train.lr"),
    ("data.per_device_train_batch_siz", "train.batch_size"),
    ("trian.lr", "train"),                         # a misspelt section
])
def test_suggestions_come_from_names_and_aliases(key, suggestion):
    shown = key.split(".")[0] if suggestion == "train" else key
    with pytest.raises(TunelabError, match=rf"unknown config key '{shown}' \(did you mean '{suggestion}'\?\)"):
        load_config(None, [f"{key}=1"])


def test_no_suggestion_lists_the_valid_keys():
    with pytest.raises(TunelabError, match=r"unknown config key 'train.zzzz' \(valid: .*epochs, max_steps"):
        load_config(None, ["train.zzzz=1"])


def test_every_alias_points_at_a_real_field():
    sections = section_fields() | {"": ["output_dir", "overwrite", *section_fields()]}
    for section, table in ALIASES.items():
        for alias, field in table.items():
            assert field in sections[section], f"{section}.{alias} -> {field}"
            assert alias not in sections[section], f"{section}.{alias} shadows a field"
