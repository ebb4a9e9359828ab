"""Answers from a vision-language model, and ``tunelab chat RUN --image PATH``.

``answer(model, tokenizer, conversation, settings)`` renders the conversation with its image
spans expanded exactly as in training, encodes the images, and generates from the spliced
embeddings with the shared generation settings (greedy, sampling or beam search; min/max new
tokens, repetition penalty and stop strings reach ``generate``).

In the chat, ``/image PATH`` attaches an image to the next message (``--image`` to the
first); answers are printed whole (no streaming from embeddings yet).
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from tunelab.data.conversation import Conversation, ImagePart, Message, TextPart
from tunelab.errors import TunelabError
from tunelab.generation import FALLBACK_REPLY, GenerationSettings, _generation_kwargs, eos_token_ids
from tunelab.stops import cut_at_stop, template_stops

HELP = "commands: exit | quit | clear | /image PATH (attach to the next message) | /system TEXT"


def answer(model, tokenizer, conv: Conversation, settings: GenerationSettings | None = None,
           dataset_dir: str | None = None) -> str:
    """The model's answer to ``conv`` (a trailing assistant message is left out of the prompt)."""
    from tunelab.data.images import image_spans, resolve_image
    from tunelab.data.render import prompt_ids
    from tunelab.vision.data import pixel_batch

    settings = settings or GenerationSettings()
    vcfg = model.vision_cfg
    grouped, spans = image_spans(conv, vcfg.multi_image == "mean", vcfg.image_token)
    paths = [[resolve_image(ref, conv, dataset_dir) for ref in span] for span in spans]
    ids = prompt_ids(tokenizer, grouped, image_token=vcfg.image_token * model.tokens_per_image)
    pixels, groups = pixel_batch([paths], model.tower.preprocess)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = _generation_kwargs(settings, settings.max_new_tokens, pad, eos_token_ids(model.llm, tokenizer))
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    out = model.generate(torch.tensor([ids]), pixel_values=pixels, image_groups=groups, **kwargs)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    text, _ = cut_at_stop(text, tuple(settings.stop) + tuple(template_stops(tokenizer)))
    return text.strip()


def chat_loop(model, tokenizer, settings: GenerationSettings | None = None, system: str | None = None,
              images: list[str] | None = None, input: TextIO = sys.stdin, output: TextIO = sys.stdout) -> list[Message]:
    """A terminal conversation with images; returns the user/assistant messages."""
    history: list[Message] = []
    pending = list(images or [])
    if input.isatty():
        output.write(f"chatting with a vision-language model; {HELP}\n")
    for line in input:
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command.lower() in ("exit", "quit"):
            break
        if command.lower() == "clear":
            history, pending = [], []
            output.write("(history cleared)\n")
            continue
        if command.startswith("/image"):
            pending.append(command[len("/image"):].strip())
            output.write(f"(image attached to the next message: {pending[-1]})\n")
            continue
        if command.startswith("/system"):
            system = command[len("/system"):].strip() or None
            output.write(f"(system prompt {'set' if system else 'removed'})\n")
            continue
        user = Message("user", [ImagePart(p) for p in pending] + [TextPart(text)])
        head = [Message("system", [TextPart(system)])] if system else []
        try:
            reply = answer(model, tokenizer, Conversation(head + history + [user], "chat"), settings)
        except TunelabError as exc:  # a missing image, say: report it and keep the session
            output.write(f"(error: {exc})\n")
            continue
        pending = []
        reply = reply or FALLBACK_REPLY
        output.write(f"{reply}\n")
        output.flush()
        history += [user, Message("assistant", [TextPart(reply)])]
    return history


def run_chat(run: str, settings: GenerationSettings, system: str | None = None, images: list[str] | None = None) -> None:
    from tunelab.vision.compose import load_vlm

    print(f"loading {run} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_vlm(run)
    chat_loop(model, tokenizer, settings, system, images)
