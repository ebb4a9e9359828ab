"""Data: readers, formats, dataset registry, the conversation type, rendering to tokens."""
