"""``tunelab demo vlm``: a vision-language model tuned offline, against three baselines.

1. Draw the shapes dataset (``tunelab.vision.shapes``): test scenes each hold a colour-shape
   combination no training scene has; four question types and a findings report per scene.
2. Score the untrained composite: EfficientNet-Lite0 -> a fresh projector -> the builtin LLM
   (exactly what stage 1 starts from).
3. Stage ``align`` (projector only), then stage ``instruct`` (projector + LoRA) from its folder.
4. A text-only baseline: the same LLM LoRA-tuned with the same settings on the same questions
   with the images taken out; it can learn the answer priors (the commonest count or colour)
   and nothing about a particular scene.
5. The tuned model again, every test row given another row's image: if the model reads the
   image, it falls to the text-only level.

``report.json`` carries all four per question type (exact match; BLEU-1..4, ROUGE-L, METEOR,
CIDEr-D for the reports), ``report.md`` the table. A wall-clock budget (15 min, quick 6 min)
is shared as the text demo does: training runs get ``train.max_time`` from what the data, the
measured untrained evaluation and the estimated later evaluations leave, so a slow or busy
machine still finishes whole cosine schedules and a report.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import DEFAULT_MODEL, RunConfig, build
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text, write_json
from tunelab.vision.settings import BUILTIN_TOWER

QA_TYPES = ("count", "colour", "shape", "yesno")
MODELS = ("untrained", "text_only", "tuned", "tuned_shuffled_images")
COLUMNS = {"untrained": "untrained", "text_only": "text-only, tuned", "tuned": "tuned",
           "tuned_shuffled_images": "tuned, shuffled images"}
REPORT_METRICS = ["bleu", "rouge", "meteor", "cider"]
QA_NEW_TOKENS, REPORT_NEW_TOKENS = 8, 48
# Later evaluations (tuned, shuffled, text-only, the photos) against the measured untrained one:
# a model that learned stops after its answer, but one that got few steps rambles to the limit
# like the untrained one. Measured under load with 3 steps per stage: 536 s after 176 s, so the
# estimate is that worst case (3x), plus model loads.
LATER_EVAL = (3.0, 20.0)
MIN_TRAIN_SECONDS = 30.0


@dataclass
class VlmPlan:
    """Sizes of one vision demo run; ``quick`` shrinks them for CI."""

    n_train: int = 160
    """Training scenes (5 rows each: four questions and a report)."""
    n_test: int = 30
    """Test scenes, each with a held-out colour-shape combination."""
    align_epochs: float = 9.0
    """Align is where the image gets read: on validation scenes (block 7 alone) 200 align steps
    read the counts, 500 the shapes as well, 900 the colours half the time (docs/vision.md).
    Where the budget binds (the AVX2 kind), it plans fewer."""
    instruct_epochs: float = 2.0
    text_epochs: float = 2.0
    max_steps: int = -1
    """Per training run (-1: from the epochs); the budget may plan fewer."""
    layer: int | list[int] = dataclasses.field(default_factory=lambda: [0, 8])
    """EfficientNet-Lite0's stem (32 channels, colour and hardly any shape) beside block 7 (80
    channels, 14x14: shape, and colour bound up with it), both averaged onto block 7's grid. With
    block 7 alone, the colour of a held-out combination (a red triangle, when training showed red
    and triangles but never together) was read 6-8 times in 18 (docs/vision.md)."""
    pool: int = 7
    """Block 7's 14x14 grid averaged over 7x7 cells: 2x2 = 4 tokens per image, one per cell of the
    scenes' grid (a 4x4 grid cuts through the cells)."""
    projector_pos: bool = True
    """A learned embedding per image-token position (``model.vision.projector_pos``): a CNN cell
    says what it holds, not where, and the questions ask about positions."""
    projector: str = "linear"
    """``model.vision.projector``: ``linear`` adds what the stem says (colour) to what block 7 says
    (shape), so a colour reads the same whatever shape it is on; ``mlp2x_gelu`` mixes them, and read
    the held-out combinations' colours less well (validation: 0.67 against 0.53, docs/vision.md)."""
    feature_norm: bool = True
    """BatchNorm over the tower features' channels before the projector (``model.vision.feature_norm``):
    the stem's and block 7's channels differ widely in scale."""
    instruct_projector: bool = False
    """Train the projector in instruct too (``model.vision.train_projector``). Off: 100 instruct steps
    that also trained the projector took the validation count from 0.80 back to the prior (0.27);
    with it frozen the count stayed (0.83) and the reports came out better (docs/vision.md)."""
    template: str | None = "chatml"
    """SmolLM2's own format without the default system prompt it adds to every conversation
    (``model.template``): rows of ~26 tokens instead of ~42, so ~1.7x the steps in the budget."""
    batch_size: int = 8
    lr: float = 2e-3
    """LoRA learning rate of the text-only baseline (a fast learner of the answer priors), and of
    instruct unless ``instruct_lr`` is set."""
    instruct_lr: float | None = 5e-4
    """LoRA learning rate in instruct (None: ``lr``): it adds the report format and sharpens what
    align read, with the projector frozen."""
    projector_lr: float = 4e-3
    max_seconds: float | None = 15 * 60
    """Wall-clock budget of the whole demo; None trains every planned step."""
    shares: tuple[float, float, float] = (0.55, 0.25, 0.20)
    """How the training time is split: align, instruct, text-only."""

    @classmethod
    def quick(cls) -> "VlmPlan":
        # The training scenes stay: with 80 of them and 200 align steps the model did not read
        # the image (docs/vision.md); the test set and the later stages shrink instead.
        return cls(n_test=10, instruct_epochs=1.0, text_epochs=1.0, max_seconds=6 * 60)


