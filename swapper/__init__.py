"""swapper: one OpenAI-compatible endpoint over many models, swapped in and out of a memory budget."""

__version__ = "0.1.0"
