"""Answers from a vision-language model, and ``tunelab chat RUN --image PATH``.

``answer(model, tokenizer, conversation, settings)`` goes through the shared generation core
(``tunelab.generation.generate_ids``) like a text answer: the conversation is rendered with its
image spans expanded exactly as in training (``VisionLanguageModel.encode_prompt``), and the
settings (greedy, sampling or beam search; min/max new tokens, repetition penalty, no-repeat
n-gram size, stop strings, the tokenizer's real end-of-sequence) reach ``generate``.

In the chat, ``/image PATH`` attaches an image to the next message (``--image`` to the
first); answers stream as they are generated (beam search prints them whole).
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from tunelab.data.conversation import Conversation, ImagePart, Message, TextPart
from tunelab.errors import TunelabError
from tunelab.generation import FALLBACK_REPLY, GenerationSettings, check_context, generate_ids

HELP = "commands: exit | quit | clear | /image PATH (attach to the next message) | /system TEXT"


def answer(model, tokenizer, conv: Conversation, settings: GenerationSettings | None = None,
           dataset_dir: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The model's answer to ``conv`` (a trailing assistant message is left out of the prompt).

    ``on_text(piece)`` gets the answer as it is generated (not with beam search)."""
    settings = settings or GenerationSettings()
    ids, spans = model.encode_prompt(tokenizer, conv, dataset_dir)
    check_context(model, len(ids), settings.max_new_tokens)
    stream = None if on_text is None or settings.num_beams > 1 else (lambda _row, piece: on_text(piece))
    (result,) = generate_ids(model, tokenizer, [ids], settings, images=[spans], on_text=stream)
    if on_text is not None and stream is None:
        on_text(result.text)
    return result.text.strip()


def chat_loop(model, tokenizer, settings: GenerationSettings | None = None, system: str | None = None,
              images: list[str] | None = None, input: TextIO | None = None,
              output: TextIO | None = None) -> list[Message]:
    """A terminal conversation with images; returns the user/assistant messages.

    ``input``/``output`` default to the process's stdin/stdout as they are at call time."""
    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
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
        shown: list[str] = []

        def show(piece: str) -> None:
            shown.append(piece)
            output.write(piece)
            output.flush()

        try:
            reply = answer(model, tokenizer, Conversation(head + history + [user], "chat"), settings, on_text=show)
        except TunelabError as exc:  # a missing image, say: report it and keep the session
            output.write(f"{chr(10) if shown else ''}(error: {exc})\n")
            continue
        pending = []
        if not reply:
            reply = FALLBACK_REPLY
            output.write(reply)
        output.write("\n")
        output.flush()
        history += [user, Message("assistant", [TextPart(reply)])]
    return history


def run_chat(run: str, settings: GenerationSettings, system: str | None = None, images: list[str] | None = None) -> None:
    from tunelab.vision.compose import load_vlm

    print(f"loading {run} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_vlm(run)
    chat_loop(model, tokenizer, settings, system, images)
