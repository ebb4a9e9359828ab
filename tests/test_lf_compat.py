"""LLaMA-Factory configs and command lines: what they translate to, what is refused, and real runs."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import pytest

from tunelab import aliases, lf_compat
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import TunelabError

pytestmark = pytest.mark.usefixtures("one_thread")

# Seed 003's script, verbatim (the file under ../shared/seeds is checked when present).
SEED_SCRIPT = """CUDA_VISIBLE_DEVICES=0 llamafactory-cli train \\
--stage sft \\
--do_train \\
--model_name_or_path /ai/deployment/20250417/model/Qwen2.5-0.5B-Instruct \\
--dataset med_dialog,med_norm,med_mrg \\
--template qwen \\
--finetuning_type full \\
--output_dir /ai/deployment/20250417/model/finetune/Qwen2.5-0.5B_med_sft_2 \\
--overwrite_cache \\
--per_device_train_batch_size 2 \\
--gradient_accumulation_steps 4 \\
--lr_scheduler_type cosine \\
--logging_steps 10 \\
--save_strategy no \\
--learning_rate 1e-4 \\
--num_train_epochs 0.1 \\
--plot_loss \\
--preprocessing_num_workers 16 \\
--bf16 \\
--cutoff_len 4000"""
SEED_FILE = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "003_09dbe61eec000619.txt"

# A LoRA SFT config as LLaMA-Factory's examples write one (model path and dataset names ours).
LORA_SFT_YAML = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: med_dialog,med_norm
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


@pytest.fixture(autouse=True)
def fresh_notes():
    aliases._NOTED.clear()


@pytest.fixture
def lf_folder(tmp_path, monkeypatch):
    """A working folder with LLaMA-Factory's default ``data/dataset_info.json`` and three small sets."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    info = {}
    for name, n in (("med_dialog", 16), ("med_norm", 16), ("med_mrg", 8)):
        rows = [{"instruction": f"{name} 病人 {rng.randint(0, 99)}", "input": "", "output": f"回答 {i}"}
                for i in range(n)]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        info[name] = {"file_name": f"{name}.jsonl"}
    (data / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def seed_argv(model: str, out: str) -> list[str]:
    """The seed's ``llamafactory-cli train`` arguments with the model path (and output folder) ours."""
    command = SEED_SCRIPT.replace("/ai/deployment/20250417/model/Qwen2.5-0.5B-Instruct", model)
    command = command.replace("/ai/deployment/20250417/model/finetune/Qwen2.5-0.5B_med_sft_2", out)
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["CUDA_VISIBLE_DEVICES=0", "llamafactory-cli", "train"]
    return words[3:]


def test_the_embedded_script_is_the_seeds():
    if not SEED_FILE.is_file():
        pytest.skip("shared/seeds is not beside this checkout")
    assert SEED_SCRIPT.replace(" \\\n", "\n") in SEED_FILE.read_text(encoding="utf-8").replace(" \\\n", "\n")


def test_seed_script_translates_to_what_it_means(tiny_dir, capsys):
    cfg, recipe = lf_compat.load(argv=seed_argv(str(tiny_dir), "runs/med_sft"))
    assert recipe["train"].pop("stage", "sft") == "sft"  # train.stage, where this tunelab has it
    assert recipe == {
        "train": {"lr": 1e-4, "epochs": 0.1, "scheduler": "cosine", "warmup_ratio": 0.0, "bf16": True,
                  "save_strategy": "no", "save_steps": 500, "batch_size": 2, "grad_accum": 4, "logging_steps": 10},
        "data": {"cutoff_len": 4000, "group_by_length": False, "train": ["med_dialog", "med_norm", "med_mrg"],
                 "dataset_dir": "data"},
        "method": {"name": "full"},
        "model": {"name": str(tiny_dir)},
        "output_dir": "runs/med_sft",
    }
    assert cfg.method.name == "full" and cfg.train.grad_accum == 4 and cfg.data.dataset_dir == "data"
    err = capsys.readouterr().err
    for key in ("--overwrite_cache", "--plot_loss", "--preprocessing_num_workers"):
        assert f"note: --lf-args: {key}: accepted, not used" in err
    assert "'qwen' -> the model's own chat template (the same format)" in err  # the tiny model is ChatML


def test_seed_script_runs_as_is(tiny_dir, lf_folder, capsys):
    """`tunelab train --lf-args` + the seed's arguments: a full fine-tune, loss plot, printed recipe."""
    code = main(["train", "--lf-args", *seed_argv(str(tiny_dir), str(lf_folder / "out"))])
    assert code == 0
    out = capsys.readouterr().out
    assert "LLaMA-Factory arguments as a tunelab recipe" in out
    assert "method:\n  name: full\n" in out and "lr: 0.0001" in out and "dataset_dir: data" in out
    run = lf_folder / "out"
    assert (run / "model.safetensors").is_file() and (run / "loss.png").is_file()
    saved = load_config(run / "config.yaml")
    assert saved.data.train == ["med_dialog", "med_norm", "med_mrg"] and saved.train.epochs == 0.1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("loss" in r for r in records)


def test_lora_sft_example_yaml_translates_and_trains(tiny_dir, lf_folder, capsys):
    path = lf_folder / "llama_factory_lora_sft.yaml"
    path.write_text(LORA_SFT_YAML.format(model=tiny_dir, out=lf_folder / "lora"), encoding="utf-8")
    cfg, recipe = lf_compat.load(path)
    assert recipe["train"].pop("stage", "sft") == "sft"
    assert recipe["method"] == {"name": "lora", "alpha": 16, "r": 8, "target_modules": "all-linear"}
    assert recipe["train"] == {"lr": 1e-4, "epochs": 3.0, "scheduler": "cosine", "warmup_ratio": 0.1,
                               "bf16": True, "save_strategy": "steps", "save_steps": 500, "logging_steps": 10,
                               "batch_size": 1, "grad_accum": 8, "eval_steps": 500}
    assert recipe["data"] == {"cutoff_len": 2048, "group_by_length": False, "train": ["med_dialog", "med_norm"],
                              "dataset_dir": "data", "max_samples": 1000, "val_size": 0.1}
    assert recipe["model"] == {"name": str(tiny_dir), "trust_remote_code": True}
    assert recipe["overwrite"] is True
    err = capsys.readouterr().err
    assert f"{path}:18: preprocessing_num_workers: accepted, not used" in err  # file and line
    assert f"{path}:35: ddp_timeout: accepted, not used" in err
    # `tunelab train FILE` detects it by its keys; a tunelab override still applies
    assert main(["train", str(path), "train.max_steps=3"]) == 0
    run = lf_folder / "lora"
    assert (run / "adapter_config.json").is_file()
    adapter = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)
    assert load_config(run / "config.yaml").train.max_steps == 3
    assert any("eval_loss" in json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_print_config_writes_a_loadable_recipe_and_never_overwrites(tiny_dir, lf_folder, capsys):
    dest = lf_folder / "as_tunelab.yaml"
    argv = seed_argv(str(tiny_dir), "runs/x")
    assert main(["train", "--print-config", str(dest), "--lf-args", *argv]) == 0
    cfg = load_config(dest)  # a tunelab recipe now, not a LLaMA-Factory one
    assert cfg.method.name == "full" and cfg.train.lr == 1e-4 and cfg.data.cutoff_len == 4000
    before = dest.read_text(encoding="utf-8")
    assert main(["train", "--print-config", str(dest), "--lf-args", *argv]) == 1
    assert "already exists" in capsys.readouterr().err
    assert dest.read_text(encoding="utf-8") == before
    assert not (lf_folder / "runs").exists()  # printing trains nothing
    assert main(["train", "--print-config", "--lf-args", *argv]) == 0
    assert "name: full" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--stage", "ppo"], r"--lf-args: --stage: 'ppo'"),
    (["--finetuning_type", "oft"], r"--lf-args: --finetuning_type: 'oft' has no tunelab method"),
    (["--use_galore"], r"--lf-args: --use_galore: true: tunelab does not offer GaLore"),
    (["--deepspeed", "ds.json"], r"--lf-args: --deepspeed: no tunelab equivalent"),
    (["--freeze_trainable_layers", "-2"], r"--freeze_trainable_layers: -2: tunelab trains the last N layers"),
    (["--finetuning_type", "full", "--quantization_bit", "4"], r"--quantization_bit: quantized training needs"),
    (["--quantization_bit", "3"], r"--quantization_bit: 3: tunelab quantizes to 4 or 8 bits"),
    (["--do_train", "false"], r"--do_train: false"),
    (["--warmup_steps", "10"], r"--warmup_steps: tunelab plans warm-up as a fraction"),
    (["--report_to", "all"], r"--report_to: 'all'"),
    (["--lr_scheduler_type", "polynomial"], r"train.scheduler: 'polynomial' is not one of"),
    (["stage", "sft"], r"--lf-args: expected --key, got 'stage'"),
])
def test_what_tunelab_cannot_honour_is_refused_in_one_line(argv, message):
    with pytest.raises(TunelabError, match=message) as info:
        lf_compat.load(argv=["--model_name_or_path", "m", *argv], check=False)
    assert "\n" not in str(info.value)


