"""The export check: fixed probe prompts through the source and the exported result.

A merge that silently ships the base weights (LLaMA-Factory #9051) or loses accuracy
(ms-swift #5430), or a GGUF whose quantization or tokenizer went wrong, all answer the
probes differently from the source. So every export runs them:

- ``fingerprint(model, tokenizer)``: the probes' token ids, the source's greedy answers
  (``max_new_tokens`` each) and its logits at the last prompt position;
- ``compare(reference, ...)``: the result's own greedy answers (how many are identical)
  and its **top-1 agreement**: fed the source's answers (teacher forcing), how often its
  most likely next token is the one the source chose;
- ``TOLERANCE``: the agreement each export type must reach, else the export is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "system", "content": "You are a helpful medical assistant."},
     {"role": "user", "content": "What should I do about a mild fever?"}],
    [{"role": "user", "content": "Normalise this clinical term: acute appendicitis NOS"}],
    [{"role": "user", "content": "孕妇感冒发烧38度应该怎么办?"}],
    [{"role": "user", "content": "List three colours, separated by commas."}],
]
"""Fixed prompts: English and Chinese, general and medical (chat template applied)."""
RAW_PROBES = ["The capital of France is", "Once upon a time", "The patient has a fever and",
              "孕妇感冒发烧", "1, 2, 3, 4,", "def add(a, b):"]
"""The same idea for tokenizers without a chat template."""

TOLERANCE = {"merge": 0.98, "f32": 0.98, "f16": 0.97, "bf16": 0.95, "q8_0": 0.90,
             "q5_0": 0.80, "q4_1": 0.75, "q4_0": 0.70}
"""Minimum top-1 agreement with the source. Measured on SmolLM2-135M in llama.cpp: F16
99.7%, BF16 98.9%, Q8_0 94.3% (docs/deploy.md); the limits leave room for other models."""
IDENTICAL_LOGITS = 1e-6
"""A tuned model whose probe logits differ from its base by less than this is the base."""


@dataclass
class Fingerprint:
    prompts: list[list[int]]
    answers: list[list[int]]
    last_logits: list[list[float]] = field(default_factory=list, repr=False)

    def truncated(self, tokens: int) -> "Fingerprint":
        """The fingerprint ``tokens`` greedy tokens would have given: a greedy answer's first n
        tokens are the n-token greedy answer, so one long fingerprint serves shorter checks."""
        return Fingerprint(self.prompts, [a[:tokens] for a in self.answers], self.last_logits)


@dataclass
class Agreement:
    """How the result answered the probes compared with the source."""

    backend: str
    top1: float
    identical_answers: int
    prompts: int
    tokens: int
    max_logit_diff: float | None = None
    tolerance: float | None = None
    tokenizer_mismatch: int = 0
    """Probes the result's own tokenizer encodes differently (llama.cpp only)."""

    @property
    def ok(self) -> bool:
        return self.tolerance is None or (self.top1 >= self.tolerance and self.tokenizer_mismatch == 0)

    def line(self) -> str:
        text = (f"{self.backend}: top-1 agreement {100 * self.top1:.1f}% over {self.tokens} tokens, "
                f"{self.identical_answers}/{self.prompts} greedy answers identical")
        if self.max_logit_diff is not None:
            text += f", max |Δlogit| {self.max_logit_diff:.2e}"
        if self.tokenizer_mismatch:
            text += f", tokenizer differs on {self.tokenizer_mismatch} probes"
        if self.tolerance is not None:
            text += f" (needs ≥ {100 * self.tolerance:.0f}%: {'ok' if self.ok else 'FAILED'})"
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def probe_prompts(tokenizer) -> list[list[int]]:
    from tunelab.generation import render_prompt

    probes = PROBES if getattr(tokenizer, "chat_template", None) else RAW_PROBES
    return [render_prompt(tokenizer, p) for p in probes]


def stop_ids(model, tokenizer) -> list[int]:
    from tunelab.generation import eos_token_ids

    return sorted(eos_token_ids(model, tokenizer))


def _greedy(model, ids: list[int], max_new_tokens: int, stops: list[int]) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None,
                         pad_token_id=stops[0] if stops else 0)
    return out[0, len(ids):].tolist()


def forced_logits(model, prompt: list[int], answer: list[int]):
    """Logits for every answer position (and the last prompt one) given the source's answer."""
    import torch

    ids = torch.tensor([prompt + answer[:-1]]) if answer else torch.tensor([prompt])
    return model(input_ids=ids).logits[0, len(prompt) - 1:].float()


def fingerprint(model, tokenizer, max_new_tokens: int = 32, prompts: list[list[int]] | None = None,
                logits_only: bool = False) -> Fingerprint:
    import torch

    prompts = prompts or probe_prompts(tokenizer)
    stops = stop_ids(model, tokenizer)
    model.eval()
    with torch.inference_mode():
        answers = [[] if logits_only else _greedy(model, p, max_new_tokens, stops) for p in prompts]
        last = [model(input_ids=torch.tensor([p])).logits[0, -1].float().tolist() for p in prompts]
    return Fingerprint(prompts, answers, last)


def logit_distance(a: Fingerprint, b: Fingerprint) -> float:
    import torch

    return max(float((torch.tensor(x) - torch.tensor(y)).abs().max()) for x, y in zip(a.last_logits, b.last_logits))


def compare(reference: Fingerprint, model, backend: str, tolerance: float | None = None,
            stops: list[int] | None = None) -> Agreement:
    """Run ``model`` (transformers) on the reference's probes and count agreement."""
    import torch

    stops = stops or []
    agree = total = identical = 0
    diff = 0.0
    model.eval()
    with torch.inference_mode():
        for prompt, answer, last in zip(reference.prompts, reference.answers, reference.last_logits):
            if answer:
                logits = forced_logits(model, prompt, answer)
                agree += int((logits.argmax(-1) == torch.tensor(answer)).sum())
                total += len(answer)
                diff = max(diff, float((logits[0] - torch.tensor(last)).abs().max()))
            mine = _greedy(model, prompt, max(len(answer), 1), stops)
            identical += int(mine[:len(answer)] == answer)
    return Agreement(backend, agree / max(total, 1), identical, len(reference.prompts), total, diff, tolerance)


def _without_stop(tokens: list[int], stops: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in stops else tokens


def agreement_from_tokens(reference: Fingerprint, forced_top1: list[list[int]], greedy: list[list[int]],
                          backend: str, tolerance: float | None = None, tokenizer_mismatch: int = 0,
                          stops: list[int] | None = None, eog: list[int] | None = None) -> Agreement:
    """The same counts from another runtime's outputs (llama.cpp, whose generator ends at any token
    of its end-of-generation set without yielding it: ``eog[i]`` is where that set would have
    ended source answer i, and answers are compared up to there, without a final stop token)."""
    stops = list(stops or [])
    eog = list(eog or [-1] * len(reference.answers))
    agree = total = identical = 0
    for answer, top1, mine, end in zip(reference.answers, forced_top1, greedy, eog):
        agree += sum(int(a == b) for a, b in zip(answer, top1))
        total += len(answer)
        want = _without_stop(answer[:end] if end >= 0 else answer, stops)
        identical += int(_without_stop(list(mine), stops)[:len(want)] == want)
    return Agreement(backend, agree / max(total, 1), identical, len(reference.prompts), total, None, tolerance,
                     tokenizer_mismatch)
