"""Jobs that choose between rooms: whole-slide runs (``wsi.patches`` set) go to ``medray.wsi``, which
builds on training and evaluation, so the choice is made here, above all of them."""

from __future__ import annotations

from medray.config import JobConfig


def evaluate(config: JobConfig):
    """Evaluate the run: per image, or per slide when it trained on whole-slide patches."""
    if config.wsi.patches:
        from medray.wsi.slide_eval import evaluate_slides

        return evaluate_slides(config)
    from medray.evaluation.evaluate import evaluate as evaluate_images

    return evaluate_images(config)
