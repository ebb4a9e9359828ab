"""The baseline: seed 003's fine-tuning recipe written plainly with transformers.

Its shape, kept as the seed writes it: the tokenizer loaded with left padding; each
alpaca row rendered twice with ``apply_chat_template`` (prompt with the generation
prompt, then prompt + answer) and the prompt's labels set to -100; a
``datasets.Dataset`` mapped with that function; ``DataCollatorForSeq2Seq``;
``Seq2SeqTrainingArguments`` with batch 1 × gradient accumulation 8, lr 1e-4, bf16,
no checkpoints; ``Seq2SeqTrainer``. The seed trains every weight; the LoRA variant
adds the usual ``peft`` wrapper (r 8, alpha 16, dropout 0.05, all linear layers).

Two adaptations to this machine, applied to tunelab too: the weights load in fp32
(bf16 is autocast, as ``bf16=True`` does on CPU) and ``max_steps`` bounds the run.

The benchmark also runs the recipe's best honest variants (``bf16`` and
``batch_size`` below): fp32 where this CPU measured bf16 slow (``bf16=True`` there is
~100x slower), and batch 8 × accumulation 1, which ``DataCollatorForSeq2Seq`` pads
dynamically to the longest row of each batch. The defaults are the seed's recipe.
"""

from __future__ import annotations

import json
from pathlib import Path


def preprocess_example(tokenizer, example: dict) -> dict:
    """Seed 003's tokenisation: the whole chat as input, the prompt part of labels -100."""
    messages = [{"role": "user", "content": example["instruction"]}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    messages = [{"role": "user", "content": example["instruction"]},
                {"role": "assistant", "content": example["output"]}]
    label_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                              tokenize=True, return_dict=False)
    prompt_length = len(prompt_ids)
    input_ids = list(label_ids)
    label_ids = list(label_ids)
    label_ids[:prompt_length] = [-100] * prompt_length
    return {"input_ids": input_ids, "labels": label_ids}


def load_rows(data_file: str | Path) -> list[dict]:
    with open(data_file, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_trainer(model_path: str, data_file: str | Path, method: str, max_steps: int,
                  output_dir: str | Path, callbacks: list | None = None, seed: int = 42,
                  bf16: bool = True, batch_size: int = 1, examples_per_step: int = 8):
    """A ready ``Seq2SeqTrainer`` for the plain recipe (``method``: ``lora`` or ``full``).

    ``batch_size`` examples per micro-batch, gradient accumulation up to
    ``examples_per_step``; ``bf16`` as ``Seq2SeqTrainingArguments(bf16=...)``.
    """
    if batch_size < 1 or examples_per_step % batch_size:
        raise ValueError(f"plain recipe: batch {batch_size} does not divide {examples_per_step} examples per step")
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed)

    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        model.print_trainable_parameters()
    elif method != "full":
        raise ValueError(f"plain recipe: unknown method {method!r} (lora or full)")

    dataset = Dataset.from_list(load_rows(data_file))
    processed = dataset.map(lambda ex: preprocess_example(tokenizer, ex),
                            remove_columns=list(dataset[0].keys()))
    data_collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir), save_strategy="no", num_train_epochs=2.0,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=examples_per_step // batch_size,
        learning_rate=1e-4, logging_steps=100, bf16=bf16, max_steps=max_steps, report_to="none", seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    return Seq2SeqTrainer(model=model, args=training_args, train_dataset=processed,
                          data_collator=data_collator, processing_class=tokenizer,
                          callbacks=callbacks or [])
