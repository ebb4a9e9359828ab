"""Prepare offline assets once, at `make setup` time. Never fails the setup.

Each step is a function; failures print one line and the step is retried next time
the asset is needed (the builtin model also converts itself on first load).
"""

from __future__ import annotations

import sys


def prepare_builtin_model() -> None:
    """Convert the packaged SmolLM2 GGUF to a safetensors folder in the cache (~20 s, once)."""
    from tunelab.models.builtin import builtin_folder

    print(f"builtin model ready: {builtin_folder('smollm2-135m-instruct')}")


STEPS = [prepare_builtin_model]


def main() -> int:
    for step in STEPS:
        try:
            step()
        except Exception as exc:  # a missing asset must not block installing the rest
            print(f"note: {step.__name__} skipped: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
