"""BERTScore and perplexity with a tiny random Llama, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.eval.metrics_model import _example, bertscore, perplexity


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_llama, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-encoder")
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


def _hand_bertscore(folder: str, layer: int, cand: str, ref: str) -> tuple[float, float, float]:
    """Greedy cosine matching on layer-``layer`` states (final norm applied, as bert-score's
    truncated model returns them); bos/eos frame each sentence and carry no weight."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def states(text):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        h = model.norm(out.hidden_states[layer])[0]
        return torch.nn.functional.normalize(h, dim=-1)

    c, r = states(cand), states(ref)
    sim = c @ r.T
    p = sim.max(dim=1).values[1:-1].mean().item()  # every candidate token but the frame
    rec = sim.max(dim=0).values[1:-1].mean().item()
    return p, rec, 2 * p * rec / (p + rec)


@pytest.mark.parametrize("cand, ref", [("The patient has a fever.", "Drink water and rest."),
                                       ("孕妇感冒发烧", "可以物理降温,多喝水。")])
def test_bertscore_matches_hand_computation(tiny_folder, cand, ref):
    result = bertscore([cand], [ref], model=tiny_folder, layer=1)
    p, r, f = _hand_bertscore(tiny_folder, 1, cand, ref)
    assert result["bertscore_p"] == pytest.approx(p, abs=1e-5)
    assert result["bertscore_r"] == pytest.approx(r, abs=1e-5)
    assert result["bertscore_f1"] == pytest.approx(f, abs=1e-5)
    assert result["bertscore_layer"] == 1


def test_bertscore_short_answers_empty_rows_and_multiple_references(tiny_folder):
    # "你好" is 2 tokens: bert-score alone would take it for an empty [CLS][SEP] sentence
    result = bertscore(["你好", "", "Hello"], ["你好", "anything", ["Hi", "Hello"]], model=tiny_folder, layer=2)
    # rows 1 and 3 match a reference exactly (F1 = 1), row 2 is empty (0): mean 2/3
    assert result["bertscore_f1"] == pytest.approx(2 / 3, abs=1e-5)
    assert result["bertscore_p"] == pytest.approx(2 / 3, abs=1e-5)


def test_bertscore_rejects_bad_encoder_and_layer(tiny_folder, tmp_path):
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="needs a local model folder"):
        bertscore(["a"], ["a"], model=str(tmp_path))
    with pytest.raises(TunelabError, match="outside 1..2"):
        bertscore(["a"], ["a"], model=tiny_folder, layer=5)


def test_perplexity_scores_only_the_answer_and_matches_the_model_loss(tiny_llama, tiny_tokenizer):
    prompt = [{"role": "user", "content": "I have a fever"}]
    ids, labels = _example(tiny_tokenizer, "Drink water and rest.", prompt)
    scored = [t for t in labels if t != -100]
    assert tiny_tokenizer.decode(scored) == "Drink water and rest.<|im_end|>"
    with torch.no_grad():
        loss = tiny_llama(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
    result = perplexity(tiny_llama, tiny_tokenizer, ["Drink water and rest."], [prompt])
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result["perplexity_tokens"] == len(scored)


def test_perplexity_is_token_weighted_and_independent_of_batching(tiny_llama, tiny_tokenizer):
    refs = ["Drink water and rest.", "多喝水,注意休息。", "Paris."]
    prompts = [[{"role": "user", "content": q}] for q in ("fever?", "感冒怎么办", "capital of France?")]
    one = perplexity(tiny_llama, tiny_tokenizer, refs, prompts, batch_size=1)
    three = perplexity(tiny_llama, tiny_tokenizer, refs, prompts, batch_size=3)
    assert one["perplexity"] == pytest.approx(three["perplexity"], rel=1e-4)  # right padding is masked
    # token-weighted: exp of the summed NLL over all scored tokens
    total, count = 0.0, 0
    for ref, prompt in zip(refs, prompts):
        ids, labels = _example(tiny_tokenizer, ref, prompt)
        with torch.no_grad():
            loss = tiny_llama(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        n = sum(t != -100 for t in labels[1:])
        total, count = total + loss * n, count + n
    assert one["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


def test_perplexity_of_plain_text_and_raw_prompts(tiny_llama, tiny_tokenizer):
    ids = tiny_tokenizer("Drink water and rest.")["input_ids"]
    with torch.no_grad():
        loss = tiny_llama(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    alone = perplexity(tiny_llama, tiny_tokenizer, ["Drink water and rest."])
    assert alone["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    continued = perplexity(tiny_llama, tiny_tokenizer, [" Paris."], ["Q: capital of France?\nA:"])
    assert continued["perplexity_tokens"] == len(tiny_tokenizer(" Paris.", add_special_tokens=False)["input_ids"])


@pytest.mark.slow
def test_bertscore_default_encoder_is_the_builtin_model():
    result = bertscore(["The patient should drink water and rest.", "The capital of France is Paris."],
                       ["Drink plenty of water and rest.", "Paris is the capital of France."])
    unrelated = bertscore(["The capital of France is Paris."], ["Drink plenty of water and rest."])
    assert result["bertscore_model"] == "builtin:smollm2-135m-instruct" and result["bertscore_layer"] == 9
    assert result["bertscore_f1"] > unrelated["bertscore_f1"]
