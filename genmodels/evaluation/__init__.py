"""Evaluation of generative models: likelihoods, domain FID/KID, precision/recall, class
accuracy of conditional samples, and pictures.

Sample quality is measured in the feature space of a small classifier trained once per
dataset snapshot and cached in storage (:mod:`genmodels.evaluation.classifier`), because
ImageNet features do not describe 8x8 digits or binarized clothes.
"""

from genmodels.evaluation.classifier import (
    ClassifierConfig,
    DomainClassifier,
    TrainedClassifier,
    class_judge_config,
    classifier_key,
    load_or_train_classifier,
    train_classifier,
)
from genmodels.evaluation.effort import EVAL_SETTINGS, evaluation_settings
from genmodels.evaluation.likelihood import DEFAULT_IWAE_K, LikelihoodPassPaused, bits_per_dim, likelihood_metrics
from genmodels.evaluation.metrics import (
    class_balanced_labels,
    domain_metrics,
    evaluate,
    generate,
    labels_in_proportion,
    reference_images,
    sample_quality,
)
from genmodels.evaluation.pictures import (
    analogy_png,
    grid_png,
    image_pngs,
    interpolate,
    interpolation_png,
    manifold_png,
    render_pictures,
    slerp,
)
from genmodels.evaluation.quality import fid, frechet_distance, gaussian_stats, kid, precision_recall

__all__ = [
    "DEFAULT_IWAE_K", "EVAL_SETTINGS", "ClassifierConfig", "DomainClassifier", "LikelihoodPassPaused",
    "TrainedClassifier", "analogy_png", "bits_per_dim", "class_balanced_labels", "class_judge_config", "classifier_key", "domain_metrics",
    "evaluate", "evaluation_settings", "fid",
    "frechet_distance", "gaussian_stats", "generate", "grid_png", "image_pngs", "interpolate", "interpolation_png",
    "kid", "labels_in_proportion", "likelihood_metrics", "load_or_train_classifier", "manifold_png", "precision_recall", "reference_images",
    "render_pictures", "sample_quality", "slerp", "train_classifier",
]
