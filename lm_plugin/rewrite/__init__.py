"""Stage 5 of the data flow: plan -> trainable form (what gets fine-tuned)."""

from .trainable import BlockRecord, RewriteOptions, to_trainable

__all__ = ["BlockRecord", "RewriteOptions", "to_trainable"]
