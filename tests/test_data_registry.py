"""A LLaMA-Factory data folder (dataset_info.json as it writes it) loads unchanged."""

from __future__ import annotations

import json

import pytest

from tunelab.data.registry import load_dataset, load_datasets
from tunelab.errors import TunelabError

# The shape LLaMA-Factory documents for dataset_info.json, with remapped columns and tags.
INFO = {
    "med_dialog": {
        "file_name": "dialog.json",
        "formatting": "alpaca",
        "columns": {"prompt": "question", "query": "detail", "response": "answer", "system": "sys",
                    "history": "past"},
    },
    "doctor_chat": {
        "file_name": "chat.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "turns", "system": "persona"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "patient",
                 "assistant_tag": "doctor", "system_tag": "narrator"},
    },
    "folder_set": {"file_name": "parts"},
    "remote": {"hf_hub_url": "someone/some-data"},
}


@pytest.fixture()
def data_dir(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps(INFO), encoding="utf-8")
    dialog = [{"question": "孕妇感冒发烧38度应该怎么办呢", "detail": "我怀孕了", "answer": "多喝温水。", "sys": "你是医生",
               "past": [["你好", "你好!"]]},
              {"question": "头疼", "answer": "休息。"}]
    (tmp_path / "dialog.json").write_text(json.dumps(dialog, ensure_ascii=False), encoding="utf-8")
    chat = {"persona": "You are a doctor.", "turns": [{"speaker": "patient", "text": "I cough."},
                                                       {"speaker": "doctor", "text": "Drink water."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n", encoding="utf-8")
    (tmp_path / "parts").mkdir()
    for i in range(3):
        (tmp_path / "parts" / f"{i}.jsonl").write_text(
            json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n", encoding="utf-8")
    return tmp_path


def test_alpaca_entry_with_remapped_columns(data_dir):
    convs = load_dataset("med_dialog", str(data_dir))
    assert [(m.role, m.text) for m in convs[0].messages] == [
        ("system", "你是医生"), ("user", "你好"), ("assistant", "你好!"),
        ("user", "孕妇感冒发烧38度应该怎么办呢\n我怀孕了"), ("assistant", "多喝温水。")]
    assert convs[0].source == f"{data_dir / 'dialog.json'}:1"
    assert convs[1].meta == {"format": "alpaca", "dataset": "med_dialog"}


def test_sharegpt_entry_with_tags(data_dir):
    (conv,) = load_dataset("doctor_chat", data_dir)
    assert [(m.role, m.text) for m in conv.messages] == [
        ("system", "You are a doctor."), ("user", "I cough."), ("assistant", "Drink water.")]


def test_folder_entry_reads_every_file_in_order_and_paths_work_too(data_dir):
    assert [c.messages[-1].text for c in load_dataset("folder_set", data_dir)] == ["a0", "a1", "a2"]
    assert len(load_dataset(str(data_dir / "parts" / "1.jsonl"))) == 1  # a path needs no registry
    assert len(load_dataset("parts/2.jsonl", data_dir)) == 1  # a path relative to dataset_dir


def test_max_samples_is_a_seeded_shuffle(data_dir):
    first = [c.source for c in load_dataset("folder_set", data_dir, max_samples=2, seed=1)]
    again = [c.source for c in load_dataset("folder_set", data_dir, max_samples=2, seed=1)]
    assert first == again and len(first) == 2
    seeds = {tuple(c.source for c in load_dataset("folder_set", data_dir, max_samples=3, seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed changes the order


def test_load_datasets_concatenates(data_dir):
    convs = load_datasets(["med_dialog", "doctor_chat"], data_dir)
    assert [c.meta["dataset"] for c in convs] == ["med_dialog", "med_dialog", "doctor_chat"]


def test_unknown_name_lists_the_registered_names(data_dir):
    with pytest.raises(TunelabError, match="nope: no such file or dataset in .*names: doctor_chat, folder_set, "
                                           "med_dialog, remote"):
        load_dataset("nope", data_dir)
    with pytest.raises(TunelabError, match="pass --dataset-dir"):
        load_dataset("med_dialog")


def test_hub_entry_and_bad_entries_are_refused(data_dir):
    with pytest.raises(TunelabError, match=r"remote\.hf_hub_url: hub datasets cannot be downloaded offline"):
        load_dataset("remote", data_dir)
    info = {"x": {"file_name": "missing.json"}, "y": {"file_name": "dialog.json", "formatting": "pairs"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(TunelabError, match=r"x\.file_name: .*missing\.json does not exist"):
        load_dataset("x", data_dir)
    with pytest.raises(TunelabError, match=r"y\.formatting: unknown format 'pairs'"):
        load_dataset("y", data_dir)
    (data_dir / "dataset_info.json").write_text("{\n  \"x\": \n}", encoding="utf-8")
    with pytest.raises(TunelabError, match=r"dataset_info\.json:3: invalid JSON"):
        load_dataset("x", data_dir)


def test_csv_entry_without_formatting_uses_columns_and_json_history(tmp_path):
    info = {"terms": {"file_name": "terms.csv", "columns": {"prompt": "term", "response": "standard",
                                                             "history": "past"}}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    (tmp_path / "terms.csv").write_text(
        'term,standard,past\n'
        '急性阑尾炎,Unspecified acute appendicitis,\n'
        'Acute appendicitis NOS,K35.80,"[[""hi"", ""hello""]]"\n'
        'bad,row,"[[""x""]"\n', encoding="utf-8")
    problems: list[str] = []
    convs = load_dataset("terms", tmp_path, on_error=problems.append)
    assert [(m.role, m.text) for m in convs[0].messages] == [("user", "急性阑尾炎"),
                                                               ("assistant", "Unspecified acute appendicitis")]
    assert [m.text for m in convs[1].messages] == ["hi", "hello", "Acute appendicitis NOS", "K35.80"]
    assert convs[1].source.endswith("terms.csv:3")
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'terms.csv'}:4: past: invalid JSON")
