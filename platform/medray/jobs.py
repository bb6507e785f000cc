"""Jobs that choose between rooms: whole-slide runs (``wsi.patches`` set) and attention-MIL on slide
embeddings (``model.head: abmil``) go to ``medray.wsi``, heads on embeddings (``model.head``: linear, knn
or mlp) to ``medray.embeddings``; both build on training and evaluation, so the choice is made here,
above all of them."""

from __future__ import annotations

from medray.config import JobConfig

EMBEDDING_HEADS = ("linear", "knn", "mlp")  # medray.embeddings.heads.HEADS, named here without importing torch


def train(config: JobConfig):
    """Train the run: a head on its embedding store, attention-MIL over slide embeddings, or the image model."""
    if config.model.head in EMBEDDING_HEADS:
        from medray.embeddings.head_runs import train_head

        return train_head(config)
    if config.model.head == "abmil":
        from medray.wsi.mil_train import train_mil

        return train_mil(config)
    from medray.training.trainer import train as train_images

    return train_images(config)


def evaluate(config: JobConfig):
    """Evaluate the run: per image, per slide (whole-slide patches), per bag (attention-MIL), or its head on embeddings."""
    if config.model.head in EMBEDDING_HEADS:
        from medray.embeddings.head_runs import evaluate_head

        return evaluate_head(config)
    if config.model.head == "abmil":
        from medray.wsi.mil_eval import evaluate_mil

        return evaluate_mil(config)
    if config.wsi.patches:
        from medray.wsi.slide_eval import evaluate_slides

        return evaluate_slides(config)
    from medray.evaluation.evaluate import evaluate as evaluate_images

    return evaluate_images(config)


def score(config: JobConfig):
    """Score ``score.input`` with an image model, or with a head on embeddings (embed → head) when the checkpoint is one."""
    from medray.scoring.score import score as score_images
    from medray.training import checkpoint

    uri = checkpoint.resolve(config.score.checkpoint, config.run_dir)
    meta = checkpoint.read_meta(uri)
    if meta.get("head") not in EMBEDDING_HEADS:
        return score_images(config)
    from functools import partial

    from medray.config import ConfigError
    from medray.embeddings.head_scoring import encoder_for, predict_head

    if config.score.gradcam_threshold is not None:
        raise ConfigError("score.gradcam_threshold: a head on embeddings reads vectors, not pixels, so it has no Grad-CAM; unset it")
    # The encoder checked against the head's record before anything is listed or written.
    encoder, weights, model_args = encoder_for(meta, uri, config.embed.weights, config.embed.model_args)
    return score_images(config, partial(predict_head, weights=weights, model_args=model_args, encoder=encoder))
