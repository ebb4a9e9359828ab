"""Hand-written chat templates for models that ship without one.

The tokenizer's own chat template is always the default; these are the registered
exceptions, written as ordinary Jinja chat templates so ``apply_chat_template`` and
``tunelab.data.render`` treat them like any other. Each is tested against the string
its reference builds.

- ``human-assistant``: the StableLM prompt of seeds 000/001. One turn renders exactly
  ``f"Human: {prompt} \\nAssistant:"`` as the generation prompt; an answer follows after
  one space and ends with the eos token (the seed's ``end_sym``).
- ``alpaca``: ``### Instruction:`` / ``### Response:`` blocks with the classic preamble
  (replaced by the system message when there is one); answers end with eos.
- ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` for base models being taught to chat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

HUMAN_ASSISTANT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + ' \n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ '" + ALPACA_PREAMBLE + "\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "human-assistant": HUMAN_ASSISTANT,
    "alpaca": ALPACA,
    "chatml": CHATML,
}

# Text a model trained on the template may start writing when its answer is over.
STOP_STRINGS: dict[str, list[str]] = {
    "human-assistant": ["\nHuman:"],
    "alpaca": ["### Instruction:"],
    "chatml": ["<|im_end|>"],
}


def get_template(name: str) -> str:
    """The Jinja source of a registered template, or of a ``.jinja`` file given by path."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".jinja" and path.is_file():
        return path.read_text(encoding="utf-8")
    raise TunelabError(f"model.template: unknown template {name!r} "
                       f"(known: {', '.join(TEMPLATES)}; or a path to a .jinja file)")


def apply_template(tokenizer: Any, name: str) -> Any:
    """Set ``tokenizer.chat_template`` to the named template; returns the tokenizer."""
    source = get_template(name)
    if "eos_token" in source and not getattr(tokenizer, "eos_token", None):
        raise TunelabError(f"model.template: {name!r} ends answers with eos, but the tokenizer has no eos token")
    tokenizer.chat_template = source
    return tokenizer
