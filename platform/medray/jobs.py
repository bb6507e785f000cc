"""Jobs that choose between rooms: whole-slide runs (``wsi.patches`` set) and attention-MIL on slide
embeddings (``model.head: abmil``) go to ``medray.wsi``, which builds on training and evaluation, so
the choice is made here, above all of them."""

from __future__ import annotations

from medray.config import JobConfig


def train(config: JobConfig):
    """Train the run's model: attention-MIL over slide embeddings, or the image (or patch) classifier."""
    if config.model.head == "abmil":
        from medray.wsi.mil_train import train_mil

        return train_mil(config)
    from medray.training.trainer import train as train_images

    return train_images(config)


def evaluate(config: JobConfig):
    """Evaluate the run: per image, per slide when it trained on whole-slide patches, per bag for attention-MIL."""
    if config.model.head == "abmil":
        from medray.wsi.mil_eval import evaluate_mil

        return evaluate_mil(config)
    if config.wsi.patches:
        from medray.wsi.slide_eval import evaluate_slides

        return evaluate_slides(config)
    from medray.evaluation.evaluate import evaluate as evaluate_images

    return evaluate_images(config)
