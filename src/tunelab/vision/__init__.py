"""Vision-language models: any vision tower -> projector -> any causal LM.

- ``settings``: ``model.vision`` (``VisionConfig``), light to import;
- ``towers``: loading a tower (the packaged EfficientNet-Lite0 or any transformers vision
  model) and its image preprocessing, feature selection;
- ``model``: the projector and ``VisionLanguageModel`` (image features spliced into the
  input embeddings at placeholder tokens), building, saving and loading run folders;
- ``data``: reading images, expanding placeholders, encoding without cutting an image span,
  batching;
- ``train``: the ``align``/``instruct`` stages on the one training engine;
- ``chat``: chatting with images attached.

Only ``settings`` is imported here: the rest needs torch and is imported where used.
"""

from tunelab.vision.settings import BUILTIN_TOWER, VisionConfig

__all__ = ["BUILTIN_TOWER", "VisionConfig"]
