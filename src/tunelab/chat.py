"""``tunelab chat MODEL_OR_RUN``: talk to a model in the terminal.

Multi-turn history, a system prompt (``--system`` or ``/system TEXT``), answers streamed
as they are generated, ``clear`` to forget, ``exit``/``quit`` to leave, Ctrl-C to stop
the current answer without leaving. When stdin is not a terminal it reads one message
per line and prints one answer per message, so sessions can be scripted.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tunelab.config import DEFAULT_MODEL
from tunelab.errors import TunelabError
from tunelab.models.gguf_runtime import QUANTIZE_TYPES
from tunelab.generation import (
    FALLBACK_REPLY,
    PRESETS,
    GenerationSettings,
    context_length,
    from_preset,
    render_prompt,
    stream,
)

EXIT_WORDS = ("exit", "quit")
HELP = "commands: exit | quit | clear | /system TEXT (empty TEXT removes it); Ctrl-C stops an answer"


class ChatSession:
    """History and system prompt of one conversation, trimmed to fit the model's context."""

    def __init__(self, model, tokenizer, settings: GenerationSettings, system: str | None = None):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.system = system or None
        self.history: list[dict[str, str]] = []

    def messages(self, user_text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> tuple[list[dict[str, str]] | None, int]:
        """Messages for this turn after dropping the oldest turns that overflow the context.

        Returns ``(messages, dropped_turns)``; messages is None when even the new
        message alone (with the system prompt) does not fit.
        """
        limit = context_length(self.model)
        dropped = 0
        while True:
            messages = self.messages(user_text)
            if limit is None or len(render_prompt(self.tokenizer, messages)) + self.settings.max_new_tokens <= limit:
                return messages, dropped
            if not self.history:
                return None, dropped
            del self.history[:2]  # one turn = the user message and its answer
            dropped += 1

    def remember(self, user_text: str, answer: str) -> None:
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]


def chat_loop(
    model,
    tokenizer,
    settings: GenerationSettings | None = None,
    system: str | None = None,
    input: TextIO | None = None,
    output: TextIO | None = None,
) -> ChatSession:
    """Run the conversation until ``exit``/``quit`` or end of input; returns the session.

    ``input``/``output`` default to the process's stdin/stdout as they are at call time."""
    input = sys.stdin if input is None else input
    output = sys.stdout if output is None else output
    session = ChatSession(model, tokenizer, settings or GenerationSettings(), system)
    if session.settings.num_beams > 1:
        raise TunelabError("chat streams its answers, which beam search cannot do: use num_beams=1")
    interactive = _isatty(input)
    if interactive:
        _say(output, f"chatting with the model; {HELP}")
    while True:
        line = _read(input, output, interactive)
        if line is None:
            break
        command = line.strip()
        if not command:
            continue
        if command.lower() in EXIT_WORDS:
            break
        if command.lower() == "clear":
            session.history.clear()
            _say(output, "(history cleared)")
            continue
        if command == "/system" or command.startswith("/system "):
            session.system = command[len("/system"):].strip() or None
            _say(output, f"(system prompt {'set' if session.system else 'removed'})")
            continue
        _answer(session, line, output, interactive)
    return session


def _read(input: TextIO, output: TextIO, interactive: bool) -> str | None:
    try:
        if interactive and input is sys.stdin:
            return _read_terminal()
        if interactive:
            output.write("User  >>> ")
            output.flush()
        line = input.readline()
    except (KeyboardInterrupt, EOFError):  # Ctrl-C or Ctrl-D at the prompt leaves
        output.write("\n")
        return None
    if not line:
        return None
    # Only the line ending goes: spaces are part of what the user said (seed 004 lost them).
    return line.rstrip("\r\n")


def _read_terminal() -> str:
    """One line from the terminal through ``input()``, with readline's editing and history."""
    import builtins

    try:
        import readline  # noqa: F401  (importing it is what turns editing on)
    except ImportError:  # Windows without pyreadline: plain input still works
        pass
    return builtins.input("User  >>> ")


