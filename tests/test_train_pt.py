"""The pt stage: raw-text readers, end-of-document tokens, packing with documents kept apart,
runs that resume, and a pt run folder as the starting model of an sft run."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.text import load_documents, read_documents
from tunelab.errors import TunelabError
from tunelab.train import train
from tunelab.train.collate import IGNORE, SFTCollator, pack_examples
from tunelab.train.pretrain import document_ids, encode_documents
from tunelab.train.trainer import sft_loss
from train_helpers import StopAt

pytestmark = pytest.mark.usefixtures("one_thread")

PARAGRAPHS = [
    "K35 Acute appendicitis. The appendix is inflamed; the patient has a fever.",
    "发烧 38 度:多喝水,休息。感冒 and cough are common.",
    "Rest and water. The patient has a headache and a cough.",
    "A00 Cholera. Drink water; the patient is thirsty.",
] * 3


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return path


def test_txt_documents_are_blank_line_separated_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsame document\n\n\n第二个文档\n\nthird\n", encoding="utf-8")
    docs = read_documents(path)
    assert [d.text for d in docs] == ["first line\nsame document", "第二个文档", "third"]
    assert [d.source for d in docs] == [f"{path}:1", f"{path}:5", f"{path}:7"]


def test_table_rows_folders_and_registry_columns(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    (tmp_path / "docs" / "b.jsonl").write_text('{"text": "three"}\n{"text": "  "}\n', encoding="utf-8")
    assert [d.text for d in load_documents(str(tmp_path / "docs"))] == ["one", "two", "three"]
    (tmp_path / "c4.jsonl").write_text('{"body": "四"}\n', encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"c4_demo": {"file_name": "c4.jsonl", "columns": {"prompt": "body"}}}), encoding="utf-8")
    assert [d.text for d in load_documents("c4_demo", tmp_path)] == ["四"]


def test_row_without_text_column_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=rf"{path.name}:2: text: missing"):
        load_documents(str(path))


def test_documents_end_with_eos_and_long_ones_are_cut(tiny_tokenizer):
    ids = document_ids(tiny_tokenizer, "The patient has a fever.")
    assert ids[-1] == tiny_tokenizer.eos_token_id
    from tunelab.data.text import Document

    examples, stats = encode_documents(tiny_tokenizer, [Document(" ".join(PARAGRAPHS), "x:1")], cutoff_len=16)
    assert stats.split_documents == 1 and stats.pieces == len(examples) > 2
    assert all(len(e["input_ids"]) <= 16 and e["labels"] == e["input_ids"] for e in examples)
    assert sum(len(e["input_ids"]) for e in examples) >= stats.tokens - 1  # at most a lone last token left out


def _pieces(tokenizer, cutoff=24):
    from tunelab.data.text import Document

    return encode_documents(tokenizer, [Document(t, f"d:{i}") for i, t in enumerate(PARAGRAPHS[:5])], cutoff)[0]


def test_packed_documents_never_attend_to_each_other(tiny_llama, tiny_tokenizer):
    pieces = _pieces(tiny_tokenizer, cutoff=64)
    row = pack_examples(pieces, max_len=128)[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2  # several documents share the row
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers skips the packed-row mask.
        packed = tiny_llama(input_ids=torch.tensor([row["input_ids"]]),
                            position_ids=torch.tensor([row["position_ids"]]), use_cache=False).logits[0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])]):
            alone = tiny_llama(input_ids=torch.tensor([row["input_ids"][start:end]]), use_cache=False).logits[0]
            # Each document's logits are those it gets alone: no attention from another document.
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)


def test_packed_pt_loss_equals_unpacked(tiny_llama, tiny_tokenizer):
    pieces = _pieces(tiny_tokenizer)
    collate = SFTCollator(tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        unpacked = sft_loss(tiny_llama, collate([dict(p) for p in pieces]))
        packed_batch = collate(pack_examples(pieces, max_len=48))
        assert packed_batch["input_ids"].shape[0] < len(pieces)
        packed = sft_loss(tiny_llama, packed_batch)
    assert packed.item() == pytest.approx(unpacked.item(), abs=1e-5)
    # Loss on every token but each document's first: eos included.
    assert int((packed_batch["labels"] != IGNORE).sum()) == sum(len(p["input_ids"]) - 1 for p in pieces)


def test_text_perplexity_is_exp_of_the_mean_token_loss(tiny_llama, tiny_tokenizer):
    import math

    from tunelab.data.text import Document
    from tunelab.train.pretrain import text_perplexity

    docs = [Document(t, f"d:{i}") for i, t in enumerate(PARAGRAPHS[:4])]
    ppl, tokens = text_perplexity(tiny_llama, tiny_tokenizer, docs, cutoff_len=64, batch_size=1)
    pieces = encode_documents(tiny_tokenizer, docs, 64)[0]
    assert tokens == sum(len(p["input_ids"]) - 1 for p in pieces)
    with torch.no_grad():
        mean = sft_loss(tiny_llama, SFTCollator(tiny_tokenizer.pad_token_id)(pieces)).item()
    assert ppl == pytest.approx(math.exp(mean), rel=1e-5)


def run(tiny_dir, data, out, *overrides, callbacks=None):
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train=[{data}]", f"output_dir={out}",
                             "train.stage=pt", "train.bf16=false", "train.batch_size=2", "train.lr=5e-3",
                             "data.cutoff_len=32", "data.group_by_length=false", *overrides])
    return train(cfg, callbacks=callbacks)


def logged(out, key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_pt_run_learns_and_is_a_starting_model_for_sft(tiny_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file

    cpt = run(tiny_dir, text_file, tmp_path / "cpt", "train.max_steps=12", "data.val_size=2", "train.lr=1e-2")
    assert "pt data:" in capsys.readouterr().out
    losses = [loss for _, loss in logged(cpt)]
    assert losses[-1] < losses[0]
    assert logged(cpt, "eval_loss")  # held-out documents: domain perplexity = exp(eval loss)
    assert load_config(cpt / "config.yaml").train.stage == "pt"
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text("".join(json.dumps({"instruction": f"Code {i}", "output": "K35"}) + "\n" for i in range(8)),
                        encoding="utf-8")
    # Stacked: model.name is the pt run; its LoRA adapter goes on training (lr 0: exactly unchanged).
    cfg = load_config(None, [f"model.name={cpt}", f"data.train=[{sft_data}]", f"output_dir={tmp_path / 'sft'}",
                             "train.bf16=false", "train.max_steps=1", "train.lr=0", "train.batch_size=4"])
    sft = train(cfg)
    a, b = load_file(cpt / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from tunelab.models import load_model

    model, _ = load_model(str(sft))  # base from the pt run's config, then the adapter
    assert hasattr(model, "peft_config")


def test_pt_killed_and_resumed_equals_uninterrupted(tiny_dir, text_file, tmp_path):
    common = ["train.max_steps=8", "train.save_strategy=steps", "train.save_steps=3", "method.name=full"]
    whole = run(tiny_dir, text_file, tmp_path / "whole", *common)
    part = tmp_path / "part"
    run(tiny_dir, text_file, part, *common, callbacks=[StopAt(5)])
    run(tiny_dir, text_file, part, *common, "train.resume=auto")
    assert [s for s, _ in logged(part)] == list(range(1, 9))
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(part / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bad_pt_data_writes_nothing(tiny_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text column"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"bad.jsonl:1: text: missing"):
        run(tiny_dir, bad, tmp_path / "out")
    with pytest.raises(TunelabError, match="method.name: prefix cannot train the pt stage"):
        run(tiny_dir, bad, tmp_path / "out", "method.name=prefix")
    assert not (tmp_path / "out").exists()
