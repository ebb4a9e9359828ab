"""``icd10cm-text``: the offline domain corpus for continued pre-training."""

from __future__ import annotations

import json

import pytest

from tunelab.errors import TunelabError
from tunelab.workshop.builtin import build_builtin

pytest.importorskip("simple_icd_10_cm")


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_corpus_has_held_out_documents_and_a_pretraining_registry_entry(tmp_path):
    from tunelab.data.text import load_documents

    sizes = build_builtin("icd10cm-text", tmp_path, chapters=11, max_docs=40, validation_fraction=0.1,
                          test_fraction=0.1)
    assert sizes == {"validation": 4, "test": 4, "train": 33}  # 32 categories + the chapter document
    train, test = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "test.jsonl")
    assert not {r["doc"] for r in train} & {r["doc"] for r in test}  # whole categories held out
    appendix = [r["text"] for r in train + test if r["doc"] == "K35"]
    chapter = next(r["text"] for r in train if r["doc"] == "chapter 11")
    assert "Diseases of the digestive system" in chapter and "Block K35-K38" in chapter
    info = json.loads((tmp_path / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["icd10cm-text_train"]["columns"] == {"prompt": "text"}  # LLaMA-Factory's pre-training shape
    docs = load_documents("icd10cm-text_test", tmp_path)
    assert [d.text for d in docs] == [r["text"] for r in test]
    if appendix:
        assert "K35.80 Unspecified acute appendicitis" in appendix[0]


def test_category_text_and_excluded_terms(tmp_path):
    import simple_icd_10_cm as cm

    from tunelab.workshop.builtin.icd10cm_text import category_document

    text = category_document(cm, "K35", set())
    assert text.startswith("ICD-10-CM category K35: Acute appendicitis. It belongs to chapter 11")
    assert "Acute appendicitis NOS" in text
    held = tmp_path / "test.jsonl"
    held.write_text(json.dumps({"term": "Acute appendicitis NOS", "output": "x"}) + "\n", encoding="utf-8")
    from tunelab.workshop.builtin.icd10cm_text import _banned_terms

    assert "Acute appendicitis NOS" not in category_document(cm, "K35", _banned_terms(str(held)))
    with pytest.raises(TunelabError, match="chapters: no chapter '99'"):
        build_builtin("icd10cm-text", tmp_path / "x", chapters="99")
    held.write_text('{"output": "x"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"test.jsonl:1: term: missing"):
        build_builtin("icd10cm-text", tmp_path / "x", chapters=11, exclude=str(held))


def test_chinese_disease_corpus_holds_out_whole_diseases(tmp_path, tiny_tokenizer):
    pytest.importorskip("faker_healthcare")
    from tunelab.data.text import load_documents
    from tunelab.train.pretrain import document_ids

    sizes = build_builtin("zh-disease-text", tmp_path, validation_fraction=0.1, test_fraction=0.1)
    assert sizes == {"validation": 16, "test": 16, "train": 126}  # 158 diseases
    train, test = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "test.jsonl")
    assert not {r["disease"] for r in train} & {r["disease"] for r in test}
    diabetes = next(r["text"] for r in train + test + _rows(tmp_path / "validation.jsonl")
                    if r["disease"] == "非胰岛素依赖型糖尿病")
    assert "(ICD-10 编码 E11.9)由内分泌科诊治" in diabetes and "二甲双胍" in diabetes
    assert "Type 2 diabetes mellitus without complications" in diabetes  # the ICD-10-CM name, linked by code
    docs = load_documents("zh-disease-text_test", tmp_path)
    assert [d.text for d in docs] == [r["text"] for r in test]
    ids = document_ids(tiny_tokenizer, docs[0].text)
    assert tiny_tokenizer.decode(ids[:-1]) == docs[0].text and ids[-1] == tiny_tokenizer.eos_token_id