def _answer(session: ChatSession, user_text: str, output: TextIO, interactive: bool) -> None:
    try:
        messages, dropped = session.fit(user_text)
    except TunelabError as exc:  # e.g. a template that rejects a system message: say so, keep the session
        _say(output, f"(error: {exc})")
        return
    if dropped:
        _say(output, f"(history trimmed: dropped the {dropped} oldest turn(s) to fit the model's context)")
    if messages is None:
        _say(output, "(message too long for the model's context; not sent)")
        return
    if interactive:
        output.write("Assistant >>> ")
    pieces = stream(session.model, session.tokenizer, messages, session.settings)
    shown: list[str] = []
    try:
        for piece in pieces:
            output.write(piece)
            output.flush()
            shown.append(piece)
    except KeyboardInterrupt:
        pieces.cancel()
        pieces.join()
        output.write(" (stopped)")
    answer = "".join(shown)
    if not answer.strip():
        output.write(FALLBACK_REPLY)
        answer = FALLBACK_REPLY
    output.write("\n")
    output.flush()
    session.remember(user_text, answer)


def _say(output: TextIO, text: str) -> None:
    output.write(text + "\n")
    output.flush()


def _isatty(stream_: TextIO) -> bool:
    try:
        return stream_.isatty()
    except (AttributeError, ValueError):
        return False


# Generation flags shared by ``tunelab chat`` and ``tunelab serve`` (the lowest CLI module owns them).


def add_generation_options(parser) -> None:
    """Add --preset, --max-new-tokens, --temperature ... to an argparse parser."""
    group = parser.add_argument_group("generation")
    group.add_argument("--preset", default="greedy", choices=sorted(PRESETS), help="starting settings")
    group.add_argument("--max-new-tokens", type=int, help="answer length limit in tokens")
    group.add_argument("--min-new-tokens", type=int)
    group.add_argument("--temperature", type=float, help="0 = greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--num-beams", type=int)
    group.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size (0 = off)")
    group.add_argument("--stop", action="append", help="stop string (repeatable)")
    group.add_argument("--seed", type=int)
    group.add_argument("--threads", type=int,
                       help="torch CPU threads (default: the cores other processes leave free; also $TUNELAB_THREADS)")
    group.add_argument("--quantize", choices=QUANTIZE_TYPES,
                       help="run the model as a GGUF of this type in llama.cpp, the fast CPU path "
                            "(exported and checked once, then cached; docs/deploy.md)")


def settings_from_args(args) -> GenerationSettings:
    """The settings chosen by ``add_generation_options`` flags (unset flags keep the preset).

    Also applies ``--threads``, which is a property of the process, not of the settings.
    """
    if getattr(args, "threads", None) is not None:
        from tunelab.hardware import set_threads

        set_threads(args.threads)
    names = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k",
             "repetition_penalty", "num_beams", "stop", "seed", "no_repeat_ngram_size")
    return from_preset(args.preset, **{n: getattr(args, n, None) for n in names})


def run_chat(spec: str, settings: GenerationSettings, system: str | None = None, quantize: str | None = None,
             threads: int | None = None) -> None:
    """Load ``spec`` (model, run folder or builtin; ``quantize``: as a GGUF in llama.cpp) and chat on
    stdin/stdout."""
    print(f"loading {spec} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_for_generation(spec, quantize, threads)
    chat_loop(model, tokenizer, settings, system)


def load_for_generation(spec: str, quantize: str | None = None, threads: int | None = None):
    """``(model, tokenizer)``: transformers', or with ``quantize`` a GGUF in llama.cpp."""
    if quantize:
        from tunelab.models.gguf_runtime import load_quantized

        return load_quantized(spec, quantize, threads, log=lambda line: print(line, file=sys.stderr, flush=True))
    from tunelab.models import load_model

    return load_model(spec)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="chat with a model or run folder in the terminal",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model spec or run folder (default {DEFAULT_MODEL})")
    parser.add_argument("--system", help="system prompt (default: none, or the chat template's own default)")
    parser.add_argument("--image", action="append", metavar="PATH",
                        help="vision runs: attach an image to the first message (repeatable; /image PATH later)")
    add_generation_options(parser)
    parser.set_defaults(func=_main)


def _main(args) -> int:
    from tunelab.vision.compose import is_vision_run

    if is_vision_run(args.model) and not args.quantize:
        from tunelab.vision.chat import run_chat as run_vision_chat

        run_vision_chat(args.model, settings_from_args(args), args.system, args.image)
        return 0
    if args.image:
        raise TunelabError(f"--image: {args.model} is not a vision-language run (no vision.json)")
    run_chat(args.model, settings_from_args(args), args.system, args.quantize, args.threads)
    return 0
