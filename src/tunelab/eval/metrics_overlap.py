"""N-gram overlap metrics: BLEU (sacrebleu), ROUGE (rouge-score), METEOR (nltk), CIDEr-D.

A reference may be one string or a list of strings (several acceptable answers).
Language is detected once per corpus (``detect_lang``) so predictions and references
are always tokenised the same way:

- ``en``: BLEU uses sacrebleu's ``13a``; ROUGE its own tokenizer; METEOR and CIDEr
  lower-cased word tokens (``\\w+``, punctuation dropped, as COCO's PTB step does);
- ``zh``: BLEU uses sacrebleu's ``zh`` (one token per CJK character); ROUGE, METEOR and
  CIDEr use jieba words, lower-cased, punctuation and spaces dropped. rouge-score's own
  tokenizer would drop every CJK character and score Chinese 0.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from collections import Counter
from typing import Any

import numpy as np

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_WORD = re.compile(r"\w+", re.UNICODE)


def _ref_lists(references: list[Any]) -> list[list[str]]:
    return [[str(r) for r in ref] if isinstance(ref, (list, tuple)) else [str(ref)] for ref in references]


def detect_lang(texts: list[Any]) -> str:
    """``zh`` when any text contains CJK characters, else ``en``."""
    return "zh" if any(_CJK.search(t) for refs in _ref_lists(texts) for t in refs) else "en"


def tokenize(text: str, lang: str) -> list[str]:
    """Word tokens for ROUGE/METEOR/CIDEr: NFKC, lower-cased, no punctuation or spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    if lang != "zh":
        return _WORD.findall(text)
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict" chatter goes to stderr
    return [w for w in (t.strip() for t in jieba.lcut(text)) if w and _WORD.search(w)]


class _RougeTokenizer:
    """rouge-score's tokenizer interface (an object with ``tokenize``) over ``tokenize``."""

    def __init__(self, lang: str):
        self.lang = lang

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.lang)


def bleu(predictions: list[str], references: list[Any], lang: str | None = None) -> dict[str, Any]:
    """Corpus BLEU-1..4 with sacrebleu, on its 0-100 scale.

    BLEU-n is sacrebleu's corpus BLEU with ``max_ngram_order=n`` (geometric mean of the
    1..n-gram precisions times the brevity penalty); ``bleu`` is BLEU-4. Rows with fewer
    references get ``None`` in the missing reference streams, as sacrebleu expects.
    """
    from sacrebleu.metrics import BLEU

    refs = _ref_lists(references)
    lang = lang or detect_lang(references)
    width = max((len(r) for r in refs), default=1)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    tokenizer = "zh" if lang == "zh" else "13a"
    out: dict[str, Any] = {}
    for n in range(1, 5):
        out[f"bleu{n}"] = BLEU(tokenize=tokenizer, max_ngram_order=n).corpus_score(
            list(predictions), streams).score
    out["bleu"] = out["bleu4"]
    out["bleu_tokenizer"] = tokenizer
    return out


def rouge(predictions: list[str], references: list[Any], lang: str | None = None) -> dict[str, Any]:
    """Mean ROUGE-1/2/L F-measure over rows (rouge-score; best reference per row).

    English uses rouge-score's default tokenizer (no stemming); Chinese uses jieba.
    """
    from rouge_score import rouge_scorer

    lang = lang or detect_lang(references)
    kinds = ["rouge1", "rouge2", "rougeL"]
    tokenizer = _RougeTokenizer("zh") if lang == "zh" else None
    scorer = rouge_scorer.RougeScorer(kinds, tokenizer=tokenizer)
    sums = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, _ref_lists(references)):
        result = scorer.score_multi(refs, pred)
        for kind in kinds:
            sums[kind] += result[kind].fmeasure
    n = len(predictions) or 1
    return {kind: total / n for kind, total in sums.items()}


def meteor(predictions: list[str], references: list[Any], lang: str | None = None) -> dict[str, Any]:
    """Mean sentence METEOR (nltk ``meteor_score``: exact, Porter-stem and WordNet
    synonym matches; alpha 0.9, beta 3, gamma 0.5).

    Needs WordNet (see ``tunelab.eval.wordnet``); without it the value is the string
    ``"unavailable: <reason>"``, never a number.
    """
    from tunelab.eval.wordnet import use_wordnet

    reason = use_wordnet()
    if reason:
        return {"meteor": f"unavailable: {reason}"}
    from nltk.translate.meteor_score import meteor_score

    lang = lang or detect_lang(references)
    total = 0.0
    for pred, refs in zip(predictions, _ref_lists(references)):
        total += meteor_score([tokenize(r, lang) for r in refs], tokenize(pred, lang))
    return {"meteor": total / (len(predictions) or 1)}


def _ngrams(tokens: list[str], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tfidf(counts: Counter, doc_freq: Counter, log_docs: float, n: int) -> tuple[list[dict], np.ndarray, int]:
    """Per n-gram order: {ngram: tf * idf}, the vector norms, and the length term."""
    vecs: list[dict] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
    norms = np.array([math.sqrt(sum(v * v for v in vec.values())) for vec in vecs])
    # COCO's reference code counts bigrams as the "length" in the Gaussian penalty.
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def cider_d(predictions: list[str], references: list[Any], lang: str | None = None,
            n: int = 4, sigma: float = 6.0) -> dict[str, Any]:
    """CIDEr-D as in the COCO caption evaluation code (``pycocoevalcap`` Cider).

    For each order k = 1..n, each sentence is a TF-IDF vector over its k-grams; IDF is
    ``log(#rows) - log(max(1, df))`` with df = number of rows whose references contain
    the k-gram. The score for a row is 10 x the mean over k and over references of
    ``sum(min(h, r) * r) / (|h| |r|) * exp(-(len_h - len_r)^2 / (2 sigma^2))`` (clipped
    candidate counts and a Gaussian length penalty: the "-D" part). The corpus CIDEr-D
    is the mean over rows. With a single row every IDF is 0, so is the score.
    """
    lang = lang or detect_lang(references)
    hyps = [_ngrams(tokenize(p, lang), n) for p in predictions]
    refs = [[_ngrams(tokenize(r, lang), n) for r in rs] for rs in _ref_lists(references)]
    doc_freq: Counter = Counter()
    for row in refs:
        doc_freq.update({gram for counts in row for gram in counts})
    log_docs = math.log(float(len(refs))) if refs else 0.0
    scores = []
    for hyp, row in zip(hyps, refs):
        vec_h, norm_h, len_h = _tfidf(hyp, doc_freq, log_docs, n)
        total = np.zeros(n)
        for ref in row:
            vec_r, norm_r, len_r = _tfidf(ref, doc_freq, log_docs, n)
            overlap = np.array([sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0)
                                    for g, v in vec_h[k].items()) for k in range(n)], dtype=float)
            denom = norm_h * norm_r
            overlap = np.divide(overlap, denom, out=overlap, where=denom != 0)
            total += overlap * math.exp(-((len_h - len_r) ** 2) / (2 * sigma ** 2))
        scores.append(10.0 * total.mean() / max(1, len(row)))
    return {"cider": float(np.mean(scores)) if scores else 0.0}
