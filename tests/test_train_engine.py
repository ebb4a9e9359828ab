"""The training engine end to end on a tiny random Llama saved as a model folder."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import TrainerCallback

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import train
from train_helpers import StopAt

WORDS = ["fever", "cough", "rest", "water", "patient", "发烧", "感冒", "headache"]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models: one thread. With several busy processes on 2 cores, OpenMP threads
    waiting on each other at every small op made these tests >10x slower."""
    before = torch.get_num_threads()
    if not request.node.get_closest_marker("slow"):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small learnable task: copy a word in upper case (Chinese unchanged)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "norm.jsonl"
    rows = []
    for i in range(40):
        word = rng.choice(WORDS)
        rows.append({"instruction": f"Normalize: {word} {i % 5}", "input": "", "output": f"{word.upper()} {i % 5}"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run(tiny_dir, data_file, out, *overrides, callbacks=None):
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data_file}]", f"output_dir={out}",
                             "train.bf16=false", "train.batch_size=4", "train.lr=5e-3", "data.group_by_length=false",
                             *overrides])
    return train(cfg, callbacks=callbacks)


class WatchParams(TrainerCallback):
    """Snapshot every parameter at the start; at the end record which ones changed."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), self.before[n])}


class GradAtFirstStep(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def logged(out, key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.parametrize("method", ["lora", "freeze", "prefix"])
def test_only_trainable_parameters_change(tiny_dir, data_file, tmp_path, method):
    watch = WatchParams()
    run(tiny_dir, data_file, tmp_path / "run", f"method.name={method}", "method.freeze_trainable_layers=1",
        "train.max_steps=3", callbacks=[watch])
    frozen = set(watch.before) - watch.trainable
    assert frozen and watch.trainable
    assert not (watch.changed & frozen), "a frozen parameter moved"
    assert watch.changed == watch.trainable


def test_loss_falls_and_run_folder_is_complete(tiny_dir, data_file, tmp_path, capsys):
    out = run(tiny_dir, data_file, tmp_path / "run", "method.name=full", "train.max_steps=30",
              "train.lr=3e-3", "data.val_size=0.2", "train.eval_steps=10")
    assert "trainable params: " in capsys.readouterr().out
    losses = [loss for _, loss in logged(out)]
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]
    evals = logged(out, "eval_loss")
    assert [s for s, _ in evals] == [10, 20, 30] and evals[-1][1] < evals[0][1]
    for name in ("config.yaml", "model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
                 "metrics.jsonl", "loss.png", "trainer_state.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "final eval loss" in readme and "efficiency" in readme
    assert load_config(out / "config.yaml").model.name == str(tiny_dir)


def test_accumulation_is_equivalent_to_a_bigger_batch(tiny_dir, data_file, tmp_path):
    results = []
    for batch, accum in [(8, 1), (2, 4)]:
        grads = GradAtFirstStep()
        out = run(tiny_dir, data_file, tmp_path / f"b{batch}", "method.name=full", "train.max_steps=1",
                  f"train.batch_size={batch}", f"train.grad_accum={accum}", "train.max_grad_norm=0",
                  "data.max_samples=8", callbacks=[grads])
        results.append((logged(out)[0][1], grads.grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_killed_and_resumed_equals_uninterrupted(tiny_dir, data_file, tmp_path):
    common = ["train.max_steps=14", "train.save_strategy=steps", "train.save_steps=5", "method.dropout=0.1",
              "data.group_by_length=true"]
    whole = run(tiny_dir, data_file, tmp_path / "whole", *common)
    part = tmp_path / "part"
    run(tiny_dir, data_file, part, *common, callbacks=[StopAt(7)])
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint-5"]
    assert [s for s, _ in logged(part)] == list(range(1, 8))
    with open(part / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 8, "lo')  # the kill cut a line short
    run(tiny_dir, data_file, part, *common, "train.resume=auto")  # continues from step 5
    assert [s for s, _ in logged(part)] == list(range(1, 15))  # no step skipped or repeated
    from safetensors.torch import load_file

    a, b = load_file(whole / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-14"]


def test_existing_run_is_not_overwritten(tiny_dir, data_file, tmp_path):
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(TunelabError, match="already holds a run"):
        run(tiny_dir, data_file, out, "train.max_steps=1")
    run(tiny_dir, data_file, out, "train.max_steps=1", "overwrite=true")


def test_merged_export_matches_adapter_logits(tiny_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import load_model
    from tunelab.train.export import merge_export

    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=4", "train.lr=2e-2")
    adapter_model, tok = load_model(str(out))
    merged_dir = merge_export(out, tmp_path / "merged")
    with pytest.raises(TunelabError, match="already exists"):
        merge_export(out, merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Normalize: 发烧 1"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        want = adapter_model(**ids).logits
        got = merged(**ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        assert (base(**ids).logits - want).abs().max() > 1e-3  # the adapter did change the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_two_process_ddp_matches_one_process(tiny_dir, data_file, tmp_path):
    """torchrun, 2 CPU processes (gloo): one run folder, same step as one process on the same 8 rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    common = ["method.name=full", "train.max_steps=1", "data.max_samples=8", "train.max_grad_norm=0"]
    single = run(tiny_dir, data_file, tmp_path / "single", *common, "train.batch_size=8")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: [{data_file}], group_by_length: false}}\n"
                      "train: {bf16: false, batch_size: 2, grad_accum: 2, lr: 5.0e-3}\n", encoding="utf-8")
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "tunelab", "train", str(recipe),
                           f"output_dir={out}", *common], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run saved to") == 1  # only rank 0 reports
    assert [s for s, _ in logged(out)] == [1]  # one metrics log, not one per process
    assert "2 process(es)" in (out / "README.md").read_text(encoding="utf-8")
    assert logged(out)[0][1] == pytest.approx(logged(single)[0][1], rel=1e-5)
    a, b = load_file(single / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


class CtrlCAt(TrainerCallback):
    """Send this process a real SIGINT during step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_a_checkpoint_then_resume_finishes(tiny_dir, data_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, data_file, out, "train.max_steps=6", callbacks=[CtrlCAt(3)])
    assert (out / "checkpoints" / "checkpoint-3").is_dir()
    assert not (out / "adapter_model.safetensors").exists()  # no final model from a cut-short run
    run(tiny_dir, data_file, out, "train.max_steps=6", "train.resume=auto")
    assert [s for s, _ in logged(out)] == list(range(1, 7))


class MatmulDtype(TrainerCallback):
    """Record the dtype the first attention projection computes in during training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.dtypes = set()
        layer = next(m for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
        layer.register_forward_hook(lambda mod, inp, out: self.dtypes.add(out.dtype) if mod.training else None)


def test_packing_checkpointing_bf16_and_early_stopping(tiny_dir, data_file, tmp_path):
    dtype, watch = MatmulDtype(), WatchParams()
    out = run(tiny_dir, data_file, tmp_path / "run", "data.packing=true", "data.cutoff_len=128",
              "train.gradient_checkpointing=true", "train.bf16=force", "data.val_size=8", "train.eval_steps=1",
              "train.early_stopping_patience=1", "train.lr=3.0", "train.max_steps=40", "method.dropout=0.05", callbacks=[dtype, watch])
    assert dtype.dtypes == {torch.bfloat16}  # bf16 autocast on CPU, over fp32 master weights
    assert watch.changed == watch.trainable  # gradients reach LoRA through checkpointed layers
    steps = [s for s, _ in logged(out)]
    assert steps[-1] < 40  # a diverging run stops once eval loss stops improving
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    efficiency = [r["efficiency"] for r in rows if "efficiency" in r]
    assert efficiency and 0.8 < efficiency[-1] <= 1.0  # packed rows are mostly real tokens
    assert "packed rows" in (out / "README.md").read_text(encoding="utf-8")


def colour_pixels(png, rgb, tol=0.06):
    import matplotlib.image as mpimg
    import numpy as np

    image = mpimg.imread(png)[..., :3]
    return int((np.abs(image - np.array(rgb)).max(axis=-1) < tol).sum())


def test_loss_plot_draws_both_curves(tmp_path):
    from tunelab.train.runfolder import plot_losses

    records = [{"step": s, "loss": 3 - s * 0.1} for s in range(1, 21)] + [
        {"step": s, "eval_loss": 3.2 - s * 0.05} for s in (5, 10, 15, 20)]
    plot_losses(records, tmp_path / "loss.png", "t")
    assert colour_pixels(tmp_path / "loss.png", (0.122, 0.467, 0.706)) > 300  # tab:blue, train
    assert colour_pixels(tmp_path / "loss.png", (1.0, 0.498, 0.055)) > 300  # tab:orange, eval
    plot_losses(records[:20], tmp_path / "train_only.png", "t")
    assert colour_pixels(tmp_path / "train_only.png", (1.0, 0.498, 0.055)) < 50


@pytest.mark.slow
def test_quickstart_recipe_on_the_builtin_model(tmp_path, monkeypatch, capsys):
    """`tunelab train recipes/quickstart.yaml output_dir=DIR train.max_steps=N` as written."""
    from pathlib import Path

    from tunelab.cli import main

    monkeypatch.chdir(Path(__file__).parents[1])
    out = tmp_path / "qs"
    assert main(["train", "recipes/quickstart.yaml", f"output_dir={out}", "train.max_steps=4",
                 "train.eval_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "trainable params: " in printed and f"run saved to {out}" in printed
    for name in ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "chat_template.jinja", "metrics.jsonl", "loss.png", "trainer_state.json", "README.md"):
        assert (out / name).is_file(), name
    assert [s for s, _ in logged(out)] == [1, 2, 3, 4]
    assert [s for s, _ in logged(out, "eval_loss")] == [2, 4]
    assert colour_pixels(out / "loss.png", (0.122, 0.467, 0.706)) > 300
    assert colour_pixels(out / "loss.png", (1.0, 0.498, 0.055)) > 300
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "builtin:smollm2-135m-instruct" in readme and "final eval loss" in readme


@pytest.mark.parametrize("overrides, message", [
    (["data.train=[]"], "data.train: no training data"),
    (["data.train=[nowhere/missing.jsonl]"], "missing.jsonl: no such file"),
    (["data.val_size=40"], "data.val_size: 40 leaves no training"),
    (["train.resume=nowhere/checkpoint-3"], "train.resume: .* is not a checkpoint folder"),
    (["method.name=freeze", "method.freeze_trainable_layers=9"], "freeze_trainable_layers: 9"),
])
def test_bad_input_is_one_line_error(tiny_dir, data_file, tmp_path, overrides, message):
    with pytest.raises(TunelabError, match=message) as info:
        run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=1", *overrides)
    assert "\n" not in str(info.value)
    from tunelab.train.runfolder import holds_run

    assert not holds_run(tmp_path / "run")  # fixing the input and running again just works


def test_output_dir_that_is_a_file_or_a_finished_run(tiny_dir, data_file, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TunelabError, match="is not a folder"):
        run(tiny_dir, data_file, tmp_path / "file", "train.max_steps=1")
    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=1")
    with pytest.raises(TunelabError, match="has no checkpoint to resume from"):
        run(tiny_dir, data_file, out, "train.max_steps=1", "train.resume=auto")


def test_export_cli_refuses_to_overwrite(tiny_dir, data_file, tmp_path, capsys):
    from tunelab.cli import main

    out = run(tiny_dir, data_file, tmp_path / "run", "train.max_steps=1")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(out), "--merge", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    # one step leaves LoRA's B at zero: the export check would rightly call it the base model
    assert main(["export", str(out), "--merge", str(tmp_path / "taken"), "--overwrite", "--allow-identical"]) == 0
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not (tmp_path / "taken" / "keep.txt").exists()


def test_prefix_runs_cannot_be_merged(tiny_dir, data_file, tmp_path):
    from tunelab.train.export import merge_export

    out = run(tiny_dir, data_file, tmp_path / "run", "method.name=prefix", "train.max_steps=1")
    with pytest.raises(TunelabError, match="cannot be merged"):
        merge_export(out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_eval_file_gives_eval_loss_at_the_end(tiny_dir, data_file, tmp_path):
    out = run(tiny_dir, data_file, tmp_path / "run", f"data.eval=[{data_file}]", "data.max_samples=8",
              "train.max_steps=2")
    assert [s for s, _ in logged(out, "eval_loss")] == [2]


def test_training_can_start_from_a_run_folder(tiny_dir, data_file, tmp_path):
    from tunelab.models import load_model

    first = run(tiny_dir, data_file, tmp_path / "first", "train.max_steps=2", "train.lr=2e-2")
    watch = WatchParams()
    second = run(tiny_dir, data_file, tmp_path / "second", f"model.name={first}", "train.max_steps=2",
                 callbacks=[watch])
    assert watch.changed and all("lora_" in n for n in watch.changed)  # the same adapter keeps training
    continued, _ = load_model(str(second))
    before, _ = load_model(str(first))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (continued(input_ids=ids).logits - before(input_ids=ids).logits).abs().max() > 0
    full = run(tiny_dir, data_file, tmp_path / "full", f"model.name={first}", "method.name=full",
               "train.max_steps=1")
    assert (full / "model.safetensors").is_file()  # the adapter was merged, then everything trained
