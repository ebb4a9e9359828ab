"""The dpo stage: pair readers, the objectives against hand computations, the reference
(adapter disabled = base model; precomputed otherwise), runs, resume and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.pairs import load_pairs, to_pair
from tunelab.data.render import encode
from tunelab.errors import TunelabError
from tunelab.train import train
from tunelab.train.preference import PairCollator, encode_pairs, preference_loss, sequence_logps
from train_helpers import WORDS, StopAt, hand_logp, pair_rows, perturbed, records, run_stage, unpadded_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Prefer the upper-case answer to the lower-case one."""
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_rows())


def test_ranking_shapes_give_the_same_conversations(tiny_tokenizer):
    alpaca = to_pair({"instruction": "Q?", "input": "", "chosen": "A", "rejected": "B"}, source="f:1")
    sharegpt = to_pair({"conversations": [{"from": "human", "value": "Q?"}],
                        "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}}, source="f:2")
    openai = to_pair({"messages": [{"role": "user", "content": "Q?"}],
                      "chosen": {"role": "assistant", "content": "A"}, "rejected": "B"}, source="f:3")
    trl = to_pair({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A"}],
                   "rejected": [{"role": "assistant", "content": "B"}]}, source="f:4")
    trl_text = to_pair({"prompt": "Q?", "chosen": "A", "rejected": "B"}, source="f:5")
    sft = encode(tiny_tokenizer, to_pair({"instruction": "Q?", "chosen": "A", "rejected": "x"}).chosen, mask_history=True)
    for pair in (alpaca, sharegpt, openai, trl, trl_text):
        assert [m.text for m in pair.chosen.messages] == ["Q?", "A"]
        assert [m.text for m in pair.rejected.messages] == ["Q?", "B"]
        # The answer is rendered and labelled exactly as SFT does it.
        assert encode(tiny_tokenizer, pair.chosen, mask_history=True) == sft


def test_bad_pairs_name_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"instruction": "Q", "chosen": "A", "rejected": "B"}\n{"instruction": "Q", "chosen": "A"}\n',
                    encoding="utf-8")
    with pytest.raises(TunelabError, match=r"p.jsonl:2: rejected: missing"):
        load_pairs(str(path))
    path.write_text('{"instruction": "Q", "chosen": "Same  answer", "rejected": "Same answer"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"p.jsonl:1: rejected: identical to chosen"):
        load_pairs(str(path))


def test_pair_sampling_matches_sft_sampling(pairs_file):
    from tunelab.data.registry import take_samples

    every = load_pairs(str(pairs_file))
    some = load_pairs(str(pairs_file), max_samples=5, seed=3)
    # The same seeded draw SFT datasets get, so a recipe's max_samples means one thing.
    assert [p.chosen for p in some] == [p.chosen for p in take_samples(every, "x", 5, None, 3)]
    assert len({p.chosen.messages[-1].text for p in some}) == 5
    with pytest.raises(TunelabError, match="max_samples must be at least 1, got 0"):
        load_pairs(str(pairs_file), max_samples=0)


def test_registry_ranking_entry(tmp_path, pairs_file):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"prefs": {
        "file_name": str(pairs_file), "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}}),
        encoding="utf-8")
    assert len(load_pairs("prefs", tmp_path)) == 16
    from tunelab.data.registry import load_dataset

    with pytest.raises(TunelabError, match="train.stage=dpo"):
        load_dataset("prefs", tmp_path)  # not an SFT dataset


def _toy_batch(tokenizer):
    pair = to_pair({"instruction": "The patient has a fever?", "chosen": "Rest and water.", "rejected": "Cough!"})
    examples, _ = encode_pairs(tokenizer, [pair], 64, "truncate")
    return PairCollator(tokenizer.pad_token_id)(examples)


def test_dpo_loss_and_gradients_match_a_hand_computation(tiny_llama, tiny_tokenizer):
    model = copy.deepcopy(tiny_llama).train()
    reference = perturbed(tiny_llama)
    batch = _toy_batch(tiny_tokenizer)
    beta = 0.3
    n = {side: int((batch["labels"][i] != -100).sum()) for i, side in enumerate(("chosen", "rejected"))}
    with torch.no_grad():
        ref, _ = sequence_logps(reference, batch)
    logps, counts = sequence_logps(model, batch)
    assert counts.tolist() == [n["chosen"], n["rejected"]]
    loss, metrics = preference_loss("sigmoid", logps, counts, ref, beta=beta)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    rows = unpadded_rows(batch)
    pc, pr = (hand_logp(model, *rows[0]), hand_logp(model, *rows[1]))
    with torch.no_grad():
        rc, rr = hand_logp(reference, *rows[0]), hand_logp(reference, *rows[1])
    z = beta * ((pc - rc) - (pr - rr))
    hand = -torch.log(1 / (1 + torch.exp(-z)))
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(z.item(), rel=1e-5)
    for key, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[key].grad, rtol=1e-4, atol=1e-6)


