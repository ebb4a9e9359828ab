import pytest

from tunelab.config import RunConfig, load_config, save_config
from tunelab.errors import TunelabError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_safe():
    cfg = RunConfig()
    assert cfg.model.name == "builtin:smollm2-135m-instruct"
    assert cfg.model.trust_remote_code is False
    assert cfg.serve.host == "127.0.0.1"
    assert cfg.train.scheduler == "cosine"


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "output_dir: runs/x\nmethod:\n  name: lora\n  r: 4\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["method.r=16", "train.max_steps=7", "data.train=[a.jsonl,b.jsonl]",
                             "model.template=human-assistant"])
    assert cfg.method.r == 16
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string; we do not
    assert cfg.train.max_steps == 7
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.model.template == "human-assistant"


def test_single_dataset_string_becomes_list():
    cfg = load_config(None, ["data.train=only.jsonl"])
    assert cfg.data.train == ["only.jsonl"]


def test_unknown_key_names_key_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  learning_rat: 0.1\n")
    with pytest.raises(TunelabError, match=r"unknown config key 'train.learning_rat'"):
        load_config(path)
    with pytest.raises(TunelabError, match=r"did you mean 'method.alpha'"):
        load_config(None, ["method.alpah=3"])
    with pytest.raises(TunelabError, match=r"did you mean 'train'"):
        load_config(None, ["trian.lr=3"])


def test_bad_choice_and_bad_yaml(tmp_path):
    with pytest.raises(TunelabError, match="method.name: 'lorra' is not one of"):
        load_config(None, ["method.name=lorra"])
    path = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(TunelabError, match=r"run.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(TunelabError, match="must look like key=value"):
        load_config(None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=3", "data.train=[病历.jsonl]"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert "病历.jsonl" in path.read_text(encoding="utf-8")
    again = load_config(path)
    assert again == cfg


def test_bare_no_means_the_string_no():
    assert load_config(None, ["train.save_strategy=no"]).train.save_strategy == "no"
