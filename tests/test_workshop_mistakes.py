"""``tunelab data mistakes``: preference pairs from a model's own wrong answers."""

from __future__ import annotations

import json

import pytest

from tunelab.data.pairs import load_pairs
from tunelab.errors import TunelabError
from tunelab.workshop.mistakes import mistake_pairs, same_answer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_wrong_answers_become_pairs_and_right_ones_do_not(tiny_dir, tmp_path):
    from tunelab.generation import from_preset, generate
    from tunelab.models import load_model

    questions = [f"Normalize: fever {i}" for i in range(6)]
    model, tokenizer = load_model(str(tiny_dir))
    own = [r.text.strip() for r in generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                                            from_preset("greedy", max_new_tokens=6), progress=False)]
    # The first three references are what the model itself says: right, so no pair.
    rows = [{"instruction": q, "output": own[i].upper() if i < 3 else f"FEVER {i}"}
            for i, q in enumerate(questions)]
    assert all(own[:3]) and not any(same_answer(own[i], rows[i]["output"]) for i in range(3, 6))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = mistake_pairs(str(tiny_dir), [str(data)], tmp_path / "pairs", max_new_tokens=6, progress=False)
    assert (report.prompts, report.correct, report.pairs) == (6, 3, 3)
    info = json.loads((tmp_path / "pairs" / "dataset_info.json").read_text(encoding="utf-8"))
    assert info["mistakes_train"]["ranking"] is True
    pairs = load_pairs("mistakes_train", tmp_path / "pairs")
    assert [p.chosen.messages[-1].text for p in pairs] == [f"FEVER {i}" for i in range(3, 6)]
    assert [p.rejected.messages[-1].text for p in pairs] == own[3:]
    with pytest.raises(TunelabError, match="already holds mistakes pairs"):
        mistake_pairs(str(tiny_dir), [str(data)], tmp_path / "pairs", max_new_tokens=6, progress=False)
