"""The LLaMA-family numpy model, its loading (GGUF, HF config) and the sizes a run needs."""
