"""tunelab: from raw domain data to a fine-tuned, measured, servable small LLM."""

__version__ = "0.1.0"