def test_objective_gradients_in_closed_form():
    logps = torch.tensor([-4.0, -6.0], requires_grad=True)  # chosen, rejected (sums)
    counts, ref = torch.tensor([2, 3]), torch.tensor([-5.0, -5.5])
    loss, _ = preference_loss("sigmoid", logps, counts, ref, beta=0.5)
    loss.backward()
    z = 0.5 * ((-4.0 + 5.0) - (-6.0 + 5.5))
    sig = 1 / (1 + math.exp(-z))
    assert loss.item() == pytest.approx(-math.log(sig))
    assert logps.grad.tolist() == pytest.approx([-0.5 * (1 - sig), 0.5 * (1 - sig)])
    logps.grad = None
    loss, _ = preference_loss("simpo", logps, counts, beta=2.0, gamma=0.5)
    loss.backward()
    z = 2.0 * (-4.0 / 2 + 6.0 / 3) - 0.5
    sig = 1 / (1 + math.exp(-z))
    assert loss.item() == pytest.approx(-math.log(sig))
    assert logps.grad.tolist() == pytest.approx([-(1 - sig) * 2.0 / 2, (1 - sig) * 2.0 / 3])
    loss, _ = preference_loss("orpo", torch.tensor([-2.0, -6.0]), counts, beta=0.1)
    ac, ar = -1.0, -2.0
    log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
    assert loss.item() == pytest.approx(-ac - 0.1 * math.log(1 / (1 + math.exp(-log_odds))), rel=1e-6)


def test_reference_with_adapter_disabled_equals_the_base_model(tiny_llama, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from tunelab.train.preference import PreferenceTrainer

    base = copy.deepcopy(tiny_llama)
    policy = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: the policy now differs from the base
    batch = _toy_batch(tiny_tokenizer)
    with torch.no_grad():
        want, _ = sequence_logps(base, batch)
        moved, _ = sequence_logps(policy, batch)
    trainer = PreferenceTrainer.__new__(PreferenceTrainer)  # only reference_logps is exercised
    trainer.pref_loss, trainer.reference = "sigmoid", "adapter"
    got = trainer.reference_logps(policy, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (moved - want).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.allclose(sequence_logps(policy, batch)[0], moved)  # adapter enabled again afterwards


def run(model, data, out, *overrides, callbacks=None):
    return run_stage("dpo", model, data, out, *overrides, callbacks=callbacks)


def test_dpo_lora_run_learns_the_preference(tiny_dir, pairs_file, tmp_path, capsys):
    out = run(tiny_dir, pairs_file, tmp_path / "dpo", "train.max_steps=12", "data.val_size=4", "train.eval_steps=6")
    assert "adapter disabled" in capsys.readouterr().out
    rows = records(out)
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert train_rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert train_rows[-1]["reward_margin"] > 0.05
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and {"eval_reward_accuracy", "eval_reward_margin"} <= set(evals[-1])
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] - 1e-6
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_dpo_full_method_precomputes_the_reference(tiny_dir, pairs_file, tmp_path, capsys):
    out = run(tiny_dir, pairs_file, tmp_path / "full", "train.max_steps=2", "method.name=full")
    assert "computed once" in capsys.readouterr().out
    first = [r for r in records(out) if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("kind", ["orpo", "simpo"])
def test_reference_free_objectives_train(tiny_dir, pairs_file, tmp_path, kind):
    out = run(tiny_dir, pairs_file, tmp_path / kind, "train.max_steps=8", f"train.pref_loss={kind}")
    margins = [r["reward_margin"] for r in records(out) if "loss" in r]
    assert margins[-1] > margins[0]


def test_dpo_killed_and_resumed_equals_uninterrupted(tiny_dir, pairs_file, tmp_path):
    from safetensors.torch import load_file

    common = ["train.max_steps=6", "train.save_strategy=steps", "train.save_steps=2"]
    whole = run(tiny_dir, pairs_file, tmp_path / "whole", *common)
    part = tmp_path / "part"
    run(tiny_dir, pairs_file, part, *common, callbacks=[StopAt(3)])
    run(tiny_dir, pairs_file, part, *common, "train.resume=auto")
    assert [r["step"] for r in records(part) if "loss" in r] == list(range(1, 7))
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_dpo_from_an_sft_lora_run_uses_that_run_as_reference(tiny_dir, pairs_file, tmp_path, capsys):
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": f"Normalize: {w}", "output": w.upper()}) + "\n"
                                for w in WORDS), encoding="utf-8")
    sft = train(load_config(None, [f"model.name={tiny_dir}", f"data.train=[{sft_data}]", f"output_dir={tmp_path / 'sft'}",
                                   "train.bf16=false", "train.max_steps=3", "train.lr=1e-2"]))
    capsys.readouterr()
    out = run(sft, pairs_file, tmp_path / "dpo", "train.max_steps=1")
    assert "computed once" in capsys.readouterr().out  # adapter disabled would be the base, not the SFT model
    assert [r for r in records(out) if "loss" in r][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    with pytest.raises(TunelabError, match="pref_reference: adapter"):
        run(sft, pairs_file, tmp_path / "dpo2", "train.max_steps=1", "train.pref_reference=adapter")


def test_stage_the_method_cannot_do_writes_nothing(tiny_dir, pairs_file, tmp_path):
    with pytest.raises(TunelabError, match="method.name: prefix cannot train the dpo stage"):
        run(tiny_dir, pairs_file, tmp_path / "out", "method.name=prefix")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Q", "chosen": "A", "rejected": "A"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: rejected: identical"):
        run(tiny_dir, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reward_metrics_are_gathered_from_every_process(tmp_path):
    """Two gloo processes: each logs the metrics of both processes' pairs, not only its own."""
    import torch.multiprocessing as mp
    from dist_helpers import gather_worker

    mp.spawn(gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text(encoding="utf-8"))
        assert got == {"reward_accuracy": [0.0, 1.0, 1.0], "logp_chosen": [-1.0, -2.0]}


def test_a_pairs_file_under_sft_names_the_dpo_stage(tmp_path, pairs_file):
    from tunelab.data.registry import load_dataset

    with pytest.raises(TunelabError) as info:
        load_dataset(str(pairs_file))  # no registry entry saying ranking: true
    assert str(info.value) == (f"{pairs_file}:1: chosen/rejected: a preference (ranking) dataset: "
                               "train it with train.stage=dpo")
