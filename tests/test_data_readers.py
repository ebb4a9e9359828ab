"""Readers: every file type yields (number the user sees, row); problems name file and line."""

from __future__ import annotations

import json

import pytest

from tunelab.data.readers import iter_rows, read_rows
from tunelab.errors import TunelabError

ROWS = [{"instruction": "孕妇感冒发烧怎么办", "output": "多喝水"}, {"instruction": "hi", "output": "hello"}]


def test_jsonl_numbers_are_file_lines_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0], ensure_ascii=False) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert list(iter_rows(path)) == [(1, ROWS[0]), (3, ROWS[1])]


def test_broken_jsonl_line_raises_with_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x",\n', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"d\.jsonl:2: invalid JSON"):
        read_rows(path)


def test_broken_lines_are_collected_when_asked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\nnot json\n[1, 2]\n{"a": 2}\n', encoding="utf-8")
    errors: list[str] = []
    rows = list(iter_rows(path, on_error=errors.append))
    assert rows == [(1, {"a": 1}), (4, {"a": 2})]
    assert errors[0].startswith(f"{path}:2: invalid JSON")
    assert errors[1] == f"{path}:3: expected a JSON object, got list"


@pytest.mark.parametrize("payload", [ROWS, {"data": ROWS}])
def test_json_array_or_object_with_one_list(tmp_path, payload):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    assert list(iter_rows(path)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]', encoding="utf-8")
    with pytest.raises(TunelabError, match=r"d\.json:3: invalid JSON"):
        read_rows(path)


def test_csv_row_numbers_count_the_header_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"line one\nline two",答案\nhi,hello\n', encoding="utf-8-sig")
    assert list(iter_rows(path)) == [
        (2, {"instruction": "line one\nline two", "output": "答案"}),
        (4, {"instruction": "hi", "output": "hello"}),
    ]


def test_tsv_and_extra_values(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("instruction\toutput\na\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"d\.tsv:3: 1 more values than header columns"):
        read_rows(path)


def test_xlsx_sheet_by_name_and_bad_sheet_lists_sheets(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    book.active.title = "notes"
    sheet = book.create_sheet("train")
    sheet.append(["instruction", "output"])
    sheet.append(["你好", 42.0])
    sheet.append([None, None])
    sheet.append(["hi", "hello"])
    path = tmp_path / "d.xlsx"
    book.save(path)
    assert list(iter_rows(path, sheet="train")) == [(2, {"instruction": "你好", "output": 42}),
                                                     (4, {"instruction": "hi", "output": "hello"})]
    with pytest.raises(TunelabError, match=r"no sheet 'test' \(sheets: notes, train\)"):
        read_rows(path, sheet="test")


def test_parquet_drops_missing_values(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"instruction": ["你好", "hi"], "input": ["x", None], "output": ["a", "b"]}).to_parquet(path)
    assert read_rows(path) == [{"instruction": "你好", "input": "x", "output": "a"},
                               {"instruction": "hi", "output": "b"}]


def test_unknown_suffix_missing_file_and_non_utf8(tmp_path):
    with pytest.raises(TunelabError, match="no such file"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(TunelabError, match="unsupported file type '.txt'"):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "gbk.jsonl").write_bytes('{"a": "中文"}'.encode("gbk"))
    with pytest.raises(TunelabError, match="not UTF-8"):
        read_rows(tmp_path / "gbk.jsonl")


def test_json_holding_jsonl_is_read_line_by_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS[0], ensure_ascii=False) + "\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert list(iter_rows(path)) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_with_several_lists_or_a_scalar_is_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}), encoding="utf-8")
    with pytest.raises(TunelabError, match="several lists \\(train, test\\)"):
        read_rows(path)
    path.write_text("42", encoding="utf-8")
    with pytest.raises(TunelabError, match="expected a list of records, got int"):
        read_rows(path)


@pytest.mark.parametrize("name, message", [("d.xlsx", "cannot open as Excel"), ("d.parquet", "cannot read as Parquet")])
def test_corrupt_binary_files_are_one_line_errors(tmp_path, name, message):
    (tmp_path / name).write_bytes(b"not really " + name.encode())
    with pytest.raises(TunelabError, match=message):
        read_rows(tmp_path / name)


def test_sheet_only_for_excel(tmp_path):
    (tmp_path / "d.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(TunelabError, match="only applies to .xlsx"):
        read_rows(tmp_path / "d.jsonl", sheet="train")
