"""Jobs that choose between rooms: whole-slide runs (``wsi.patches`` set) go to ``medray.wsi``, heads on
embeddings (``model.head``: linear, knn or mlp) to ``medray.embeddings``; both build on training and
evaluation, so the choice is made here, above all of them."""

from __future__ import annotations

from medray.config import JobConfig

EMBEDDING_HEADS = ("linear", "knn", "mlp")  # medray.embeddings.heads.HEADS, named here without importing torch


def train(config: JobConfig):
    """Train the run: a head on its embedding store, or the image model (on images or whole-slide patches)."""
    if config.model.head in EMBEDDING_HEADS:
        from medray.embeddings.head_runs import train_head

        return train_head(config)
    from medray.training.trainer import train as train_images

    return train_images(config)


def evaluate(config: JobConfig):
    """Evaluate the run: per image, per slide when it trained on whole-slide patches, or its head on embeddings."""
    if config.model.head in EMBEDDING_HEADS:
        from medray.embeddings.head_runs import evaluate_head

        return evaluate_head(config)
    if config.wsi.patches:
        from medray.wsi.slide_eval import evaluate_slides

        return evaluate_slides(config)
    from medray.evaluation.evaluate import evaluate as evaluate_images

    return evaluate_images(config)
