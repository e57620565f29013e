"""Stage 5 of the data flow: plan -> trainable form (what gets fine-tuned)."""

from .trainable import RewriteOptions, to_trainable

__all__ = ["RewriteOptions", "to_trainable"]
