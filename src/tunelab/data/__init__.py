"""Data: readers, formats, dataset registry, the conversation type, rendering to tokens.

Everything here is light to import (no torch, no transformers): a tokenizer is passed in.
"""

from tunelab.data.conversation import Conversation, ImagePart, Message, TextPart
from tunelab.data.formats import FORMATS, detect_format, read_conversations, to_conversation
from tunelab.data.readers import iter_rows, read_rows
from tunelab.data.registry import load_dataset, load_datasets, read_registry
from tunelab.data.render import (
    IGNORE_INDEX,
    EncodeStats,
    encode,
    encode_all,
    mark_supervised,
    prompt_ids,
    render_text,
    supervised_spans,
)

__all__ = [
    "Conversation", "ImagePart", "Message", "TextPart",
    "FORMATS", "detect_format", "read_conversations", "to_conversation",
    "iter_rows", "read_rows",
    "load_dataset", "load_datasets", "read_registry",
    "IGNORE_INDEX", "EncodeStats", "encode", "encode_all", "mark_supervised", "prompt_ids",
    "render_text", "supervised_spans",
]