def _say(text: str) -> None:
    print(text, flush=True)


def build_data(data_dir: Path, plan: VlmPlan, seed: int) -> dict[str, Path]:
    """The shapes splits, their text-only copies and a few real photos for a qualitative look."""
    from tunelab.vision.shapes import build_shapes, without_images

    paths = build_shapes(data_dir, plan.n_train, plan.n_test, seed)
    paths["train_text"] = without_images(paths["train"], data_dir / "train_text.jsonl")
    paths["test_text"] = without_images(paths["test"], data_dir / "test_text.jsonl")
    return paths


def sample_photos(folder: Path) -> list[Path]:
    """Real photographs shipped by installed packages (scikit-image's, else matplotlib's)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos: list[Path] = []
    try:
        from skimage import data as skdata

        for name in ("chelsea", "astronaut", "coffee"):
            path = folder / f"{name}.png"
            Image.fromarray(getattr(skdata, name)()).save(path)
            photos.append(path)
    except ImportError:
        pass
    if not photos:
        try:
            from matplotlib import cbook

            path = folder / "grace_hopper.png"
            with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
                image.convert("RGB").save(path)
            photos.append(path)
        except (ImportError, OSError, ValueError):
            pass
    return photos


def composite_settings(plan: VlmPlan, tower: str) -> dict[str, Any]:
    """``model.vision`` for the composite the demo builds (untrained and in align alike)."""
    return {"tower": tower, "layer": plan.layer, "pool": plan.pool, "projector": plan.projector,
            "projector_pos": plan.projector_pos, "feature_norm": plan.feature_norm}


def stage_config(out: Path, plan: VlmPlan, model: str, tower: str | None, data: Path, stage: str,
                 seed: int, epochs: float) -> RunConfig:
    """One training run of the demo (``stage``: align, instruct, or text for the baseline)."""
    train = {"epochs": epochs, "max_steps": plan.max_steps, "batch_size": plan.batch_size, "grad_accum": 1,
             "lr": plan.lr, "scheduler": "cosine", "warmup_ratio": 0.05, "bf16": "auto", "seed": seed,
             "logging_steps": 5, "save_strategy": "no"}
    values: dict[str, Any] = {
        "output_dir": str(out), "overwrite": True, "model": {"name": model, "template": plan.template},
        "data": {"train": [str(data)], "cutoff_len": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": train,
    }
    if stage == "align":
        values["model"]["vision"] = {**composite_settings(plan, tower), "stage": "align"}
        train["lr"] = plan.projector_lr
    elif stage == "instruct":
        values["model"]["vision"] = {"stage": "instruct", "projector_lr": plan.projector_lr,
                                     "train_projector": plan.instruct_projector}
        train["lr"] = plan.instruct_lr if plan.instruct_lr is not None else plan.lr
    return build(RunConfig, values)


def _steps(run: Path) -> int:
    try:
        return int(json.loads((run / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


def _rows(path: Path) -> tuple[list, list[str]]:
    from tunelab.data import load_dataset

    kinds = [json.loads(line)["type"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = load_dataset(str(path))
    if len(convs) != len(kinds):
        raise TunelabError(f"{path}: {len(convs)} conversations for {len(kinds)} rows")
    return convs, kinds


def score_model(model, tokenizer, convs: list, kinds: list[str], shuffle: bool = False, seed: int = 0
                ) -> dict[str, Any]:
    """Per question type: exact match for the questions, overlap metrics for the reports."""
    from tunelab.generation import GenerationSettings
    from tunelab.vision.evaluate import evaluate_vlm

    result: dict[str, Any] = {"groups": {}, "predictions": [""] * len(convs)}
    for part, new_tokens, metrics in (("qa", QA_NEW_TOKENS, ["em"]), ("report", REPORT_NEW_TOKENS, REPORT_METRICS)):
        index = [i for i, k in enumerate(kinds) if (k == "report") == (part == "report")]
        if not index:
            continue
        scored = evaluate_vlm(model, tokenizer, [convs[i] for i in index], metrics,
                              GenerationSettings(max_new_tokens=new_tokens), groups=[kinds[i] for i in index],
                              shuffle_images=shuffle, seed=seed)
        result["groups"].update(scored["groups"])
        if part == "qa":
            result["qa"] = scored["overall"]
        for i, prediction in zip(index, scored["predictions"]):
            result["predictions"][i] = prediction
    return result


def _timed(label: str, timings: dict, work):
    started = time.perf_counter()
    value = work()
    timings[label] = round(time.perf_counter() - started, 1)
    return value


def evaluate_untrained(model_spec: str, tower: str, plan: VlmPlan, seed: int, convs, kinds) -> dict:
    from tunelab.config import ModelConfig
    from tunelab.vision.compose import new_vlm
    from tunelab.vision.settings import VisionConfig

    vision = VisionConfig(**composite_settings(plan, tower))
    model, tokenizer = new_vlm(ModelConfig(name=model_spec, template=plan.template, vision=vision), for_training=False,
                               seed=seed)
    result = score_model(model.eval(), tokenizer, convs, kinds)
    del model
    gc.collect()
    return result


def evaluate_tuned(run: Path, convs, kinds, photos: list[Path], seed: int) -> tuple[dict, dict, list]:
    """The tuned model on the test rows, on the same rows with shuffled images, and on photos."""
    from tunelab.data import Conversation, ImagePart, Message, TextPart
    from tunelab.generation import GenerationSettings
    from tunelab.vision.chat import answer
    from tunelab.vision.compose import load_vlm

    model, tokenizer = load_vlm(run)
    tuned = score_model(model, tokenizer, convs, kinds)
    shuffled = score_model(model, tokenizer, convs, kinds, shuffle=True, seed=seed)
    samples = []
    for photo in photos:
        for question in ("Describe the findings.", "How many shapes are there?"):
            conv = Conversation([Message("user", [ImagePart(str(photo)), TextPart(question)])], str(photo))
            samples.append({"image": photo.name, "question": question,
                            "answer": answer(model, tokenizer, conv, GenerationSettings(max_new_tokens=REPORT_NEW_TOKENS))})
    del model
    gc.collect()
    return tuned, shuffled, samples


def evaluate_text_only(run: Path, convs, kinds) -> dict:
    """The text-only baseline on the same questions without images (the text generation path)."""
    from tunelab.eval.metrics import score
    from tunelab.generation import GenerationSettings, generate
    from tunelab.models import load_model

    model, tokenizer = load_model(str(run))
    result: dict[str, Any] = {"groups": {}, "predictions": [""] * len(convs)}
    for part, new_tokens, metrics in (("qa", QA_NEW_TOKENS, ["em"]), ("report", REPORT_NEW_TOKENS, REPORT_METRICS)):
        index = [i for i, k in enumerate(kinds) if (k == "report") == (part == "report")]
        if not index:
            continue
        answers = generate(model, tokenizer, [convs[i].to_openai()[:-1] for i in index],
                           GenerationSettings(max_new_tokens=new_tokens), progress=False)
        predictions = [a.text.strip() for a in answers]
        references = [convs[i].messages[-1].text for i in index]
        if part == "qa":
            result["qa"] = score(predictions, references, metrics)
        for kind in sorted({kinds[i] for i in index}):
            members = [j for j, i in enumerate(index) if kinds[i] == kind]
            result["groups"][kind] = score([predictions[j] for j in members], [references[j] for j in members],
                                           metrics)
        for i, prediction in zip(index, predictions):
            result["predictions"][i] = prediction
    del model
    gc.collect()
    return result


def _budget(plan: VlmPlan, started: float, eval_estimate: float, share_left: float, share: float) -> float | None:
    """Seconds for the next training run: its share of what the budget has left."""
    if plan.max_seconds is None:
        return None
    left = plan.max_seconds - (time.perf_counter() - started) - eval_estimate
    return max(MIN_TRAIN_SECONDS, left * share / share_left)


def _train(cfg: RunConfig, budget: float | None, timings: dict, label: str) -> Path:
    from tunelab.train import train

    if budget is not None:
        cfg.train.max_time = round(budget)
        _say(f"      up to {budget / 60:.1f} min (train.max_time)")
    return _timed(label, timings, lambda: train(cfg))


def run_vlm_demo(out_dir: str = "runs/demo-vlm", quick: bool = False, overwrite: bool = False,
                 model: str = DEFAULT_MODEL, tower: str = BUILTIN_TOWER, seed: int = 42,
                 max_seconds: float | None | str = "plan", plan: VlmPlan | None = None) -> dict[str, Any]:
    """Run the vision demo; returns the report (also ``OUT/report.json`` and ``OUT/report.md``)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TunelabError(f"{out} is not empty; pass --overwrite or choose --out DIR")
        shutil.rmtree(out)
    plan = plan or (VlmPlan.quick() if quick else VlmPlan())
    if max_seconds != "plan":
        plan = dataclasses.replace(plan, max_seconds=max_seconds)
    started, timings = time.perf_counter(), {}
    _say("[1/6] drawing the shapes dataset (seeded, offline)")
    paths = _timed("data_s", timings, lambda: build_data(out / "data", plan, seed))
    photos = sample_photos(out / "data" / "photos")
    convs, kinds = _rows(paths["test"])
    text_convs, _ = _rows(paths["test_text"])
    _say(f"      {plan.n_train} training scenes ({plan.n_train * 5} rows), {plan.n_test} test scenes "
         f"({len(convs)} rows) with held-out colour-shape combinations")
    _say("[2/6] scoring the untrained model (EfficientNet-Lite0 -> fresh projector -> LLM)")
    results = {"untrained": _timed("eval_untrained_s", timings,
                                   lambda: evaluate_untrained(model, tower, plan, seed, convs, kinds))}
    eval_estimate = timings["eval_untrained_s"] * LATER_EVAL[0] + LATER_EVAL[1]
    align_share, instruct_share, text_share = plan.shares
    _say("[3/6] stage 1, align: the projector learns to speak the LLM's embedding language")
    align = _train(stage_config(out / "align", plan, model, tower, paths["train"], "align", seed, plan.align_epochs),
                   _budget(plan, started, eval_estimate, sum(plan.shares), align_share), timings, "train_align_s")
    _say("[4/6] stage 2, instruct: " + ("projector + LoRA on the LLM" if plan.instruct_projector
                                         else "LoRA on the LLM, the projector frozen") + ", from the align run")
    instruct = _train(stage_config(out / "instruct", plan, str(align), None, paths["train"], "instruct", seed,
                                   plan.instruct_epochs),
                      _budget(plan, started, eval_estimate, instruct_share + text_share, instruct_share),
                      timings, "train_instruct_s")
    _say("[5/6] text-only baseline: the same LoRA on the same questions, images taken out")
    text = _train(stage_config(out / "text-only", plan, model, None, paths["train_text"], "text", seed,
                               plan.text_epochs),
                  _budget(plan, started, eval_estimate, text_share, text_share), timings, "train_text_s")
    _say("[6/6] scoring tuned, tuned with shuffled images, and text-only")
    tuned, shuffled, samples = _timed("eval_tuned_s", timings,
                                      lambda: evaluate_tuned(instruct, convs, kinds, photos, seed))
    results.update(tuned=tuned, tuned_shuffled_images=shuffled)
    results["text_only"] = _timed("eval_text_s", timings, lambda: evaluate_text_only(text, text_convs, kinds))
    timings["total_s"] = round(time.perf_counter() - started, 1)
    report = make_report(out, plan, model, tower, results, kinds, convs, samples, timings,
                         {"align": align, "instruct": instruct, "text_only": text})
    print_summary(report, out)
    return report


