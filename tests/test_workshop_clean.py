"""Hygiene: injected duplicates and train/test leaks are caught; text is cleaned up."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.workshop.clean import clean, rough_token_count, tidy
from tunelab.workshop.near import NearIndex, normalize

def _rows(n: int, seed: int, tag: str) -> list[dict]:
    """Distinct rows: random pseudo-words, so unrelated rows share few character 5-grams."""
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return [{"instruction": f"{tag} {i}: " + " ".join(word() for _ in range(12)), "input": "",
             "output": " ".join(word() for _ in range(10))} for i in range(n)]


def _save(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_injected_duplicates_are_caught(tmp_path):
    rows = _rows(200, 0, "case")
    exact = [dict(rows[i], instruction=rows[i]["instruction"].upper() + "  ") for i in range(0, 30, 3)]  # 10
    near = [dict(rows[i], output=rows[i]["output"] + " today") for i in range(100, 130, 2)]  # 15
    zh = [{"instruction": "孕妇感冒发烧38度应该怎么办呢?", "input": "", "output": "可以物理降温,多喝温水,注意休息。"},
          {"instruction": "孕妇感冒发烧38度应该怎么办呢?", "input": "", "output": "可以物理降温,多喝温水,注意休息!"}]
    data = rows + exact + near + zh
    random.Random(1).shuffle(data)
    report = clean([_save(tmp_path / "train.jsonl", data)], tmp_path / "out")
    dropped = report.dropped["train"]
    assert dropped["exact duplicate"] == 11  # 10 upper-cased copies + the Chinese pair (punctuation only)
    assert dropped["near duplicate (>= 0.8)"] == 15
    assert report.rows_out["train"] == 200 + 1
    assert len(_load(tmp_path / "out/clean_train.jsonl")) == 201


def test_train_test_leaks_are_caught_exact_and_near(tmp_path):
    train = _rows(150, 2, "train")
    test = _rows(40, 3, "test")
    test[0] = dict(train[5])                                                   # exact leak
    test[1] = dict(train[6], instruction=train[6]["instruction"] + " please")  # near leak
    test[2] = dict(train[7], output="a different answer")                       # same prompt, other answer
    args = ([_save(tmp_path / "train.jsonl", train)], tmp_path / "out")
    report = clean(*args, test=[_save(tmp_path / "test.jsonl", test)])
    kinds = sorted(kind for _, _, kind, _ in report.leaks)
    assert kinds == ["exact", "exact", "near"]
    assert {src.rsplit(":", 1)[1] for src, _, _, _ in report.leaks} == {"1", "2", "3"}
    assert report.rows_out == {"train": 147, "test": 40}
    kept = {r["instruction"] for r in _load(tmp_path / "out/clean_train.jsonl")}
    assert not {train[i]["instruction"] for i in (5, 6, 7)} & kept
    report = clean(*args, test=[tmp_path / "test.jsonl"], leak_action="drop-test")
    assert report.rows_out == {"train": 150, "test": 37}
    report = clean(*args, test=[tmp_path / "test.jsonl"], near=None, leak_action="report")
    assert len(report.leaks) == 2 and report.rows_out == {"train": 150, "test": 40}


def test_tidy_removes_control_characters_and_extra_space():
    assert tidy("\ufeffHello\u200b world \r\n\r\n\r\n\r\nnext\x07 line\t \n") == "Hello world\n\nnext line"
    assert tidy("  你好\u3000世界  ") == "你好\u3000世界"
    assert normalize("Ｈｅｌｌｏ, WORLD!") == "hello world"


def test_cleanup_and_length_filter(tmp_path):
    rows = [{"instruction": "Q1\x00 ", "input": "", "output": "A short answer"},
            {"instruction": "Q2", "input": "", "output": "\u200b \x01"},
            {"instruction": "Q3", "input": "", "output": " ".join(["word"] * 50)},
            {"instruction": "问题", "input": "", "output": "这是一个中文回答"}]
    report = clean([_save(tmp_path / "t.jsonl", rows)], tmp_path / "out", max_tokens=20, near=None)
    assert report.dropped["train"] == {"empty answer after clean-up": 1, "longer than 20 tokens": 1}
    assert report.tidied["train"] == 2
    out = _load(tmp_path / "out/clean_train.jsonl")
    assert out[0]["instruction"] == "Q1" and out[1]["output"] == "这是一个中文回答"
    assert rough_token_count("这是 a test") == 4


def test_length_filter_with_a_real_tokenizer(tmp_path, tiny_tokenizer):
    rows = [{"instruction": "Hello", "input": "", "output": "fine " * n} for n in (1, 5, 40)]
    report = clean([_save(tmp_path / "t.jsonl", rows)], tmp_path / "out", min_tokens=10, max_tokens=100,
                   tokenizer=tiny_tokenizer, near=None)
    assert report.rows_out["train"] == 1
    assert set(report.dropped["train"]) == {"shorter than 10 tokens", "longer than 100 tokens"}


def test_near_index_threshold_is_respected():
    index = NearIndex(threshold=0.9)
    index.add(index.signature("the quick brown fox jumps over the lazy dog near the river bank"))
    assert index.query(index.signature("the quick brown fox jumps over the lazy dog near the river bank!")) is not None
    assert index.query(index.signature("a completely different sentence about medicine and dosage")) is None


def test_bad_inputs(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"oops"\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"bad\.jsonl:2: invalid JSON"):
        clean([tmp_path / "bad.jsonl"], tmp_path / "out")
    (tmp_path / "odd.jsonl").write_text('{"question": "a"}\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"odd\.jsonl:1: cannot tell the format"):
        clean([tmp_path / "odd.jsonl"], tmp_path / "out")
    with pytest.raises(TunelabError, match="leak action"):
        clean([_save(tmp_path / "t.jsonl", _rows(3, 0, "x"))], tmp_path / "out", test=[tmp_path / "t.jsonl"],
              leak_action="delete")
