"""Mixing datasets by ratio and by count gives the requested proportions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import TunelabError
from tunelab.workshop.mix import allocate, mix, parse_source


def _write(path: Path, tag: str, n: int) -> Path:
    rows = [{"instruction": f"{tag} question {i}", "input": "", "output": f"{tag} answer {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _tags(path: Path) -> list[str]:
    return [json.loads(line)["instruction"].split()[0] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def sources(tmp_path):
    return _write(tmp_path / "general.jsonl", "general", 300), _write(tmp_path / "domain.jsonl", "domain", 120)


@pytest.mark.parametrize("ratio, expected", [((1, 0), (300, 0)), ((1, 1), (120, 120)), ((0, 1), (0, 120)),
                                             ((3, 1), (300, 100))])
def test_ratio_takes_as_much_as_the_scarcest_source_allows(tmp_path, sources, ratio, expected):
    general, domain = sources
    report = mix([(general, ratio[0]), (domain, ratio[1])], tmp_path / "out")
    tags = _tags(tmp_path / "out/mix_train.jsonl")
    assert (tags.count("general"), tags.count("domain")) == expected
    assert report.taken == {str(general): expected[0], str(domain): expected[1]}
    assert len(set(tags[:50])) == (2 if all(expected) else 1)  # shuffled, not concatenated


def test_ratio_with_total_and_held_out_test(tmp_path, sources):
    general, domain = sources
    report = mix([(general, 2), (domain, 1)], tmp_path / "out", total=100, test=0.1, seed=7)
    train, test = _tags(tmp_path / "out/mix_train.jsonl"), _tags(tmp_path / "out/mix_test.jsonl")
    assert (train + test).count("general") == 67 and (train + test).count("domain") == 33
    assert report.sizes == {"train": 90, "test": 10}
    questions = lambda p: {json.loads(l)["instruction"] for l in p.read_text().splitlines()}
    assert not questions(tmp_path / "out/mix_train.jsonl") & questions(tmp_path / "out/mix_test.jsonl")
    again = mix([(general, 2), (domain, 1)], tmp_path / "again", total=100, test=0.1, seed=7)
    assert (tmp_path / "again/mix_train.jsonl").read_text() == (tmp_path / "out/mix_train.jsonl").read_text()
    assert again.sizes == report.sizes


def test_by_count_and_repeat(tmp_path, sources):
    general, domain = sources
    mix([(general, 50), (domain, 200)], tmp_path / "out", by="count", repeat=True)
    tags = _tags(tmp_path / "out/mix_train.jsonl")
    assert (tags.count("general"), tags.count("domain")) == (50, 200)
    with pytest.raises(TunelabError, match="source 2 has 120 rows but 200 are needed"):
        mix([(general, 50), (domain, 200)], tmp_path / "bad", by="count")


def test_mixed_formats_become_messages(tmp_path, sources):
    general, _ = sources
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好!"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    mix([(general, 10), (chat, 1)], tmp_path / "out", by="count")
    rows = [json.loads(l) for l in (tmp_path / "out/mix_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"messages"} for r in rows)
    assert {"role": "assistant", "content": "你好!"} in [m for r in rows for m in r["messages"]]
    info = json.loads((tmp_path / "out/dataset_info.json").read_text())
    assert info["mix_train"]["formatting"] == "openai"


def test_allocation_rounds_to_the_total():
    assert allocate([1, 1, 1], [100, 100, 100], 10, "ratio", False) == [4, 3, 3]
    assert parse_source("data/a.jsonl:0.5") == ("data/a.jsonl", 0.5)
    assert parse_source("data/a.jsonl") == ("data/a.jsonl", 1.0)
    with pytest.raises(TunelabError, match="weights"):
        allocate([0, 0], [1, 1], None, "ratio", False)


def test_named_datasets_with_remapped_columns(tmp_path, sources):
    general, _ = sources
    (tmp_path / "qa.csv").write_text("q,a\n你好吗,很好\n几点了,三点\n", encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"qa": {"file_name": "qa.csv", "formatting": "alpaca", "columns": {"prompt": "q", "response": "a"}}}),
        encoding="utf-8")
    report = mix([("qa", 1), (str(general), 1)], tmp_path / "out", dataset_dir=tmp_path)
    assert report.taken == {"qa": 2, str(general): 2}
    rows = [json.loads(l) for l in (tmp_path / "out/mix_train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"role": "user", "content": "几点了"} in [m for r in rows for m in r["messages"]]
    with pytest.raises(TunelabError, match="nope: no such file or dataset"):
        mix([("nope", 1)], tmp_path / "bad", dataset_dir=tmp_path)
