"""Vision-language data on tiny random towers and the tiny Llama (tests/conftest.py): image
datasets (LLaMA-Factory's mllm format, bad images as one-line errors naming file, record and
path), labels -100 on image and prompt tokens, truncation that never splits an image span, and
the self-drawn shapes dataset.
"""

from __future__ import annotations

import json

import pytest
from vision_helpers import conv as _conv
from vision_helpers import layout as _layout
from vision_helpers import png as _png
from vision_helpers import tower_dirs  # noqa: F401  (fixture)
from vision_helpers import vlm as _vlm

pytestmark = pytest.mark.usefixtures("one_thread")

# --- data ----------------------------------------------------------------------------------

def test_llama_factory_mllm_dataset_with_images_loads(tmp_path):
    """LLaMA-Factory's mllm_demo layout: images relative to the dataset_dir, data file elsewhere."""
    from tunelab.data import ImagePart, load_dataset
    from tunelab.data.commands import check
    from tunelab.data.images import resolve_image

    _png(tmp_path / "mllm_demo_data" / "1.png", "red")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "mllm_demo.json").write_text(json.dumps([{
        "messages": [{"content": "<image>他们是谁?", "role": "user"},
                     {"content": "他们是拜仁慕尼黑的球员。", "role": "assistant"}],
        "images": ["mllm_demo_data/1.png"]}], ensure_ascii=False), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mllm_demo": {
        "file_name": "files/mllm_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    [conv] = load_dataset("mllm_demo", tmp_path)
    part = conv.messages[0].content[0]
    assert isinstance(part, ImagePart) and conv.messages[0].text == "他们是谁?"
    assert resolve_image(part.ref, conv, tmp_path) == str(tmp_path / "mllm_demo_data" / "1.png")
    assert check(["mllm_demo"], str(tmp_path)).ok


def test_data_check_lists_every_bad_image(tmp_path):
    from tunelab.data.commands import check

    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"instruction": "<image>colour?", "output": "red", "images": ["missing.png"]},
            {"instruction": "<image>colour?", "output": "red", "images": ["broken.png"]},
            {"instruction": "<image><image>colour?", "output": "red", "images": ["broken.png"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    problems = check([str(tmp_path / "d.jsonl")]).problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{tmp_path / 'd.jsonl'}:3: images: 1 image(s) but 2 <image> placeholder(s)")
    assert any(p.startswith(f"{tmp_path / 'd.jsonl'}:1: images: missing.png: not found") for p in problems)
    assert any(f"{tmp_path / 'd.jsonl'}:2: images: {tmp_path / 'broken.png'}: cannot be read" in p for p in problems)


def test_remote_image_urls_are_refused(tmp_path):
    from tunelab.data.images import resolve_image
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="remote images are not fetched"):
        resolve_image("https://example.com/a.png", _conv("x"), None)


def test_labels_are_ignored_on_image_and_prompt_tokens(tiny_dir, tower_dirs, tmp_path):
    from tunelab.data.render import IGNORE_INDEX
    from tunelab.vision.data import encode_vision

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    image = _png(tmp_path / "red.png", "red")
    for train_on_prompt in (False, True):
        example, outcome = encode_vision(tokenizer, _conv(image), _layout(model), train_on_prompt=train_on_prompt)
        ids, labels = example["input_ids"], example["labels"]
        slots = [i for i, t in enumerate(ids) if t == model.image_token_id]
        assert outcome == "kept" and len(slots) == 16 and slots == list(range(slots[0], slots[0] + 16))
        assert all(labels[i] == IGNORE_INDEX for i in slots)
        supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
        if not train_on_prompt:
            assert tokenizer.decode(supervised) == "red<|im_end|>"
    assert example["images"] == [[str(image)]]


def test_truncation_never_splits_an_image_span(tiny_dir, tower_dirs, tmp_path):
    from tunelab.data import TextPart
    from tunelab.vision.data import encode_all_vision, encode_vision

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    image = _png(tmp_path / "red.png", "red")
    full, _ = encode_vision(tokenizer, _conv(image, answer="red " * 30), _layout(model))
    last_slot = max(i for i, t in enumerate(full["input_ids"]) if t == model.image_token_id)
    inside, outcome = encode_vision(tokenizer, _conv(image, answer="red " * 30), _layout(model), cutoff_len=last_slot)
    assert inside is None and outcome == "image_span"
    first_label = next(i for i, label in enumerate(full["labels"]) if label != -100)
    after, outcome = encode_vision(tokenizer, _conv(image, answer="red " * 30), _layout(model),
                                   cutoff_len=first_label + 2)
    assert outcome == "truncated" and len(after["input_ids"]) == first_label + 2
    assert after["input_ids"].count(model.image_token_id) == 16
    short, _ = encode_vision(tokenizer, _conv(image), _layout(model))
    late = _conv(image)  # the same image after a long text: the cut falls inside its span
    late.messages[0].content.insert(0, TextPart("Look closely at the picture. " * 6))
    examples, stats = encode_all_vision(tokenizer, [late, _conv(image)], _layout(model),
                                        cutoff_len=len(short["input_ids"]))
    assert len(examples) == 1 and stats.dropped_image_span == 1
    assert "1 would cut an image span" in stats.summary()


def test_stray_placeholder_in_text_is_an_error(tiny_dir, tower_dirs, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.vision.data import encode_vision

    model, tokenizer = _vlm(tiny_dir, tower_dirs["clip"])
    with pytest.raises(TunelabError, match="test.jsonl:1: a <image> placeholder in a user message has no image"):
        encode_vision(tokenizer, _conv(_png(tmp_path / "a.png", "red"), question="and <image>?"), _layout(model))


# --- the self-drawn shapes dataset ------------------------------------------------------------

def test_shapes_dataset_is_seeded_and_holds_out_combinations(tmp_path):
    from tunelab.data import load_dataset
    from tunelab.data.commands import check
    from tunelab.vision.shapes import HELD_OUT, QUESTION_TYPES, build_shapes

    a = build_shapes(tmp_path / "a", n_train=6, n_test=3, seed=1)
    b = build_shapes(tmp_path / "b", n_train=6, n_test=3, seed=1)
    assert a["train"].read_text() == b["train"].read_text()
    assert (tmp_path / "a/images/test_0002.png").read_bytes() == (tmp_path / "b/images/test_0002.png").read_bytes()
    rows = {split: [json.loads(line) for line in a[split].read_text().splitlines()] for split in a}
    assert {r["type"] for r in rows["train"]} == set(QUESTION_TYPES) and len(rows["train"]) == 30

    def combos(row):  # {(colour, shape)} of a scene, from its report "Findings: N shapes. cell: colour shape; ..."
        return {tuple(part.split()[-2:]) for part in row["messages"][1]["content"].rstrip(".").split(". ", 1)[1].split("; ")}

    reports = {split: [combos(r) for r in rows[split] if r["type"] == "report"] for split in rows}
    assert not any(c & HELD_OUT for c in reports["train"])
    assert all(c & HELD_OUT for c in reports["test"])
    assert check([str(a["train"])]).ok and len(load_dataset(str(a["test"]))) == 15


def test_shapes_yes_no_questions_are_balanced_and_never_ask_training_of_held_out_combinations(tmp_path):
    """Every other yes/no answer is "yes" in each split (asked at random, ~83% would be "no");
    a training scene is never asked of a held-out combination (it would always be "no" there),
    a test scene may be, and every answer agrees with the scene's report."""
    import re

    from tunelab.vision.shapes import HELD_OUT, build_shapes

    paths = build_shapes(tmp_path, n_train=200, n_test=100, seed=3)
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        asked, answers = [], []
        for yesno, report in zip(rows[3::5], rows[4::5]):
            assert (yesno["type"], report["type"]) == ("yesno", "report")
            combo = re.search(r"Is there a (\w+) (\w+)\?", yesno["messages"][0]["content"]).groups()
            answer = yesno["messages"][1]["content"]
            assert answer == ("yes" if " ".join(combo) in report["messages"][1]["content"] else "no")
            asked.append(combo)
            answers.append(answer)
        assert answers.count("yes") == (len(answers) + 1) // 2, split
        held = sum(combo in HELD_OUT for combo in asked)
        assert held == 0 if split == "train" else held > 0
