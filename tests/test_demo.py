import json

import pytest

from tunelab.demo.general import GENERAL_QUESTIONS, keyword_hit
from tunelab.demo.metrics import chapter_accuracy, keyword_recall
from tunelab.demo.pipeline import run_demo
from tunelab.errors import TunelabError


def test_keyword_hit_takes_alternatives_case_insensitively():
    assert keyword_hit("A spider has 8 legs.", "eight|8")
    assert keyword_hit("The capital is PARIS.", "Paris")
    assert not keyword_hit("The capital is Lyon.", "Paris")
    assert keyword_recall(["Paris it is", "no idea"], ["Paris", "Tokyo"]) == {"keyword_acc": 0.5}
    assert len({q for q, _ in GENERAL_QUESTIONS}) == len(GENERAL_QUESTIONS)


def test_chapter_accuracy_credits_a_real_description_in_the_right_chapter():
    # K35.80 and K35.89 are both in chapter 11 (digestive); A00.0 is chapter 1.
    import simple_icd_10_cm as cm

    reference = cm.get_description("K35.80")
    same_chapter = cm.get_description("K35.89")
    other_chapter = cm.get_description("A00.0")
    result = chapter_accuracy([same_chapter, other_chapter, "not a diagnosis", reference.upper()],
                              [reference] * 4)
    assert result == {"icd_chapter_acc": 0.5}


def test_demo_refuses_to_overwrite_an_existing_run(tmp_path):
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "config.yaml").write_text("model: {}\n", encoding="utf-8")
    with pytest.raises(TunelabError, match="already holds a demo run; pass --overwrite"):
        run_demo(str(out), quick=True)
    assert (out / "config.yaml").is_file()  # nothing was touched


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(str(out), quick=True)
    for name in ("config.yaml", "adapter_model.safetensors", "loss.png", "metrics.jsonl", "README.md",
                 "eval/report.json", "eval/report.md", "eval/report.html", "data/dataset_info.json"):
        assert (out / name).exists(), name
    saved = json.loads((out / "eval" / "report.json").read_text(encoding="utf-8"))
    assert saved["results"] == report["results"]
    base, tuned = list(saved["results"]["icd10cm-norm_test"].values())
    assert set(base) >= {"em", "icd_chapter_acc", "bleu4", "rougeL"}
    assert tuned["rougeL"] > base["rougeL"]  # even 12 steps move the answers towards the standard terms
    assert "keyword_acc" in next(iter(saved["results"]["general_check"].values()))


def test_demo_budget_leaves_training_what_data_and_the_estimated_evaluation_do_not_take():
    from tunelab.demo.pipeline import EVAL_MARGIN, MIN_TRAIN_SECONDS, DemoPlan, training_budget

    plan = DemoPlan(general_questions=32, max_seconds=900)
    sizes = {"train": 507, "validation": 38, "test": 112}
    # distillation: 32 prompts x 48 slots in 20 s; evaluation: 2 x (150 x 32 + 16 x 48) slots
    expected_eval = 20 * 2 * (150 * 32 + 16 * 48) / (32 * 48)
    assert training_budget(plan, 60, 20, sizes) == pytest.approx(900 - 60 - expected_eval)
    assert training_budget(plan, 890, 20, sizes) == MIN_TRAIN_SECONDS  # always some training
    assert training_budget(DemoPlan(max_seconds=None), 60, 20, sizes) is None
    # the tuned model counted at its reference answers' length (here 150 rows x 12 tokens)
    tuned_eval = 20 * (2 * 16 * 48 + 150 * 32 + 150 * 12) / (32 * 48) * EVAL_MARGIN[0] + EVAL_MARGIN[1]
    assert training_budget(plan, 60, 20, sizes, tuned_slots=150 * 12) == pytest.approx(900 - 60 - tuned_eval)


def test_reference_slots_count_answer_tokens_capped(tmp_path, tiny_tokenizer):
    from tunelab.demo.pipeline import EVAL_NEW_TOKENS, DemoPlan, reference_slots
    from tunelab.io import write_jsonl

    answers = ["Double inlet ventricle", "x " * 200]
    write_jsonl(tmp_path / "test.jsonl", [{"output": a} for a in answers])
    short = len(tiny_tokenizer(answers[0], add_special_tokens=False)["input_ids"]) + 1
    assert reference_slots(tmp_path, DemoPlan(), tiny_tokenizer) == short + EVAL_NEW_TOKENS
    assert reference_slots(tmp_path, DemoPlan(eval_samples=1), tiny_tokenizer) == short
    assert DemoPlan.quick().max_seconds is None  # the quick demo trains its fixed 12 steps
