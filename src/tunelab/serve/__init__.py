"""An OpenAI-compatible server for a base model plus LoRA adapters.

``tunelab.serve.app.create_app`` builds the FastAPI app, ``tunelab.serve.engine`` batches
requests on one worker thread, ``tunelab.serve.models`` loads the served models and
``tunelab.serve.cli`` adds ``tunelab serve``. Kept import-free so ``tunelab --help`` stays fast.
"""
