"""The ``pt`` stage: continued pre-training on raw domain text.

Each document is tokenised without a chat template, framed by the tokenizer's bos (when
the tokenizer adds one) and an end-of-document token (eos), and cut into pieces of at
most ``cutoff_len`` tokens. The pieces are then packed by the SFT packing rules
(``tunelab.train.collate.pack_examples``): position ids restart for every piece, so no
token attends to another document, and the first token of a piece is never a target.
Every other token carries loss, the eos included, so the model learns where a
document ends. The loss and the trainer are SFT's: only the examples differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tunelab.config import RunConfig
from tunelab.data.text import Document
from tunelab.errors import TunelabError


@dataclass
class TextStats:
    documents: int = 0
    tokens: int = 0
    pieces: int = 0
    split_documents: int = 0

    def summary(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens in {self.pieces} pieces "
                f"({self.split_documents} documents longer than cutoff_len were cut)")


def document_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one document: [bos] + text + eos."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is None:
        raise TunelabError("the tokenizer has no eos token to end documents with (train.stage=pt)")
    return [*ids, tokenizer.eos_token_id]


def encode_documents(tokenizer: Any, docs: Sequence[Document], cutoff_len: int) -> tuple[list[dict], TextStats]:
    """Examples (``input_ids``, ``labels`` = the same ids) of at most ``cutoff_len`` tokens."""
    stats = TextStats()
    examples = []
    for doc in docs:
        ids = document_ids(tokenizer, doc.text)
        stats.documents += 1
        stats.tokens += len(ids)
        stats.split_documents += len(ids) > cutoff_len
        for start in range(0, len(ids), cutoff_len):
            piece = ids[start:start + cutoff_len]
            if len(piece) < 2:  # a lone token predicts nothing
                continue
            examples.append({"input_ids": piece, "labels": list(piece), "source": doc.source})
            stats.pieces += 1
    return examples, stats


def build_examples(cfg: RunConfig, tokenizer: Any) -> tuple[list[dict], list[dict], str]:
    """Read, split (by document, before cutting) and encode the raw text of ``cfg.data``."""
    from tunelab.data.text import load_documents
    from tunelab.train.run import _split

    d = cfg.data
    if not d.train:
        raise TunelabError("data.train: no training text given (a .txt file, a folder, or a table with a text column)")
    docs = load_documents(d.train, d.dataset_dir, d.max_samples, cfg.train.seed)
    if not docs:
        raise TunelabError(f"data.train: {', '.join(d.train)}: no non-empty documents")
    train_docs, eval_docs = _split(docs, d.val_size, cfg.train.seed)
    if d.eval:
        eval_docs = eval_docs + load_documents(d.eval, d.dataset_dir, d.max_samples, cfg.train.seed)
    train_ex, stats = encode_documents(tokenizer, train_docs, d.cutoff_len)
    eval_ex, _ = encode_documents(tokenizer, eval_docs, d.cutoff_len)
    return train_ex, eval_ex, stats.summary()


def check(cfg: RunConfig) -> None:
    """Packed documents and virtual tokens do not mix: refuse before any load."""
    if cfg.method.name in ("prefix", "prompt"):
        raise TunelabError(f"method.name: {cfg.method.name} cannot train the pt stage (its virtual tokens would "
                           "sit before a whole packed row, not before each document); use lora, freeze or full")


def to_dataset(examples: list[dict], cfg: RunConfig, train: bool):
    """Packed rows, for training and evaluation alike (the packed loss equals the unpacked one)."""
    from tunelab.train.run import to_dataset as rows_dataset

    return rows_dataset(examples, True, cfg.data.cutoff_len)


def text_perplexity(model: Any, tokenizer: Any, docs: Sequence[Document], cutoff_len: int = 1024,
                    batch_size: int = 8) -> tuple[float, int]:
    """(perplexity, scored tokens) of ``model`` on raw documents, encoded and packed as for ``pt``.

    The number a ``pt`` run's ``exp(eval_loss)`` estimates, for any model (the base one too).
    """
    import math

    import torch

    from tunelab.train.collate import IGNORE, SFTCollator, pack_examples
    from tunelab.train.trainer import sft_loss

    rows = pack_examples(encode_documents(tokenizer, docs, cutoff_len)[0], cutoff_len)
    if not rows:
        raise TunelabError("perplexity: no document has two or more tokens")
    collate = SFTCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += sft_loss(model, batch).item() * n  # the mean over this batch's n tokens
            count += n
    return math.exp(total / count), count
