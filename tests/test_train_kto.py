"""The kto stage: unpaired feedback readers, the KL rows, the loss and its gradients against a
hand computation, runs with both reference modes, and bad input."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from tunelab.data.feedback import load_feedback, to_feedback
from tunelab.errors import TunelabError
from tunelab.train.collate import IGNORE
from tunelab.train.kto import FeedbackCollator, attach_kl_rows, encode_feedback, kto_loss
from tunelab.train.preference import sequence_logps
from train_helpers import WORDS, feedback_rows, hand_logp, perturbed, records, run_stage, unpadded_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory):
    """Upper-case answers are desirable, lower-case ones with a '!' are not (unpaired rows)."""
    return write_jsonl(tmp_path_factory.mktemp("kto") / "feedback.jsonl", feedback_rows())


def test_feedback_shapes(tmp_path):
    lf = to_feedback({"conversations": [{"from": "human", "value": "问题?"}, {"from": "gpt", "value": "答案"}],
                      "kto_tag": False}, source="f:1")
    alpaca = to_feedback({"instruction": "Q?", "output": "A", "label": "true"}, source="f:2")
    trl = to_feedback({"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant",
                                                                                    "content": "A"}], "label": 1})
    trl_text = to_feedback({"prompt": "Q?", "completion": "A", "label": True})
    pair = to_feedback({"instruction": "Q?", "chosen": "A", "rejected": "B"})
    assert [m.text for m in lf[0].conversation.messages] == ["问题?", "答案"] and lf[0].desirable is False
    for items in (alpaca, trl, trl_text):
        assert [(m.role, m.text) for m in items[0].conversation.messages] == [("user", "Q?"), ("assistant", "A")]
        assert items[0].desirable is True
    assert [(f.conversation.messages[-1].text, f.desirable) for f in pair] == [("A", True), ("B", False)]
    # LLaMA-Factory's registry entry names the tag column
    (tmp_path / "k.jsonl").write_text('{"instruction": "Q", "output": "A", "good": false}\n', encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"fb": {"file_name": "k.jsonl", "columns": {"prompt": "instruction", "response": "output",
                                                    "kto_tag": "good"}}}), encoding="utf-8")
    assert [f.desirable for f in load_feedback("fb", tmp_path)] == [False]


def test_bad_tags_name_file_line_and_field(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text('{"instruction": "Q", "output": "A", "kto_tag": true}\n{"instruction": "Q", "output": "A"}\n',
                    encoding="utf-8")
    with pytest.raises(TunelabError, match=r"k.jsonl:2: kto_tag: missing"):
        load_feedback(str(path))
    path.write_text('{"instruction": "Q", "output": "A", "label": "maybe"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"k.jsonl:1: label: expected true or false, got 'maybe'"):
        load_feedback(str(path))


def _examples(tokenizer, rows):
    items = [f for row in rows for f in to_feedback(row)]
    return encode_feedback(tokenizer, items, 64, "truncate")[0]


def test_kl_rows_pair_a_prompt_with_another_prompts_answer(tiny_tokenizer):
    rows = [{"instruction": f"Term {w}?", "output": f"{w.upper()} answer", "label": i % 2 == 0}
            for i, w in enumerate(WORDS[:4])]
    examples = _examples(tiny_tokenizer, rows)
    with_kl = attach_kl_rows(examples, 64, seed=1)
    answers = {tuple(e["input_ids"][e["answer_start"]:]): e["labels"][e["answer_start"]:] for e in examples}
    for row in with_kl:
        own = next(e for e in examples if e["input_ids"] == row["input_ids"])
        start = own["answer_start"]
        assert row["kl_ids"][:start] == own["input_ids"][:start]  # its own prompt...
        tail = tuple(row["kl_ids"][start:])
        assert tail in answers and tail != tuple(own["input_ids"][start:])  # ...with someone else's answer
        # supervised exactly where that answer is supervised in its own example
        assert row["kl_labels"][:start] == [IGNORE] * start and row["kl_labels"][start:] == answers[tail]


def test_kto_loss_and_gradients_match_a_hand_computation(tiny_llama, tiny_tokenizer):
    model = copy.deepcopy(tiny_llama).train()
    reference = perturbed(tiny_llama)
    rows = [{"instruction": "The patient has a fever?", "output": "Rest and water.", "label": True},
            {"instruction": "Cough?", "output": "Cough!", "label": False},
            {"instruction": "发烧怎么办?", "output": "多喝水。", "label": True}]
    batch = FeedbackCollator(tiny_tokenizer.pad_token_id)(attach_kl_rows(_examples(tiny_tokenizer, rows), 64, 0))
    n, beta, wd, wu = 3, 0.7, 1.3, 0.6
    with torch.no_grad():
        ref, _ = sequence_logps(reference, batch)
    target = {k: batch[k][:n] for k in ("input_ids", "attention_mask", "labels")}
    logps, _ = sequence_logps(model, target)
    with torch.no_grad():
        kl_logps, _ = sequence_logps(model, {k: batch[k][n:] for k in target})
    loss, metrics = kto_loss(logps, ref[:n], kl_logps, ref[n:], batch["desirable"], beta, wd, wu)
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    real = unpadded_rows(batch)
    with torch.no_grad():
        refs = [hand_logp(reference, *r) for r in real]
        z = max(0.0, sum(float(hand_logp(model, *real[n + i]) - refs[n + i]) for i in range(n)) / n)
    total = 0.0
    for i, good in enumerate(batch["desirable"].tolist()):
        r = hand_logp(model, *real[i]) - refs[i]
        total = total + (wd * (1 - torch.sigmoid(beta * (r - z))) if good else wu * (1 - torch.sigmoid(beta * (z - r))))
    hand = total / n
    hand.backward()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(z, abs=1e-5)
    for key, grad in ours.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[key].grad, rtol=1e-4, atol=1e-6)


def test_kto_gradient_in_closed_form():
    logps = torch.tensor([-4.0, -6.0], requires_grad=True)  # a desirable and an undesirable answer
    ref, kl_logps, kl_ref = torch.tensor([-5.0, -5.5]), torch.tensor([-7.0, -3.0]), torch.tensor([-8.0, -3.2])
    loss, metrics = kto_loss(logps, ref, kl_logps, kl_ref, torch.tensor([True, False]), beta=0.5,
                             chosen_weight=2.0, rejected_weight=1.0)
    loss.backward()
    z = ((-7.0 + 8.0) + (-3.0 + 3.2)) / 2  # 0.6: positive, kept
    sd, su = 1 / (1 + math.exp(-0.5 * (1.0 - z))), 1 / (1 + math.exp(-0.5 * (z + 0.5)))
    assert loss.item() == pytest.approx((2.0 * (1 - sd) + (1 - su)) / 2)
    # d/dr of λ(1 - σ(β(±(r - z)))) = ∓ λ β σ (1 - σ), halved by the mean over two examples
    assert logps.grad.tolist() == pytest.approx([-2.0 * 0.5 * sd * (1 - sd) / 2, 0.5 * su * (1 - su) / 2])
    assert metrics["reward_accuracy"].tolist() == [1.0, 1.0]  # rewards 0.5 and -0.25 have the right signs
    _, clamped = kto_loss(logps, ref, kl_ref, kl_logps, torch.tensor([True, False]))
    assert clamped["kl"].item() == 0.0  # a negative KL estimate is clamped to 0


def run(model, data, out, *overrides):
    return run_stage("kto", model, data, out, *overrides)


def test_kto_lora_run_learns_the_feedback(tiny_dir, feedback_file, tmp_path, capsys):
    held = tmp_path / "held.jsonl"  # two of each kind, so every evaluation has a margin
    held.write_text("".join(json.dumps({"instruction": f"Normalize: {w} x", "output": f"{w.upper()} x" if good
                                        else f"{w} x!", "kto_tag": good}, ensure_ascii=False) + "\n"
                            for w, good in (("fever", True), ("发烧", False), ("rest", True), ("cough", False))),
                    encoding="utf-8")
    out = run(tiny_dir, feedback_file, tmp_path / "kto", "train.max_steps=10", f"data.eval=[{held}]",
              "train.eval_steps=5", "train.pref_beta=0.5")
    printed = capsys.readouterr().out
    assert "adapter disabled" in printed and "8 desirable, 8 undesirable" in printed
    rows = records(out)
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # policy == reference: 1 - σ(0)
    assert all(abs(train_rows[0].get(k, 0.0)) < 1e-4 for k in ("reward_chosen", "reward_rejected"))
    margins = [r["reward_margin"] for r in train_rows if "reward_margin" in r]  # a batch may hold one kind only
    assert margins[-1] > 0.05
    evals = [r for r in rows if "eval_loss" in r]
    assert evals and {"eval_reward_accuracy", "eval_reward_margin", "eval_kl"} <= set(evals[-1])
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


def test_kto_full_method_precomputes_the_reference(tiny_dir, feedback_file, tmp_path, capsys):
    out = run(tiny_dir, feedback_file, tmp_path / "full", "train.max_steps=2", "method.name=full")
    assert "kto reference: the starting model's log-probs, computed once" in capsys.readouterr().out
    assert [r for r in records(out) if "loss" in r][0]["loss"] == pytest.approx(0.5, abs=1e-4)


def test_kto_bad_settings_write_nothing(tiny_dir, feedback_file, tmp_path):
    with pytest.raises(TunelabError, match="train.pref_loss: orpo is a dpo-stage objective"):
        run(tiny_dir, feedback_file, tmp_path / "out", "train.pref_loss=orpo")
    one = tmp_path / "one.jsonl"
    one.write_text('{"instruction": "Q", "output": "A", "kto_tag": true}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match="needs at least 2 usable examples"):
        run(tiny_dir, one, tmp_path / "out")
    with pytest.raises(TunelabError, match=r"train.kto_chosen_weight: 0(\.0)? must be > 0"):
        run(tiny_dir, feedback_file, tmp_path / "out", "train.kto_chosen_weight=0")
    assert not (tmp_path / "out").exists()


def test_kto_data_under_sft_is_one_line_before_any_model_loads(tiny_dir, feedback_file, tmp_path, monkeypatch):
    import tunelab.models
    from tunelab.data.registry import load_dataset

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tunelab.models, "load_model", no_model)
    with pytest.raises(TunelabError) as info:
        run_stage("sft", tiny_dir, feedback_file, tmp_path / "out")
    assert str(info.value) == (f"{feedback_file}:1: label: a desirable/undesirable tag (KTO feedback): train it "
                               "with train.stage=kto (or drop the column to train on every answer)")
    assert not (tmp_path / "out").exists()
    # every tagged shape the kto reader takes, and a registry entry that names its tag column
    shapes = {"lf.jsonl": ('{"instruction": "Q", "output": "A", "kto_tag": "no"}\n', "1: kto_tag"),
              "trl.jsonl": ('{"prompt": "Q", "completion": "A", "label": "false"}\n', "1: label"),
              "sheet.csv": ("instruction,output,label\nQ,A,1\n", "2: label")}  # the header is row 1
    for name, (text, line_field) in shapes.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(TunelabError, match=rf"^{re.escape(str(tmp_path / name))}:{line_field}: a desirable/"
                                               r"undesirable tag \(KTO feedback\): train it with train.stage=kto"):
            load_dataset(str(tmp_path / name))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"fb": {"file_name": "lf.jsonl", "columns": {"kto_tag": "good"}}}), encoding="utf-8")
    with pytest.raises(TunelabError, match=r"^fb: columns.kto_tag: .*train.stage=kto"):
        load_dataset("fb", tmp_path)
    # a class label is not a desirable/undesirable tag: still SFT data
    (tmp_path / "classes.jsonl").write_text('{"instruction": "Q", "output": "A", "label": "positive"}\n',
                                            encoding="utf-8")
    assert [m.text for m in load_dataset(str(tmp_path / "classes.jsonl"))[0].messages] == ["Q", "A"]
