"""Frozen-backbone embeddings: the store (``store``), ``medray embed`` and the heads trained on a store."""
