"""A Hugging Face tokenizer as GGUF tokenizer metadata, the way llama.cpp reads it.

llama.cpp's own converter recognises a BPE tokenizer by hashing how it encodes a test
string and refuses any hash it does not know (every tokenizer trained for a small domain
model). Here the pre-tokenizer is read from ``tokenizer.json`` itself and mapped to the
llama.cpp name that splits text the same way; anything without a known equivalent is
refused in one line instead of being written with a guess that tokenizes differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tunelab.errors import TunelabError

# llama.cpp's pre-tokenizer names for the split rules it implements (llama-vocab.cpp).
GPT2 = "gpt-2"  # llama.cpp refuses "gpt2" here: it must be spelled "gpt-2"
SMOLLM = "smollm"  # single digits isolated, then the GPT-2 rule


@dataclass
class Vocab:
    """Everything ``tokenizer.*`` in a GGUF file says."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _split_regexes() -> dict[str, str]:
    """Regex of a ``Split`` pre-tokenizer -> llama.cpp name (the table transformers' GGUF loader reads back)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    return {QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _describe(pre: dict | None) -> str:
    if pre is None:
        return "none"
    if pre.get("type") == "Sequence":
        return "[" + ", ".join(_describe(p) for p in pre.get("pretokenizers", [])) + "]"
    return str(pre.get("type"))


def pre_tokenizer_name(pre: dict | None, source: str) -> str:
    """The llama.cpp pre-tokenizer name for a ``tokenizer.json`` ``pre_tokenizer`` entry."""
    items = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in items]
    if kinds and kinds[-1] == "ByteLevel" and not items[-1].get("add_prefix_space", False):
        regex = items[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2
        if kinds == ["Digits", "ByteLevel"] and regex and items[0].get("individual_digits"):
            return SMOLLM
        if kinds == ["Split", "ByteLevel"] and not regex and items[0].get("behavior") == "Isolated" \
                and not items[0].get("invert"):
            name = _split_regexes().get((items[0].get("pattern") or {}).get("Regex"))
            if name:
                return name
    raise TunelabError(
        f"{source}: tokenizer.json pre_tokenizer {_describe(pre)} has no llama.cpp equivalent tunelab knows "
        "(supported: GPT-2 byte-level, SmolLM digits + byte-level, the Qwen2 and Llama-3 split rules)")


def build_vocab(tokenizer, n_vocab: int, source: str) -> Vocab:
    """Read ``tokenizer`` (a fast HF tokenizer) into GGUF metadata for an ``n_vocab``-row embedding."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(f"{source}: GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "sentencepiece-style BPE (byte_fallback)" if model.get("byte_fallback") else model.get("type")
        raise TunelabError(f"{source}: GGUF export supports byte-level BPE tokenizers; this one is {kind}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), source)
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise TunelabError(f"{source}: tokenizer normalizer {normalizer.get('type')} has no llama.cpp equivalent")
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise TunelabError(f"{source}: tokenizer has {len(vocab)} tokens but the model's embedding only {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(TokenType.CONTROL if added[i]["special"] else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (Qwen2 pads to a multiple of 128)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(ids) > len(plain)
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return Vocab("gpt2", pre, tokens, [int(t) for t in types], merges,
                 {k: v for k, v in special.items() if v is not None},
                 add_bos=extra and ids[0] == tokenizer.bos_token_id,
                 add_eos=extra and ids[-1] == tokenizer.eos_token_id, chat_template=template)


def write_vocab(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{name}_token_id")(int(token_id))
    writer.add_add_bos_token(bool(vocab.add_bos))
    writer.add_add_eos_token(bool(vocab.add_eos))
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