def test_refusal_in_a_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text("model_name_or_path: m\nstage: sft\nuse_badam: true\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=rf"{path}:3: use_badam: true: tunelab does not offer BAdam"):
        load_config(path)


@pytest.mark.parametrize("argv,expected", [
    (["--lora_rank", "16"], {"method.r": 16, "method.alpha": 32}),  # LLaMA-Factory: alpha = 2 × rank
    (["--lora_rank", "16", "--lora_alpha", "8"], {"method.r": 16, "method.alpha": 8}),
    (["--quantization_bit", "4"], {"method.name": "qlora"}),
    (["--quantization_bit", "8"], {"method.name": "lora8bit"}),
    (["--pissa_init"], {"method.init_lora_weights": "pissa_niter_16"}),
    (["--pissa_init", "--pissa_iter", "-1"], {"method.init_lora_weights": "pissa"}),
    (["--use_dora", "--use_rslora", "--loraplus_lr_ratio", "8"],
     {"method.use_dora": True, "method.use_rslora": True, "method.loraplus_lr_ratio": 8}),
    (["--lora_target", "q_proj,v_proj"], {"method.target_modules": ["q_proj", "v_proj"]}),
    (["--finetuning_type", "freeze", "--freeze_trainable_layers", "1", "--freeze_extra_modules", "lm_head"],
     {"method.name": "freeze", "method.freeze_trainable_layers": 1, "method.freeze_train_head": True}),
    (["--flash_attn", "disabled"], {"model.attn_implementation": "eager"}),
    (["--max_steps", "100", "--warmup_steps", "10"], {"train.max_steps": 100, "train.warmup_ratio": 0.1}),
    (["--resume_from_checkpoint", "true"], {"train.resume": "auto"}),
    (["--report_to", "tensorboard"], {"train.report_to": ["tensorboard"]}),
    (["--report_to", "none"], {"train.report_to": "none"}),
    (["--neat_packing"], {"data.packing": True}),
    (["--fp16"], {"train.bf16": "auto"}),
    ([], {"train.lr": 5e-5, "train.epochs": 3.0, "train.scheduler": "linear", "train.bf16": False,
          "data.cutoff_len": 2048, "method.name": "lora", "method.alpha": 16}),   # the defaults it means
    (["--dataset", "a.jsonl,b.json"], {"data.train": ["a.jsonl", "b.json"], "data.dataset_dir": None}),
    (["--dataset", "alpaca_zh", "--dataset_dir", "mydata"], {"data.dataset_dir": "mydata"}),
    (["--neftune_noise_alpha", "5"], {"train.neftune_alpha": 5}),
    (["--output_dir=runs/a", "--overwrite_output_dir"], {"output_dir": "runs/a", "overwrite": True}),
])
def test_keys_translate_to_tunelab_fields(argv, expected):
    cfg, _ = lf_compat.load(argv=["--model_name_or_path", "m", *argv], check=False)
    for dotted, value in expected.items():
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, dotted


def test_detection_by_keys(tmp_path):
    assert lf_compat.is_lf_config({"model_name_or_path": "m", "stage": "sft"})
    assert not lf_compat.is_lf_config({"model": {"name": "m"}, "train": {"lr": 1e-3}})
    assert not lf_compat.is_lf_config({"output_dir": "x"})


def test_pt_and_dpo_stages_map_to_train_stage():
    if lf_compat._stage_field() is None:
        pytest.skip("this tunelab has no train.stage")
    cfg, _ = lf_compat.load(argv=["--model_name_or_path", "m", "--stage", "pt"], check=False)
    assert cfg.train.stage == "pt"
    cfg, _ = lf_compat.load(argv=["--model_name_or_path", "m", "--stage", "dpo", "--pref_beta", "0.2",
                                  "--pref_loss", "simpo", "--simpo_gamma", "0.3", "--pref_ftx", "0.1"], check=False)
    assert (cfg.train.stage, cfg.train.pref_beta, cfg.train.pref_loss) == ("dpo", 0.2, "simpo")
    assert (cfg.train.simpo_gamma, cfg.train.pref_ftx) == (0.3, 0.1)
    with pytest.raises(TunelabError, match="train.pref_loss: 'hinge' is not one of"):
        lf_compat.load(argv=["--model_name_or_path", "m", "--stage", "dpo", "--pref_loss", "hinge"], check=False)
    with pytest.raises(TunelabError, match="--dpo_label_smoothing: 0.1: tunelab does not offer label smoothing"):
        lf_compat.load(argv=["--model_name_or_path", "m", "--dpo_label_smoothing", "0.1"], check=False)


def test_stage_follows_the_config(monkeypatch):
    from tunelab import config

    if lf_compat._stage_field() is None:  # this tunelab has only SFT: pt/dpo are refused, sft is fine
        lf_compat.load(argv=["--model_name_or_path", "m", "--stage", "sft"], check=False)
        with pytest.raises(TunelabError, match="--stage: 'dpo': this tunelab trains only the sft stage"):
            lf_compat.load(argv=["--model_name_or_path", "m", "--stage", "dpo"], check=False)
    monkeypatch.setattr(config, "section_fields", lambda: {"train": ["stage"], "model": ["name"]})
    assert lf_compat._stage_field() == "train.stage"


@pytest.fixture
def no_template_model(tmp_path, tiny_llama, make_tiny_tokenizer):
    folder = tmp_path / "base"
    tiny_llama.save_pretrained(folder)
    make_tiny_tokenizer(chat_template=None).save_pretrained(folder)
    return folder


def test_templates_against_the_models_own(tiny_dir, no_template_model, capsys):
    lf_compat.load(argv=["--model_name_or_path", str(tiny_dir), "--template", "llama3"])
    assert "'llama3' differs from the model's own chat template" in capsys.readouterr().err
    cfg, recipe = lf_compat.load(argv=["--model_name_or_path", str(no_template_model), "--template", "alpaca"])
    assert cfg.model.template == "alpaca" and recipe["model"]["template"] == "alpaca"
    assert "the model has no chat template; using tunelab's 'alpaca'" in capsys.readouterr().err
    with pytest.raises(TunelabError, match="--template: 'llama3': the model has no chat template"):
        lf_compat.load(argv=["--model_name_or_path", str(no_template_model), "--template", "llama3"])


def test_parse_args_reads_flags_values_and_equals():
    assert lf_compat.parse_args(["--do_train", "--lr=1e-3", "--bf16", "false", "--dataset", "a,b",
                                 "--freeze_trainable_layers", "-2", "--plot-loss"]) == {
        "do_train": True, "lr": 1e-3, "bf16": False, "dataset": "a,b", "freeze_trainable_layers": -2,
        "plot_loss": True}


def test_train_cli_refuses_both_a_recipe_and_lf_args(capsys):
    assert main(["train", "recipes/quickstart.yaml", "--lf-args", "--stage", "sft"]) == 1
    assert "give a recipe or --lf-args" in capsys.readouterr().err