def _machine() -> dict[str, Any]:
    from tunelab import hardware

    probe = hardware.probe()
    choice = hardware.applied_threads()
    return {"cpu": probe.cpu_model, "kind": probe.kind, "capability": probe.capability,
            "cores_available": probe.cores_available, "other_busy_cores": probe.other_busy_cores,
            "loadavg": probe.loadavg, "threads": choice.threads if choice else None}


def make_report(out: Path, plan: VlmPlan, model: str, tower: str, results: dict, kinds: list[str], convs: list,
                samples: list, timings: dict, runs: dict[str, Path]) -> dict[str, Any]:
    """``report.json`` (every model's scores per question type, predictions, settings) and ``report.md``."""
    counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    report: dict[str, Any] = {
        "models": {"untrained": f"{tower} -> fresh projector -> {model}", "text_only": str(runs["text_only"]),
                   "tuned": str(runs["instruct"]), "tuned_shuffled_images": str(runs["instruct"])},
        "rows": counts,
        "results": {name: {"qa": results[name].get("qa"), "groups": results[name]["groups"]} for name in MODELS},
        "steps": {name: _steps(path) for name, path in runs.items()},
        "settings": {**dataclasses.asdict(plan), "tower": tower, "llm": model,
                     "qa_new_tokens": QA_NEW_TOKENS, "report_new_tokens": REPORT_NEW_TOKENS},
        "timings": timings,
        "machine": _machine(),
        "examples": [{"question": convs[i].messages[0].text, "type": kinds[i], "reference": convs[i].messages[-1].text,
                      **{name: results[name]["predictions"][i] for name in MODELS}}
                     for i in _example_rows(kinds)],
        "samples": samples,
    }
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", to_markdown(report))
    return report


