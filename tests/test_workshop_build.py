"""Declarative builds: the seed's three medical conversions on files in the seed's raw shapes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tunelab.errors import TunelabError
from tunelab.workshop.build import build_recipe
from tunelab.workshop.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "data"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _project(tmp_path: Path, recipe: str) -> Path:
    """Copy a shipped recipe into tmp so its ../../dataset paths land in tmp."""
    target = tmp_path / "recipes" / "data" / recipe
    target.parent.mkdir(parents=True)
    shutil.copy(RECIPES / recipe, target)
    return target


def _dialogue_rows(n: int) -> list[dict]:
    return [{"instruction": f"孕妇感冒发烧{i}度应该怎么办呢", "input": f"我怀孕了,最近发烧{i}度,头很疼。",
             "output": f"建议物理降温,多喝水{i}。", "history": None} for i in range(n)]


def test_every_shipped_recipe_parses():
    from tunelab.workshop.distill import load_distill_config, load_questions

    paths = sorted(RECIPES.glob("*.yaml"))
    assert {p.name for p in paths} >= {"med-dialog.yaml", "med-norm.yaml", "med-report.yaml"}
    for path in paths:
        if path.name.startswith("distill-"):
            config = load_distill_config(path)
            assert config.instruction and load_questions(config)
            continue
        recipe = load_recipe(path)
        assert recipe.sources and (recipe.template or recipe.hook)


def test_dialogue_recipe_joins_topic_and_content(tmp_path):
    recipe = _project(tmp_path, "med-dialog.yaml")
    raw = tmp_path / "dataset/Chinese-medical-dialogue/data/train_0001_of_0001.json"
    raw.parent.mkdir(parents=True)
    rows = _dialogue_rows(300) + [{"instruction": "空回复", "input": "内容", "output": "", "history": None}]
    raw.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    report = build_recipe(recipe)
    out = tmp_path / "dataset/sft_dataset"
    train, test = _jsonl(out / "dialog_train.jsonl"), _jsonl(out / "dialog_test.jsonl")
    assert (len(train), len(test)) == (200, 100)  # 300 usable < sample 5100; test 100
    assert report.dropped == {"empty output": 1}
    first = next(r for r in train if r["instruction"].startswith("主题:孕妇感冒发烧7度"))
    assert first == {"instruction": "主题:孕妇感冒发烧7度应该怎么办呢\n内容:我怀孕了,最近发烧7度,头很疼。",
                     "input": "", "output": "建议物理降温,多喝水7。"}
    assert "\\u" not in (out / "dialog_train.jsonl").read_text(encoding="utf-8")
    registry = json.loads((out / "dataset_info.json").read_text(encoding="utf-8"))
    assert registry["dialog_train"]["file_name"] == "dialog_train.jsonl"


def test_norm_recipe_reads_excel_with_fixed_splits(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    recipe = _project(tmp_path, "med-norm.yaml")
    folder = tmp_path / "dataset/yidu-n7k"
    folder.mkdir(parents=True)
    for name, n in (("train.xlsx", 30), ("val.xlsx", 8)):
        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(["原始词", "标准词"])
        for i in range(n):
            sheet.append([f"右侧甲状腺叶切除术{name[0]}{i}", f"单侧甲状腺叶切除术{i}"])
        book.save(folder / name)
    build_recipe(recipe)
    out = tmp_path / "dataset/sft_dataset"
    train, test = _jsonl(out / "norm_train.jsonl"), _jsonl(out / "norm_test.jsonl")
    assert (len(train), len(test)) == (30, 8)
    assert all("原始词:右侧甲状腺叶切除术v" in r["instruction"] for r in test)
    row = next(r for r in train if "切除术t3\n" in r["instruction"])
    assert row["output"] == "单侧甲状腺叶切除术3"
    assert row["instruction"].endswith("原始词:右侧甲状腺叶切除术t3\n该词的标准术语为:")


def _imcs(n: int, start: int = 0) -> dict:
    report = {"主诉": "咳嗽两天。", "现病史": "患儿咳嗽两天。", "辅助检查": "暂缺。", "既往史": "不详。",
              "诊断": "小儿支气管炎。", "建议": "多喝水。"}
    return {str(10000 + i): {"dialogue": [{"sentence_id": "1", "speaker": "医生", "sentence": f"你好,咳嗽几天了?{i}"},
                                          {"sentence_id": "2", "speaker": "患者", "sentence": "两天了"}],
                             "report": [dict(report, 主诉=f"咳嗽{i}天。"), report]}
            for i in range(start, start + n)}


def test_report_recipe_turns_dialogue_into_six_field_json(tmp_path):
    recipe = _project(tmp_path, "med-report.yaml")
    folder = tmp_path / "dataset/IMCS-V2-MRG/IMCS-V2-MRG"
    folder.mkdir(parents=True)
    (folder / "IMCS-V2_train.json").write_text(json.dumps(_imcs(12), ensure_ascii=False), encoding="utf-8")
    (folder / "IMCS-V2_dev.json").write_text(json.dumps(_imcs(3, 50), ensure_ascii=False), encoding="utf-8")
    build_recipe(recipe)
    out = tmp_path / "dataset/sft_dataset"
    train, test = _jsonl(out / "mrg_train.jsonl"), _jsonl(out / "mrg_test.jsonl")
    assert (len(train), len(test)) == (12, 3)
    row = next(r for r in test if "?50\n" in r["instruction"])
    assert row["instruction"].startswith("问诊对话历史:\n医生:你好,咳嗽几天了?50\n患者:两天了\n根据上述对话")
    report = json.loads(row["output"])
    assert list(report) == ["主诉", "现病史", "辅助检查", "既往史", "诊断", "建议"]
    assert report["主诉"] == "咳嗽50天。"  # the first report is the target


def test_sampling_split_and_grouping(tmp_path):
    rows = [{"patient": f"p{i // 4}", "q": f"question {i}", "a": f"answer {i}"} for i in range(80)]
    src = tmp_path / "raw.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    spec = {"name": "qa", "source": str(src), "template": {"instruction": "{q}", "output": "{a}", "system": "Be brief."},
            "sample": 60, "split": {"test": 0.2, "validation": 8}, "group_by": "patient", "keep_columns": ["patient"]}
    report = build_recipe(parse_recipe(spec), tmp_path / "out")
    splits = {s: _jsonl(tmp_path / "out" / f"qa_{s}.jsonl") for s in ("train", "test", "validation")}
    assert sum(map(len, splits.values())) == 60 and report.dropped == {"beyond sample of 60": 20}
    assert len(splits["test"]) in (12, 13, 14, 15) and len(splits["validation"]) in (8, 9, 10, 11)
    patients = [{r["patient"] for r in rows} for rows in splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert splits["train"][0]["system"] == "Be brief."
    again = build_recipe(parse_recipe(spec), tmp_path / "again")
    assert again.sizes == report.sizes
    assert (tmp_path / "again/qa_test.jsonl").read_text() == (tmp_path / "out/qa_test.jsonl").read_text()


def test_filters_count_each_reason(tmp_path):
    src = tmp_path / "raw.csv"
    src.write_text("q,a\nhello,world\nhi,x\nspam http://x,ok\nfine,good answer\n,empty q\n", encoding="utf-8")
    spec = {"name": "f", "source": str(src), "template": {"instruction": "{q}", "output": "{a}"},
            "filters": {"drop_empty": ["q"], "min_length": {"output": 2}, "exclude_regex": {"instruction": "http"}}}
    report = build_recipe(parse_recipe(spec), tmp_path / "out")
    assert report.sizes == {"train": 2}
    assert report.dropped == {"empty q": 1, "output shorter than 2": 1, "instruction matches /http/": 1}


@pytest.mark.parametrize("case, expected", [
    ("missing_column", r"raw\.jsonl:3: column 'a': missing \(columns: q\)"),
    ("bad_sheet", r"book\.xlsx: no sheet 'Nope' \(sheets: Sheet\)"),
    ("bad_json_row", r"raw\.jsonl:2: invalid JSON"),
    ("hook_missing_column", r"imcs\.json\[7\]: column 'report': missing"),
    ("unknown_key", r"unknown key 'templat' \(did you mean 'template'\?\)"),
    ("bad_json_path", r"imcs\.json: json_path: no key 'data' under '\$'"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, case, expected):
    csv = tmp_path / "raw.csv"
    csv.write_text("q,a\nfine,ok\nbad,\n", encoding="utf-8")
    spec: dict = {"name": "x", "source": str(csv), "template": {"instruction": "{q}", "output": "{a}"}}
    if case == "missing_column":
        (tmp_path / "raw.jsonl").write_text('{"q": "1", "a": "2"}\n{"q": "3", "a": "4"}\n{"q": "5"}\n')
        spec["source"] = str(tmp_path / "raw.jsonl")
    elif case == "bad_sheet":
        openpyxl = pytest.importorskip("openpyxl")
        book = openpyxl.Workbook()
        book.active.title = "Sheet"
        book.active.append(["q", "a"])
        book.save(tmp_path / "book.xlsx")
        spec["source"] = {"path": str(tmp_path / "book.xlsx"), "sheet": "Nope"}
    elif case == "bad_json_row":
        (tmp_path / "raw.jsonl").write_text('{"q": "a", "a": "b"}\n{"q": oops}\n', encoding="utf-8")
        spec["source"] = str(tmp_path / "raw.jsonl")
    elif case in ("hook_missing_column", "bad_json_path"):
        data = {"7": {"dialogue": [{"speaker": "医生", "sentence": "你好"}]}}
        (tmp_path / "imcs.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        path = "data.*" if case == "bad_json_path" else "*"
        spec = {"name": "x", "source": {"path": str(tmp_path / "imcs.json"), "json_path": path},
                "hook": "tunelab.workshop.hooks:imcs_report"}
    elif case == "unknown_key":
        spec["templat"] = spec.pop("template")
    with pytest.raises(TunelabError, match=expected) as info:
        build_recipe(parse_recipe(spec), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_recipe_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsource: [unclosed\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_recipe(bad)
    hookless = tmp_path / "h.yaml"
    hookless.write_text(yaml.safe_dump({"source": "x.csv", "hook": "tunelab.workshop.hooks:nope"}), encoding="utf-8")
    with pytest.raises(TunelabError, match=r"h\.yaml: hook: 'tunelab.workshop.hooks' has no function 'nope'"):
        build_recipe(hookless, tmp_path / "out")


def test_cli_builds_a_recipe_and_reports_bad_input(tmp_path, capsys):
    from tunelab.cli import main

    (tmp_path / "raw.csv").write_text("q,a\n你好,您好\nhi,\n", encoding="utf-8")
    recipe = tmp_path / "greet.yaml"
    recipe.write_text("source: raw.csv\ntemplate:\n  instruction: '{q}'\n  output: '{a}'\n", encoding="utf-8")
    assert main(["data", "build", str(recipe), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "dropped: empty output" in out and "greet" in out
    assert _jsonl(tmp_path / "out/greet_train.jsonl") == [{"instruction": "你好", "output": "您好", "input": ""}]
    recipe.write_text("source: raw.csv\ntemplate:\n  instruction: '{question}'\n  output: '{a}'\n", encoding="utf-8")
    assert main(["data", "build", str(recipe), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: \S*raw\.csv:2: column 'question': missing \(columns: q, a\)", err)


@pytest.mark.parametrize("change, message", [
    ({"sample": "ten"}, r"recipe: sample: expected int, got 'ten'"),
    ({"split": {"train": 0.8, "test": 0.2}}, r"split: list only held-out splits"),
    ({"template": {"instruction": "{}", "output": "{a}"}}, r"template.instruction: '\{\}' names no column"),
    ({"template": {"instruction": "{q", "output": "{a}"}}, r"template.instruction: bad template"),
    ({"template": {"instruction": "{q}"}}, r"template: needs both 'instruction' and 'output'"),
    ({"hook": "x:y"}, r"give exactly one of `template`"),
    ({"filters": {"regex": {"output": "("}}}, r"filters.regex.output: bad regular expression"),
    ({"split": {"test": 5}}, r"split: held-out splits want 5 rows but there are only 2"),
])
def test_recipe_validation_errors(tmp_path, change, message):
    (tmp_path / "raw.csv").write_text("q,a\nx,y\nz,w\n", encoding="utf-8")
    spec = {"name": "v", "source": str(tmp_path / "raw.csv"), "template": {"instruction": "{q}", "output": "{a}"},
            **change}
    with pytest.raises(TunelabError, match=message):
        build_recipe(parse_recipe(spec), tmp_path / "out")


def test_hook_from_a_file_next_to_the_recipe(tmp_path):
    (tmp_path / "convert.py").write_text(
        "def qa(row):\n"
        "    if row['kind'] == 'skip':\n"
        "        return None\n"
        "    n = 1 / int(row['n'])\n"
        "    return [{'instruction': row['q'], 'output': row['a']}, {'instruction': row['a'], 'output': row['q']}]\n",
        encoding="utf-8")
    (tmp_path / "raw.csv").write_text("q,a,kind,n\n问,答,keep,1\nx,y,skip,1\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: both\nsource: raw.csv\nhook: convert.py:qa\nshuffle: false\n", encoding="utf-8")
    report = build_recipe(recipe, tmp_path / "out")
    assert report.sizes == {"train": 2} and report.read == 2
    assert [r["instruction"] for r in _jsonl(tmp_path / "out/both_train.jsonl")] == ["问", "答"]
    (tmp_path / "raw.csv").write_text("q,a,kind,n\n问,答,keep,1\nx,y,keep,0\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"raw\.csv:3: cannot convert row: ZeroDivisionError"):
        build_recipe(recipe, tmp_path / "out")


def test_unshuffled_split_keeps_file_order_and_holds_out_the_end():
    from tunelab.workshop.split import split_rows

    rows = [{"i": i, "g": i // 2} for i in range(10)]
    out = split_rows(rows, {"test": 3}, shuffle=False, group_key="g")
    assert [r["i"] for r in out["train"]] == [0, 1, 2, 3, 4, 5] and [r["i"] for r in out["test"]] == [6, 7, 8, 9]
    shuffled = split_rows(rows, {"test": 0.3}, seed=3)
    assert sorted(r["i"] for s in shuffled.values() for r in s) == list(range(10)) and len(shuffled["test"]) == 3
