"""``tunelab data check|stats|preview`` through ``tunelab.cli.main``: exit codes and messages."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.data.commands import _percentile, check, stats

GOOD = [{"instruction": "孕妇感冒发烧怎么办", "output": "多喝水。"},
        {"instruction": "hi", "input": "there", "output": "hello"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]


def save_model_folder(folder, tokenizer) -> str:
    """A model folder as load_tokenizer expects one: config.json + tokenizer files."""
    from transformers import LlamaConfig

    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=128).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tiny_tokenizer):
    return save_model_folder(tmp_path_factory.mktemp("tiny-model"), make_tiny_tokenizer())


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, make_tiny_tokenizer):
    """Like a base model: no chat template."""
    return save_model_folder(tmp_path_factory.mktemp("base-model"), make_tiny_tokenizer(chat_template=None))


def write_jsonl(path, rows, broken_at: int | None = None):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if broken_at is not None:
        lines.insert(broken_at - 1, '{"instruction": "oops", "output": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_stats_on_a_broken_line_exits_1_naming_the_line(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD[0], GOOD[1], GOOD[0]], broken_at=3)
    assert main(["data", "stats", data, "--model", model_dir]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:3: invalid JSON") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_stats_counts_formats_and_lengths(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["data", "stats", data, "--model", model_dir, "--cutoff-len", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["conversations"] == 3
    assert result["formats"] == {"alpaca": 2, "sharegpt": 1}
    tokens = result["tokens"]
    assert tokens["min"] <= tokens["p50"] <= tokens["p95"] <= tokens["max"]
    assert result["cutoff_len"] == 16
    assert main(["data", "stats", data, "--model", model_dir]) == 0
    assert "conversations  3 (0 multi-turn)" in capsys.readouterr().out


def test_stats_lengths_match_the_chat_template(tmp_path, make_tiny_tokenizer):
    tokenizer = make_tiny_tokenizer()
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    result = stats([data], tokenizer, cutoff_len=20)
    msgs = [[{"role": "user", "content": "孕妇感冒发烧怎么办"}, {"role": "assistant", "content": "多喝水。"}],
            [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "hello"}],
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]]
    lengths = sorted(len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=False)) for m in msgs)
    assert (result["tokens"]["min"], result["tokens"]["max"]) == (lengths[0], lengths[-1])
    assert result["tokens"]["total"] == sum(lengths)
    assert result["over_cutoff"] == sum(n > 20 for n in lengths)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert (_percentile(values, 50), _percentile(values, 95), _percentile([7], 95)) == (50, 95, 7)


def test_check_lists_every_problem_and_exits_1(tmp_path, capsys):
    rows = [GOOD[0], {"instruction": "q"}, GOOD[1], {"instruction": "q", "output": "a", "history": [["x", "y", "z"]]}]
    data = write_jsonl(tmp_path / "d.jsonl", rows, broken_at=3)
    assert main(["data", "check", data, str(tmp_path / "missing.json")]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{data}:2: output: missing",
        out.splitlines()[1],
        f"{data}:5: history[0]: expected a [user, assistant] pair, got 3 items",
        f"{tmp_path / 'missing.json'}: no such file",
    ]
    assert out.splitlines()[1].startswith(f"{data}:3: invalid JSON")
    assert err.startswith("error: 4 problems; 2 conversations in 1 dataset")


def test_check_ok_summary(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["data", "check", data]) == 0
    assert capsys.readouterr().out.strip() == "OK: 3 conversations in 1 dataset (2 alpaca, 1 sharegpt)"
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    assert check([str(tmp_path / "empty.jsonl")]).problems == [f"{tmp_path / 'empty.jsonl'}: no records"]


def test_preview_marks_supervised_spans(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["data", "preview", data, "--model", model_dir, "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert f"# {data}:1 (" in out and f"# {data}:2 (" in out and f"{data}:3" not in out
    assert "<|im_start|>user\n孕妇感冒发烧怎么办<|im_end|>\n<|im_start|>assistant\n[[多喝水。<|im_end|>]]" in out


def test_preview_with_a_hand_written_template(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[1:2])
    assert main(["data", "preview", data, "--model", model_dir, "--template", "human-assistant"]) == 0
    assert "Human: hi\nthere \nAssistant:[[ hello<|im_end|>]]" in capsys.readouterr().out


def test_a_model_without_chat_template_asks_for_one(tmp_path, base_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["data", "stats", data, "--model", base_model_dir]) == 1
    assert "no chat template: pick a hand-written one with --template" in capsys.readouterr().err
    assert main(["data", "stats", data, "--model", base_model_dir, "--template", "vicuna"]) == 1
    assert "unknown template 'vicuna' (known: human-assistant" in capsys.readouterr().err
    assert main(["data", "stats", data, "--model", base_model_dir, "--template", "human-assistant"]) == 0