def _example_rows(kinds: list[str]) -> list[int]:
    return [kinds.index(kind) for kind in dict.fromkeys(kinds)]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """``[what, rows, metric, untrained, text-only, tuned, shuffled]`` per line of the table."""
    def cell(name: str, group: str | None, key: str) -> str:
        scores = report["results"][name]["qa"] if group is None else report["results"][name]["groups"].get(group, {})
        value = (scores or {}).get(key)
        return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value)[:24])

    lines = []
    for kind in QA_TYPES:
        if kind in report["rows"]:
            lines.append([kind, str(report["rows"][kind]), "exact match", *(cell(m, kind, "em") for m in MODELS)])
    qa_rows = sum(n for kind, n in report["rows"].items() if kind != "report")
    if qa_rows:
        lines.append(["all questions", str(qa_rows), "exact match", *(cell(m, None, "em") for m in MODELS)])
    if "report" in report["rows"]:
        for key, name in (("bleu4", "BLEU-4 (0-100)"), ("bleu1", "BLEU-1 (0-100)"), ("rougeL", "ROUGE-L"),
                          ("meteor", "METEOR"), ("cider", "CIDEr-D (0-10)")):
            lines.append(["report", str(report["rows"]["report"]), name, *(cell(m, "report", key) for m in MODELS)])
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    header = ["", "rows", "metric", *(COLUMNS[m] for m in MODELS)]
    lines = ["# tunelab demo vlm: before and after", "",
             f"Tower -> projector -> LLM: {settings['tower']} -> {settings['projector']} -> "
             f"{settings['llm']}; "
             f"machine: {report['machine']['cpu']} ({report['machine']['kind']}), "
             f"{report['timings'].get('total_s', 0):.0f} s in all.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    steps = report["steps"]
    lines += ["", f"Training steps: align {steps.get('align', 0)}, instruct {steps.get('instruct', 0)}, "
              f"text-only {steps.get('text_only', 0)} (batch {report['settings']['batch_size']}).",
              "", "## Examples", ""]
    for example in report["examples"]:
        lines.append(f"- **{example['question']}** (reference: {example['reference']})")
        lines += [f"  - {COLUMNS[m]}: {example[m]}" for m in MODELS]
    if report["samples"]:
        lines += ["", "## Real photos (qualitative; no shapes in them)", ""]
        lines += [f"- {s['image']}: {s['question']} -> {s['answer']}" for s in report["samples"]]
    return "\n".join(lines) + "\n"


def print_summary(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    view = Table(title="held-out test scenes")
    for column in ["", "rows", "metric", *(COLUMNS[m] for m in MODELS)]:
        view.add_column(column)
    for row in table_rows(report):
        view.add_row(*row)
    console.print(view)
    console.print(f"report: {out / 'report.md'} (also report.json); done in {report['timings']['total_s']:.0f} s")
    console.print(f"chat with it:   tunelab chat {out / 'instruct'} --image {out / 'data' / 'images' / 'test_0000.png'}")
