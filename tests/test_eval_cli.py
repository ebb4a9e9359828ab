"""``tunelab eval score`` and ``tunelab eval run`` end to end (tiny random models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tunelab.cli import main

ROWS = [
    {"prediction": "the cat sat on the mat", "reference": "the cat sat on the mat", "label": "pos"},
    {"prediction": "a dog runs in the park", "reference": "a dog is running in a park", "label": "neg"},
    {"prediction": "two birds", "reference": "two birds fly over the sea", "label": "pos"},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_score_prints_one_json_object(tmp_path, capsys):
    from tunelab.eval.metrics import score

    pred = _write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert main(["eval", "score", "--pred", pred, "--metrics", "em,bleu,rouge,cider"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, one object
    result = json.loads(out)
    expected = score([r["prediction"] for r in ROWS], [r["reference"] for r in ROWS], "em,bleu,rouge,cider")
    assert result == json.loads(json.dumps(expected))
    assert result["em"] == pytest.approx(1 / 3) and 0 < result["bleu"] <= 100 and result["n"] == 3


def test_score_with_separate_reference_file_and_fields(tmp_path, capsys):
    pred = _write_jsonl(tmp_path / "p.jsonl", [{"out": r["label"]} for r in ROWS])
    ref = _write_jsonl(tmp_path / "r.jsonl", [{"gold": g} for g in ("pos", "pos", "pos")])
    assert main(["eval", "score", "--pred", pred, "--ref", ref, "--pred-field", "out", "--ref-field", "gold",
                 "--metrics", "f1,em"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(2 / 3) and result["em"] == pytest.approx(2 / 3)
    assert result["precision"] == 1.0 and result["recall"] == pytest.approx(2 / 3)


def test_score_json_fields_chinese(tmp_path, capsys):
    gold = {"诊断": "支气管炎", "建议": "多喝水"}
    rows = [{"prediction": "```json\n" + json.dumps(gold, ensure_ascii=False) + "\n```", "reference": gold},
            {"prediction": "无法回答", "reference": gold}]
    pred = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert main(["eval", "score", "--pred", pred, "--metrics", "json_field"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["json_field_acc"] == 0.5 and result["json_unparseable"] == 1 and result["json_field.诊断"] == 0.5


@pytest.mark.parametrize("args, message", [
    (["--metrics", "em,blue"], "unknown metric 'blue'"),
    (["--pred-field", "answer"], "p.jsonl:1: answer: field missing"),
    (["--ref", "MISSING"], "nope.jsonl: file not found"),
    (["--ref", "SHORT"], "has 3 rows but"),
    (["--normalize", "strip,shout"], "normalisation 'shout'"),
])
def test_score_bad_input_is_one_line_error(tmp_path, capsys, args, message):
    pred = _write_jsonl(tmp_path / "p.jsonl", ROWS)
    short = _write_jsonl(tmp_path / "short.jsonl", ROWS[:2])
    args = [{"MISSING": str(tmp_path / "nope.jsonl"), "SHORT": short}.get(a, a) for a in args]
    assert main(["eval", "score", "--pred", pred, *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------- eval run: the before/after report

@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """Two tiny model folders: the random one and a copy with different weights."""
    root = tmp_path_factory.mktemp("models")
    other = copy.deepcopy(tiny_llama)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    for name, model in (("base", tiny_llama), ("tuned", other)):
        model.save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    test = [{"instruction": "What is the capital of France?", "output": "Paris."},
            {"instruction": "感冒发烧怎么办?", "output": "多喝水,注意休息。"},
            {"instruction": "Say hello", "output": "Hello!"}]
    data = _write_jsonl(root / "qa.jsonl", test)
    return str(root / "base"), str(root / "tuned"), data


def test_eval_run_writes_predictions_and_reports(two_models, tmp_path, tiny_tokenizer):
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model

    base, tuned, data = two_models
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\neval:\n  models: [{base}, {tuned}]\n"
                      f"  datasets: [{data}]\n  metrics: [em, bleu, rouge, cider, perplexity]\n"
                      f"  max_new_tokens: 6\n  batch_size: 2\n", encoding="utf-8")
    assert main(["eval", str(recipe), "eval.max_samples=2", "--quiet"]) == 0  # `eval RECIPE` = `eval run RECIPE`
    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(report["models"]) == ["base", "tuned"] and report["test_sets"]["qa"]["rows"] == 2
    for name in ("base", "tuned"):
        metrics = report["results"]["qa"][name]
        assert set(metrics) >= {"em", "bleu", "rouge1", "rougeL", "cider", "perplexity"} and metrics["n"] == 2
        assert report["timings"][name]["qa"]["completion_tokens"] > 0
    # predictions are what the shared generation core gives for the prompts (everything before the answer)
    rows = [json.loads(line) for line in (out / "base" / "qa" / "predictions.jsonl").read_text("utf-8").splitlines()]
    assert [r["reference"] for r in rows] == ["Paris.", "多喝水,注意休息。"]
    assert rows[1]["prompt"] == [{"role": "user", "content": "感冒发烧怎么办?"}]
    model, tokenizer = load_model(base)
    direct = generate(model, tokenizer, [r["prompt"] for r in rows], from_preset("greedy", max_new_tokens=6),
                      progress=False)
    assert [r["prediction"] for r in rows] == [d.text for d in direct]
    # perplexities differ between the two models, and both reports show the same numbers as the JSON
    ppl = [report["results"]["qa"][m]["perplexity"] for m in ("base", "tuned")]
    assert ppl[0] != ppl[1]
    md = (out / "report.md").read_text(encoding="utf-8")
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "| metric | base | tuned | Δ (last − first) |" in md
    assert f"| perplexity | {ppl[0]:.4f} | {ppl[1]:.4f} | {ppl[1] - ppl[0]:+.4f} |" in md
    assert f"<td>{ppl[0]:.4f}</td>" in html and "感冒发烧怎么办?" in html and "Example 1" in md
    assert '"max_new_tokens": 6' in md


def test_eval_run_same_model_twice_gives_identical_numbers(two_models, tmp_path):
    from tunelab.config import load_config
    from tunelab.eval.run import evaluate

    base, _, data = two_models
    cfg = load_config(None, [f"eval.models=[{base},{base}]", f"eval.datasets=[{data}]",
                             "eval.metrics=[em,bleu,cider]", "eval.max_new_tokens=4",
                             f"eval.output_dir={tmp_path}"])
    report = evaluate(cfg, progress=False)
    assert list(report["models"]) == ["base", "base-2"]
    assert report["results"]["qa"]["base"] == report["results"]["qa"]["base-2"]


def test_eval_run_errors_are_one_line(two_models, tmp_path, capsys):
    base, _, data = two_models
    assert main(["eval", "run", f"eval.models=[{base}]", f"output_dir={tmp_path}", "--quiet"]) == 1
    assert "eval.datasets: no test set" in capsys.readouterr().err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert main(["eval", "run", "--models", base, "--datasets", bad, "--out", str(tmp_path / "o"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:1" in err and "assistant" in err and err.count("\n") == 1
    assert main(["eval", "run", "--models", str(tmp_path / "nope"), "--datasets", data, "--quiet"]) == 1
    assert "nope" in capsys.readouterr().err


def test_score_perplexity_from_the_cli_uses_the_prompts(two_models, tmp_path, capsys, tiny_llama, tiny_tokenizer):
    from tunelab.eval.metrics_model import perplexity

    base, _, _ = two_models
    rows = [{"prompt": [{"role": "user", "content": "感冒怎么办"}], "reference": "多喝水", "prediction": "x"},
            {"prompt": [{"role": "user", "content": "Say hello"}], "reference": "Hello!", "prediction": "y"}]
    pred = _write_jsonl(tmp_path / "p.jsonl", rows)
    assert main(["eval", "score", "--pred", pred, "--metrics", "perplexity", "--model", base]) == 0
    result = json.loads(capsys.readouterr().out)
    direct = perplexity(tiny_llama, tiny_tokenizer, ["多喝水", "Hello!"], [r["prompt"] for r in rows])
    assert result["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert main(["eval", "score", "--pred", pred, "--metrics", "perplexity"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == "unavailable: needs a model (--model)"
