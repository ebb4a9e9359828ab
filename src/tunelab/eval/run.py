"""``evaluate(cfg)``: several models on the same test sets, one before/after report.

For each model (base spec, run folder, merged export) and each test set: the prompt is
every message before the last assistant answer, the reference is that answer; answers
are generated in batches by ``tunelab.generation`` (left padding, KV cache, sorted by
length), written to ``<out>/<model>/<test set>/predictions.jsonl`` next to prompt and
reference, and scored. ``report.json``/``report.md``/``report.html`` hold the numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import sys
import time
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.eval.metrics import MetricOptions, parse_metrics, score
from tunelab.io import write_jsonl


@dataclasses.dataclass
class TestSet:
    """Prompts and references of one test set (rows in file order)."""

    name: str
    prompts: list[list[dict[str, Any]]]
    references: list[str]
    sources: list[str]


def label(spec: str, taken: set[str]) -> str:
    """A short, unique, file-system-safe name for a model or test set spec."""
    text = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.rstrip("/")).name or spec
    text = re.sub(r"[^\w.\-]+", "_", Path(text).stem if text.endswith((".jsonl", ".json", ".csv")) else text) or "x"
    name, n = text, 2
    while name in taken:
        name, n = f"{text}-{n}", n + 1
    taken.add(name)
    return name


def load_test_set(spec: str, dataset_dir: str | None, max_samples: int | None, name: str) -> TestSet:
    """Read a dataset; each conversation must end with the assistant answer to compare with."""
    from tunelab.data import load_dataset
    from tunelab.data.images import resolve_images

    prompts, refs, sources = [], [], []
    for conv in load_dataset(spec, dataset_dir):
        messages = resolve_images(conv, dataset_dir).to_openai()  # image paths found before any model loads
        if not messages or messages[-1]["role"] != "assistant":
            raise TunelabError(f"{conv.source or spec}: no assistant answer at the end to compare with")
        prompts.append(messages[:-1])
        refs.append(str(conv.messages[-1].text))
        sources.append(conv.source)
    if max_samples is not None:  # the first N: every model sees the same rows, in file order
        prompts, refs, sources = prompts[:max_samples], refs[:max_samples], sources[:max_samples]
    if not prompts:
        raise TunelabError(f"{spec}: test set is empty")
    return TestSet(name, prompts, refs, sources)


def default_models(cfg: RunConfig) -> list[str]:
    """``eval.models``, else the base model followed by the run folder when it holds a run."""
    if cfg.eval.models:
        return list(cfg.eval.models)
    models = [cfg.model.name]
    if (Path(cfg.output_dir) / "config.yaml").is_file():
        models.append(cfg.output_dir)
    return models


def _settings(cfg: RunConfig):
    from tunelab.generation import from_preset

    extra = cfg.eval.generation or {}
    if not extra:
        return from_preset(cfg.eval.preset, max_new_tokens=cfg.eval.max_new_tokens)
    if not isinstance(extra, dict):
        raise TunelabError(f"eval.generation: expected a mapping of generation settings, got {extra!r}")
    settings = from_preset(cfg.eval.preset, max_new_tokens=cfg.eval.max_new_tokens)
    try:
        return settings.replace(**extra)
    except TunelabError as exc:  # "generation: unknown setting ..." / "generation.num_beams: ..."
        raise TunelabError(f"eval.{exc}") from None


def _evaluate_model(spec: str, cfg: RunConfig, test_sets: list[TestSet], out: Path, model_name: str,
                    settings, progress: bool) -> tuple[dict, dict]:
    """Generate and score one model on every test set; returns (metrics, timings)."""
    from tunelab.generation import generate

    start = time.perf_counter()
    model, tokenizer = _load(spec, cfg)
    timings: dict[str, Any] = {"load_s": round(time.perf_counter() - start, 2)}
    if getattr(model, "gguf_path", None):  # --quantize: the file answering and how it agreed with its source
        timings["llamacpp"] = {"gguf": str(model.gguf_path), "threads": model.threads, "check": model.quality}
    metrics: dict[str, Any] = {}
    names = parse_metrics(cfg.eval.metrics)
    for test in test_sets:
        start = time.perf_counter()
        results = generate(model, tokenizer, test.prompts, settings, batch_size=cfg.eval.batch_size,
                           progress=progress)
        gen_s = time.perf_counter() - start
        predictions = [r.text for r in results]
        write_jsonl(out / model_name / test.name / "predictions.jsonl", [
            {"prompt": p, "reference": ref, "prediction": r.text, "finish_reason": r.finish_reason,
             "completion_tokens": r.completion_tokens, "source": src}
            for p, ref, r, src in zip(test.prompts, test.references, results, test.sources)])
        metric_times: dict[str, float] = {}
        options = MetricOptions(model=(model, tokenizer), prompts=test.prompts)
        metrics[test.name] = score(predictions, test.references, names, options, metric_times)
        tokens = sum(r.completion_tokens for r in results)
        timings[test.name] = {"generate_s": round(gen_s, 2), "completion_tokens": tokens,
                              "tokens_per_s": round(tokens / gen_s, 1) if gen_s else None,
                              "metrics_s": metric_times}
    del model
    gc.collect()
    return metrics, timings


def _load(spec: str, cfg: RunConfig):
    """A model to evaluate: a vision run folder as its composite (images reach it), else the text loader."""
    from tunelab.vision.compose import is_vision_run

    if cfg.eval.quantize:
        from tunelab.models.gguf_runtime import load_quantized

        return load_quantized(spec, cfg.eval.quantize, log=lambda line: print(line, file=sys.stderr, flush=True))
    if is_vision_run(spec):
        from tunelab.vision.compose import load_vlm

        return load_vlm(spec)
    from tunelab.models import load_model

    return load_model(dataclasses.replace(cfg.model, name=spec))


def judge_from_config(cfg: RunConfig) -> Any:
    """A ``JudgeClient`` from ``eval.judge_*``, or None when no judge is configured."""
    import os

    e = cfg.eval
    if not (e.judge_base_url or e.judge_model):
        return None
    if not (e.judge_base_url and e.judge_model):
        raise TunelabError("eval.judge_base_url and eval.judge_model go together")
    from tunelab.eval.judge import JudgeClient

    out_dir = e.output_dir or os.path.join(cfg.output_dir, "eval")
    return JudgeClient(e.judge_base_url, e.judge_model, api_key=os.environ.get(e.judge_api_key_env, "EMPTY"),
                       cache_path=os.path.join(out_dir, "judge_cache.jsonl"))


def evaluate(cfg: RunConfig, progress: bool = True, judge: Any = None) -> dict[str, Any]:
    """Evaluate ``eval.models`` on ``eval.datasets`` (default: data.eval) and write the report.

    Returns the report dict (also written as report.json); the first model is the
    "before" column of every table. With ``judge`` (a ``JudgeClient``) every model's
    answers are also judged pointwise (means join the metrics table) and the first
    model is compared with the last pairwise (``report["judge"]``).
    """
    from tunelab.eval.report import write_reports

    judge = judge or judge_from_config(cfg)
    models = default_models(cfg)
    datasets = list(cfg.eval.datasets or cfg.data.eval)
    if not datasets:
        raise TunelabError("eval.datasets: no test set (set eval.datasets or data.eval)")
    parse_metrics(cfg.eval.metrics)
    if cfg.eval.quantize is not None:
        from tunelab.models.gguf_runtime import QUANTIZE_TYPES

        if cfg.eval.quantize not in QUANTIZE_TYPES:
            raise TunelabError(f"eval.quantize: {cfg.eval.quantize!r} is not one of {', '.join(QUANTIZE_TYPES)}")
    settings = _settings(cfg)
    out = Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval")
    taken: set[str] = set()
    test_sets = [load_test_set(spec, cfg.data.dataset_dir, cfg.eval.max_samples, label(spec, taken))
                 for spec in datasets]
    taken_models: set[str] = set()
    model_names = [label(spec, taken_models) for spec in models]
    report: dict[str, Any] = {
        "models": dict(zip(model_names, models)),
        "test_sets": {t.name: {"spec": spec, "rows": len(t.prompts)} for t, spec in zip(test_sets, datasets)},
        "metrics": parse_metrics(cfg.eval.metrics),
        "settings": {"generation": dataclasses.asdict(settings), "preset": cfg.eval.preset,
                     "batch_size": cfg.eval.batch_size, "max_samples": cfg.eval.max_samples,
                     "precision": cfg.model.precision, "quantize": cfg.eval.quantize},
        "results": {t.name: {} for t in test_sets},
        "timings": {},
    }
    started = time.perf_counter()
    for spec, name in zip(models, model_names):
        metrics, timings = _evaluate_model(spec, cfg, test_sets, out, name, settings, progress)
        for test_name, values in metrics.items():
            report["results"][test_name][name] = values
        if "llamacpp" in timings:  # --quantize: which file answered, and how it agreed with its source
            report["settings"].setdefault("llamacpp", {})[name] = timings.pop("llamacpp")
        report["timings"][name] = timings
    if judge is not None:
        _judge_all(judge, report, test_sets, model_names, out)
    report["timings"]["total_s"] = round(time.perf_counter() - started, 2)
    report["examples"] = _examples(out, test_sets, model_names)
    report["output_dir"] = str(out)
    write_reports(report, out)
    return report


def _predictions(out: Path, model: str, test: str) -> list[str]:
    import json

    path = out / model / test / "predictions.jsonl"
    return [json.loads(line)["prediction"] for line in path.read_text(encoding="utf-8").splitlines()]


def _judge_all(judge: Any, report: dict, test_sets: list[TestSet], model_names: list[str], out: Path) -> None:
    """Pointwise judge of every model (joins the metrics) and first-vs-last pairwise."""
    from tunelab.eval.judge import judge_pairwise, judge_pointwise
    from tunelab.io import write_json

    report["judge"] = {"model": judge.model, "base_url": judge.base_url, "pairwise": {}}
    for test in test_sets:
        for name in model_names:
            result = judge_pointwise(judge, test.prompts, _predictions(out, name, test.name), test.references)
            write_json(out / name / test.name / "judge_pointwise.json", result)
            report["results"][test.name][name].update(result["summary"])
        if len(model_names) > 1:
            first, last = model_names[0], model_names[-1]
            result = judge_pairwise(judge, test.prompts, _predictions(out, first, test.name),
                                    _predictions(out, last, test.name), test.references, (first, last))
            write_json(out / f"judge_pairwise_{test.name}.json", result)
            report["judge"]["pairwise"][test.name] = {"a": first, "b": last, **result["summary"]}


def _examples(out: Path, test_sets: list[TestSet], model_names: list[str], count: int = 3) -> dict[str, list]:
    """The first few rows of each test set with every model's answer side by side."""
    examples: dict[str, list] = {}
    for test in test_sets:
        answers = {name: _predictions(out, name, test.name)[:count] for name in model_names}
        examples[test.name] = [
            {"prompt": _shown(test.prompts[i][-1]["content"]) if test.prompts[i] else "", "reference": test.references[i],
             "predictions": {name: answers[name][i] for name in model_names}}
            for i in range(min(count, len(test.prompts)))]
    return examples


def _shown(content: Any) -> str:
    """A message's content as report text: image parts become ``<image>``."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if p.get("type") == "text" else "<image>" for p in content)
