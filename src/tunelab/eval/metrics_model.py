"""Metrics that need a neural model: BERTScore and perplexity of the references.

BERTScore (Zhang et al. 2020, the ``bert-score`` package): each token of the
prediction is matched to its most similar reference token by cosine similarity of
contextual embeddings taken from layer L of an encoder; P is the mean over prediction
tokens, R over reference tokens, F1 their harmonic mean; no IDF weighting, no baseline
rescaling (the published baselines exist only for hub models).

The default encoder is a model tunelab already has offline: the builtin
SmolLM2-135M-Instruct folder at layer ``DEFAULT_BERTSCORE_LAYER`` (9 of 30). SmolLM2 is a
decoder (causal attention: a token's state sees only its left context). The layer was
chosen by measurement on 12 English/Chinese paraphrase pairs (docs/evaluation.md):
every layer ranks paraphrases above unrelated sentences; early layers are the most
lexical (worst at lexically-close contradictions), the last layer squeezes all scores
together; layer 9 keeps a wide paraphrase/unrelated gap with the best contradiction
margin short of the last layer. Any local HF folder works (``bertscore_model`` /
``bertscore_layer``; default layer for other encoders: half their depth).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

DEFAULT_BERTSCORE_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_BERTSCORE_LAYER = 9
"""Layer of SmolLM2-135M (30 layers) whose hidden states BERTScore compares."""


def _encoder_folder(model: str) -> str:
    if model.startswith("builtin:"):
        from tunelab.models.builtin import builtin_folder

        return str(builtin_folder(model.split(":", 1)[1]))
    if not (Path(model) / "config.json").is_file():
        raise TunelabError(f"{model}: BERTScore needs a local model folder with config.json")
    return model


def _num_layers(folder: str) -> int:
    import json

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("num_hidden_layers") or config.get("n_layer") or 0)


def _bert_like(tokenizer, model) -> None:
    """Make a decoder's tokenizer frame every sentence as ``[CLS] text [SEP]`` like BERT.

    bert-score assumes exactly that: it gives the CLS/SEP ids zero weight and treats a
    sentence of 2 tokens as empty (scoring it 0). A GPT-style tokenizer adds no such
    tokens, so a real 2-token answer would silently score 0 and the first token would be
    weighted like content. Here bos (or eos) plays CLS and eos plays SEP.
    """
    from tokenizers.processors import TemplateProcessing

    if tokenizer.pad_token_id is None:  # bert-score pads with it
        tokenizer.pad_token = tokenizer.eos_token
    cls_token = tokenizer.cls_token or tokenizer.bos_token or tokenizer.eos_token
    sep_token = tokenizer.sep_token or tokenizer.eos_token
    if cls_token is None or sep_token is None:
        raise TunelabError("BERTScore encoder: the tokenizer has no bos/eos token to frame sentences")
    tokenizer.cls_token, tokenizer.sep_token = cls_token, sep_token
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (cls_token, sep_token)}
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{cls_token} $A {sep_token}", pair=f"{cls_token} $A {sep_token} $B {sep_token}",
        special_tokens=list(ids.items()))
    # bert-score truncates at model_max_length, which tokenizers often leave at 1e30
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    tokenizer.model_max_length = min(int(min(tokenizer.model_max_length, 10**9)), limit)


def bertscore(predictions: list[str], references: list[Any], model: str | None = None,
              layer: int | None = None, batch_size: int = 16) -> dict[str, Any]:
    """Mean BERTScore precision/recall/F1 (0-1) with a local encoder folder.

    A reference may be a list (bert-score keeps the best-matching one). A row whose
    prediction or references are empty scores 0: there is no token to match.
    """
    import bert_score

    from tunelab.hardware import apply_threads

    apply_threads()  # the encoder runs in fp32 on the CPU, as hardware.inference_dtype("auto") decides there
    folder = _encoder_folder(model or DEFAULT_BERTSCORE_MODEL)
    depth = _num_layers(folder)
    if layer is None:
        layer = DEFAULT_BERTSCORE_LAYER if model in (None, DEFAULT_BERTSCORE_MODEL) else max(1, depth // 2)
    if not 1 <= layer <= max(depth, 1):
        raise TunelabError(f"bertscore_layer: {layer} is outside 1..{depth} for {folder}")
    refs: list[Any] = [[str(r) for r in ref] if isinstance(ref, (list, tuple)) else str(ref) for ref in references]
    if any(isinstance(ref, list) for ref in refs):  # bert-score wants all rows alike
        refs = [ref if isinstance(ref, list) else [ref] for ref in refs]
    keep = [i for i, p in enumerate(predictions)
            if str(p).strip() and any(str(r).strip() for r in (refs[i] if isinstance(refs[i], list) else [refs[i]]))]
    p_sum = r_sum = f_sum = 0.0
    if keep:
        scorer = bert_score.BERTScorer(model_type=folder, num_layers=layer, batch_size=batch_size,
                                       device="cpu", use_fast_tokenizer=True)
        _bert_like(scorer._tokenizer, scorer._model)
        p, r, f = scorer.score([str(predictions[i]) for i in keep], [refs[i] for i in keep],
                               batch_size=batch_size)
        p_sum, r_sum, f_sum = float(p.sum()), float(r.sum()), float(f.sum())
    n = len(predictions) or 1
    return {"bertscore_p": p_sum / n, "bertscore_r": r_sum / n, "bertscore_f1": f_sum / n,
            "bertscore_model": model or DEFAULT_BERTSCORE_MODEL, "bertscore_layer": layer}


def _example(tokenizer, reference: str, prompt: Any) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where not scored) for one reference."""
    from tunelab.data import Conversation, encode

    if prompt is None:  # the reference alone: every token after the first is predicted
        ids = list(tokenizer(reference)["input_ids"])
        return ids, [-100] + ids[1:]
    if isinstance(prompt, str):  # raw-text prompt: continue it with the reference
        head = list(tokenizer(prompt)["input_ids"])
        tail = list(tokenizer(reference, add_special_tokens=False)["input_ids"])
        return head + tail, [-100] * len(head) + tail
    conv = Conversation.from_openai(list(prompt) + [{"role": "assistant", "content": reference}])
    encoded = encode(tokenizer, conv, cutoff_len=10**9, mask_history=True)
    if encoded is None:
        raise TunelabError("perplexity: the reference has no tokens once rendered")
    return encoded["input_ids"], encoded["labels"]


