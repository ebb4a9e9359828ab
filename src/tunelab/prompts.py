"""Prompts for the generation core (``tunelab.generation``): token ids, context checks, images.

- ``render_prompt``: a raw string, or chat messages through the tokenizer's chat template;
- ``encode_prompts``: many prompts for one model. A vision-language model (``tunelab.vision``)
  encodes its own, placeholders expanded as in training, and gives each row's image spans;
- ``image_inputs``: the ``generate`` keyword arguments such a model builds from a batch's spans;
- ``context_length`` / ``check_context``: refuse a prompt that would not fit with its answer.

Text models never reach the image half: it is chosen by the model having ``encode_prompt``.
"""

from __future__ import annotations

from typing import Any, Sequence

from tunelab.errors import TunelabError


def render_prompt(tokenizer, prompt: Any) -> list[int]:
    """Token ids of a prompt: a raw string, or chat messages rendered with the chat template."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    messages = _as_messages(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise TunelabError(
            "the tokenizer has no chat template: set model.template (e.g. human-assistant) or pass raw text prompts"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja errors from templates that reject a role order, for example
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TunelabError(f"chat template failed on these messages: {first_line}") from exc
    # The template already wrote bos and friends; adding them again would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    if hasattr(prompt, "to_openai"):  # tunelab Conversation
        prompt = prompt.to_openai()
    messages = []
    for message in prompt:
        if hasattr(message, "to_openai"):
            message = message.to_openai()
        if not isinstance(message, dict) or "role" not in message:
            raise TunelabError(f"a chat prompt must be a list of {{role, content}} messages, got {message!r}")
        content = message.get("content") or ""
        if isinstance(content, list):  # text parts only: this core serves text models
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        messages.append({"role": message["role"], "content": content})
    return messages


def context_length(model) -> int | None:
    """The model's maximum sequence length (prompt + answer), if it declares one."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def check_context(model, prompt_len: int, max_new_tokens: int, where: str = "prompt") -> None:
    """Refuse a prompt that, with the answer budget, would not fit the model's context."""
    limit = context_length(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise TunelabError(
            f"{where}: {prompt_len} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's context "
            f"of {limit} tokens"
        )


def encode_prompts(model, tokenizer, prompts: Sequence[Any]) -> tuple[list[list[int]], list[list] | None]:
    """``(prompt ids per prompt, image spans per prompt or None for a text model)``."""
    if hasattr(model, "encode_prompt"):  # a vision-language model: placeholders expanded, images per row
        pairs = [model.encode_prompt(tokenizer, p) for p in prompts]
        return [ids for ids, _ in pairs], [spans for _, spans in pairs]
    return [render_prompt(tokenizer, p) for p in prompts], None


def image_inputs(model, images: Sequence[Any] | None, members: Sequence[int]) -> dict:
    """``generate`` keyword arguments for the rows ``members`` (none without images)."""
    if images is None:
        return {}
    return model.image_inputs([images[row] for row in members])
