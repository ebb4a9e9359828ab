"""Vision-language models: any vision tower -> projector -> any causal LM.

- ``settings``: ``model.vision`` (``VisionConfig``), light to import;
- ``towers``: loading a tower (the packaged EfficientNet-Lite0 or any transformers vision
  model) and its image preprocessing, feature selection;
- ``model``: the projector and ``VisionLanguageModel`` (image features spliced into the
  input embeddings at placeholder tokens), building, saving and loading run folders;
- ``data``: reading images, expanding placeholders, encoding without cutting an image span,
  batching;
- ``train``: the ``align``/``instruct`` stages on the one training engine;
- ``chat``: answers through the shared generation core, and chatting with images attached;
- ``evaluate``: scoring per question type, with the shuffled-images baseline;
- ``export``: a composite that is a Llava model written as a plain transformers folder;
- ``shapes``: the seeded shapes dataset the vision demo (``tunelab.demo.vlm``) draws.

Only ``settings`` is imported here: the rest needs torch and is imported where used.
"""

from tunelab.vision.settings import BUILTIN_TOWER, VisionConfig

__all__ = ["BUILTIN_TOWER", "VisionConfig"]
