"""Built-in datasets from real packaged data, and the `tunelab data` workshop verbs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.workshop.builtin import build_builtin, build_icd10cm_norm

pytest.importorskip("simple_icd_10_cm")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def norm150(tmp_path_factory):
    out = tmp_path_factory.mktemp("norm150")
    sizes = build_icd10cm_norm(out, max_codes=150, min_synonyms=3, seed=42, validation_fraction=0)
    return out, sizes


def test_icd10cm_norm_bounded_config_separates_seen_and_unseen(norm150):
    import simple_icd_10_cm as cm

    out, sizes = norm150
    assert sizes["test"] == 150 and "validation" not in sizes and sizes["test_unseen"] > 0
    train, test, unseen = (_rows(out / f"{s}.jsonl") for s in ("train", "test", "test_unseen"))
    assert len(train) == sizes["train"] >= 2 * 150  # >= 3 synonyms: one held out, >= 2 trained
    assert {r["code"] for r in train} == {r["code"] for r in test}  # one held-out synonym per seen code
    assert len({r["code"] for r in test}) == 150
    assert not {r["code"] for r in unseen} & {r["code"] for r in train}
    assert not {r["term"].casefold() for r in test} & {r["term"].casefold() for r in train}
    for row in train[:50] + test[:20]:
        assert row["output"] == cm.get_description(row["code"])
        assert row["term"].casefold() != row["output"].casefold()  # never a description mapped to itself
        assert f"Term: {row['term']}\n" in row["instruction"] and row["input"] == ""
        assert cm.is_chapter(row["chapter"]) and row["chapter_title"] == cm.get_description(row["chapter"])
    info = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["icd10cm-norm_train"] == {"file_name": "train.jsonl", "formatting": "alpaca",
                                          "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "simple-icd-10-cm" in readme and f"| train | {sizes['train']} |" in readme


def test_icd10cm_norm_is_reproducible_and_loads_as_conversations(norm150, tmp_path):
    from tunelab.data.registry import load_dataset

    out, sizes = norm150
    again = build_icd10cm_norm(tmp_path, max_codes=150, min_synonyms=3, seed=42, validation_fraction=0, answer="both")
    assert again == sizes
    first = _rows(tmp_path / "test.jsonl")[0]
    assert re.match(r"^[A-Z]\d\d\.?\w* ", first["output"]) and first["output"].startswith(first["code"] + " ")
    convs = load_dataset("icd10cm-norm_test", out)
    assert len(convs) == 150 and convs[0].messages[-1].role == "assistant"


def test_whole_catalogue_numbers():
    from tunelab.workshop.builtin.icd10cm import synonyms_by_code

    table = synonyms_by_code()
    terms = sum(len(t) for t in table.values())
    # 8,572 inclusion terms on leaf codes, minus those equal to their description or shared by codes
    assert 4300 <= len(table) <= 4408 and 8400 <= terms <= 8572


def test_icd10cm_chapter_groups_categories(tmp_path):
    sizes = build_builtin("icd10cm-chapter", tmp_path, per_label=40)
    splits = {s: _rows(tmp_path / f"{s}.jsonl") for s in sizes}
    labels = {r["output"] for r in splits["train"]}
    assert len(labels) >= 20 and all(re.search(r"\([A-Z]\w\w-[A-Z]\w\w\)$", label) for label in labels)
    groups = [{r["group"] for r in rows} for rows in splits.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert abs(len(splits["test"]) - 0.1 * sum(sizes.values())) < 40


def test_zh_disease_records_are_chinese_json(tmp_path):
    sizes = build_builtin("zh-disease", tmp_path)
    test = _rows(tmp_path / "test.jsonl")
    train = _rows(tmp_path / "train.jsonl")
    assert sizes["test"] == len(test) >= 140 and sizes["validation"] == sizes["test"]
    answer = json.loads(test[0]["output"])
    assert set(answer) == {"诊断", "ICD编码", "科室", "用药"} and answer["诊断"] == test[0]["disease"]
    assert test[0]["instruction"].startswith("你是一名医生") and "症状:" in test[0]["instruction"]
    assert {r["disease"] for r in test} <= {r["disease"] for r in train if r["task"] == "diagnosis"}
    assert {r["instruction"] for r in test}.isdisjoint({r["instruction"] for r in train})
    assert "\\u" not in (tmp_path / "train.jsonl").read_text(encoding="utf-8")
    assert {"icd", "department", "drugs"} <= {r["task"] for r in train}


def test_builder_option_errors(tmp_path):
    with pytest.raises(TunelabError, match="unknown built-in dataset 'nope'"):
        build_builtin("nope", tmp_path)
    with pytest.raises(TunelabError, match="icd10cm-norm: unknown option 'codez'"):
        build_builtin("icd10cm-norm", tmp_path, codez=3)
    with pytest.raises(TunelabError, match="answer: must be one of"):
        build_icd10cm_norm(tmp_path, answer="json")


def test_cli_build_mix_clean(tmp_path, capsys):
    assert main(["data", "build", "zh-disease", "--out", str(tmp_path / "zh"), "--seed", "1"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["data", "build", "icd10cm-norm", "--out", str(tmp_path / "n"), "--max-codes", "30",
                 "--min-synonyms", "3", "--set", "validation_fraction=0"]) == 0
    assert len(_rows(tmp_path / "n/test.jsonl")) == 30
    assert main(["data", "mix", f"{tmp_path}/n/train.jsonl:1", f"{tmp_path}/zh/train.jsonl:1", "--total", "40",
                 "--out", str(tmp_path / "mix")]) == 0
    assert len(_rows(tmp_path / "mix/mix_train.jsonl")) == 40
    assert main(["data", "clean", f"{tmp_path}/mix/mix_train.jsonl", f"{tmp_path}/mix/mix_train.jsonl",
                 "--out", str(tmp_path / "clean")]) == 0
    out = capsys.readouterr().out
    assert "exact duplicate" in out and len(_rows(tmp_path / "clean/clean_train.jsonl")) <= 40
    assert main(["data", "build", "icd10cm-norm"]) == 1
    assert "--out DIR is required" in capsys.readouterr().err


def test_output_folder_rebuilds_cleanly_and_refuses_collisions(tmp_path):
    from tunelab.workshop.output import write_dataset

    row = {"instruction": "q", "input": "", "output": "a"}
    write_dataset(tmp_path, "a", {"train": [row], "validation": [row]})
    write_dataset(tmp_path, "a", {"train": [row, row]})  # a rebuild without validation
    assert not (tmp_path / "validation.jsonl").exists()
    assert list(json.loads((tmp_path / "dataset_info.json").read_text())) == ["a_train"]
    write_dataset(tmp_path, "b", {"train": [row]}, file_prefix="b_")  # prefixed files share the folder
    with pytest.raises(TunelabError, match="train.jsonl already holds dataset 'a_train'"):
        write_dataset(tmp_path, "c", {"train": [row]})
    assert set(json.loads((tmp_path / "build_info.json").read_text())) == {"a", "b"}
    with pytest.raises(TunelabError, match="max_codes: expected int or null, got 'abc'"):
        build_builtin("icd10cm-norm", tmp_path / "x", max_codes="abc")
