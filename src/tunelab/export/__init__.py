"""Deployment: GGUF writing, the export check (probe prompts through source and result),
real llama.cpp through node-llama-cpp, and the memory estimate.

One backend per file; ``gguf``, numpy and node are imported or started only where used.
The merged Hugging Face folder export itself is :mod:`tunelab.train.export`.
"""
