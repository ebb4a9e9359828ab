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


def test_a_judge_keeps_only_the_answers_it_rates_below_the_reference(tmp_path):
    """A real HTTP judge on loopback (test_eval_judge's stand-in: an answer saying "good" wins)."""
    from test_eval_judge import JudgeServer

    from tunelab.data.registry import load_datasets
    from tunelab.eval.judge import JudgeClient
    from tunelab.workshop.mistakes import pairs_from_answers

    data = tmp_path / "open.jsonl"
    rows = [{"instruction": "发烧怎么办?", "output": "a good answer: 多喝水"},
            {"instruction": "Q2", "output": "plain"}, {"instruction": "Q3", "output": "another good one"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    convs = load_datasets([str(data)])
    answers = [["meh"], ["meh too"], ["Another good  one"]]  # the last is right (case, spaces aside)
    server = JudgeServer()
    try:
        judge = JudgeClient(base_url=server.base_url, model="judge", cache_path=str(tmp_path / "cache.jsonl"))
        report = pairs_from_answers(convs, answers, tmp_path / "pairs", judge=judge)
        assert (report.correct, report.judged, report.judge_dropped, report.pairs) == (1, 2, 1, 1)
        assert server.requests == 4  # two wrong answers, each judged in both orders
        pairs = load_pairs("mistakes_train", tmp_path / "pairs")
        assert [(p.chosen.messages[-1].text, p.rejected.messages[-1].text) for p in pairs] == [
            ("a good answer: 多喝水", "meh")]
        info = json.loads((tmp_path / "pairs" / "build_info.json").read_text(encoding="utf-8"))
        assert "1 kept out by the judge" in info["mistakes"]["description"]
        assert info["mistakes"]["options"]["judge"]["model"] == "judge"
        with pytest.raises(TunelabError, match="the judge preferred no reference"):
            pairs_from_answers(convs[1:2], [["meh too"]], tmp_path / "pairs", name="ties", judge=judge)
        assert server.requests == 4  # that verdict came from the cache
    finally:
        server.close()