def _batch_nll(model, chunk: list[tuple[list[int], list[int]]], pad: int) -> tuple[float, int]:
    """Summed NLL and count of the scored tokens of one batch.

    Rows are left-padded so every answer ends at the last position; logits are then
    needed only for the last ``keep`` positions (``logits_to_keep``), which bounds the
    (batch x positions x vocabulary) logits tensor by the answers, not the prompts.
    Position ids follow the mask, so padding changes nothing.
    """
    import torch

    width = max(len(ids) for ids, _ in chunk)
    first = [next((i for i, t in enumerate(lab) if t != -100), len(lab)) for _, lab in chunk]
    keep = min(width, max(len(ids) - f + 1 for (ids, _), f in zip(chunk, first)))
    device = getattr(model, "device", torch.device("cpu"))
    ids = torch.tensor([[pad] * (width - len(i)) + i for i, _ in chunk], device=device)
    labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in chunk], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep).logits
        except TypeError:  # architectures without logits_to_keep
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logits = logits[:, -keep:].float()
    # logits at position t predict token t+1
    targets = labels[:, width - keep + 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return float(nll), int((targets != -100).sum())


def perplexity(model, tokenizer, references: list[str], prompts: list[Any] | None = None,
               batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of the references under ``model``: exp(total NLL / scored tokens).

    With chat prompts the reference is rendered as the assistant's answer with the chat
    template and only its tokens (plus the end-of-turn marker) are scored, i.e. the
    model's surprise at the right answer given the question; with string prompts the
    reference continues the prompt; without prompts the reference is scored alone.
    Token-weighted over the corpus (a long answer counts more than a short one).
    """
    prompts = list(prompts) if prompts is not None else [None] * len(references)
    examples = [_example(tokenizer, str(r), p) for r, p in zip(references, prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        nll, tokens = _batch_nll(model, examples[start:start + batch_size], pad)
        total_nll, total_tokens = total_nll + nll, total_tokens + tokens
    if total_tokens == 0:
        return {"perplexity": "unavailable: no reference tokens to score", "perplexity_tokens": 0}
    return {"perplexity": math.exp(total_nll / total_tokens), "perplexity_tokens": total_tokens,
            "nll_per_token": total_nll / total_tokens}
