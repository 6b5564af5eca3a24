"""One call that measures a trained model on a dataset snapshot: :func:`evaluate`."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import torch

from genmodels.data.loader import model_input
from genmodels.evaluation import quality
from genmodels.evaluation._common import evaluating, head, module_device, split_of
from genmodels.evaluation.classifier import (
    ClassifierConfig,
    DomainClassifier,
    class_judge_config,
    extract,
    load_or_train_classifier,
)
from genmodels.evaluation.likelihood import likelihood_metrics
from genmodels.models import weights_digest
from genmodels.models.base import GenerativeModel

logger = logging.getLogger(__name__)

#: Neighbours defining the k-NN manifolds of precision/recall (the paper's choice).
PR_NEIGHBOURS = 3
#: Random stream (with the evaluation's seed) of the one-time binarization of the training
#: images the real-vs-real floor borrows: apart from prep's streams and from sampling noise.
FLOOR_BINARIZE_STREAM = 0xF100


def reference_images(model: GenerativeModel, split, max_examples: int | None = None) -> torch.Tensor:
    """Real images of the same kind as the model's samples, for FID/KID.

    Binary samples on the grid are compared with the split's binarized images; continuous
    samples (decoder means, GAN outputs) with grey levels, because comparing a continuous
    sample with a binarized real would measure the binarization noise, not the model.
    """
    kind = "quantized" if model.samples_on_grid else "intensity"
    return model_input(head(split, max_examples), model.image, kind=kind)


def floor_images(model: GenerativeModel, snapshot, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` held-out real images, of the kind :func:`reference_images` gives, for the real-vs-real
    floor of ``n`` model samples: the val split's first ``n``, and where val holds fewer, the
    first training images after them (fewer only where val and train together hold fewer).

    FID and KID estimates of a set of n images are biased by n (FID's falls with n), so the
    floor is drawn with as many images as the model's samples: with val's 144 digits alone it
    read 0.39 where 1,000 real images reach 0.08. Binary snapshots store no binarization of
    their training images; those borrowed are binarized once, deterministically given ``seed``
    (stream :data:`FLOOR_BINARIZE_STREAM`). Training images are as real as val's: the floor
    measures finite-sample noise, not a model."""
    val = split_of(snapshot, "val")
    if len(val.y) >= n:  # the floor's images as they always were where val suffices
        return reference_images(model, val, n)
    fill = head(split_of(snapshot, "train"), n - len(val.y))
    if snapshot.image.levels == 2 and getattr(fill, "x_binary", None) is None:
        rng = np.random.default_rng([seed, FLOOR_BINARIZE_STREAM])
        x_binary = (rng.random(fill.x.shape) < fill.x / 255.0).astype(np.uint8)
        fill = SimpleNamespace(x=fill.x, y=fill.y, x_binary=x_binary)
    return torch.cat([reference_images(model, val), reference_images(model, fill)])


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class within one of n / K samples."""
    return torch.arange(n, dtype=torch.long) % num_classes


def labels_in_proportion(reference: np.ndarray, n: int, num_classes: int) -> torch.Tensor:
    """``n`` class labels in the class mix of ``reference`` (the labels of the real images the
    samples are compared with), apportioned by largest remainders and interleaved 0, 1, ...,
    K-1, 0, 1, ... while a class has some left. A conditional model's FID against a test split
    of another mix than its samples' would measure the mix, not the model. For a balanced
    reference these are exactly :func:`class_balanced_labels`, so such figures are unchanged."""
    counts = np.bincount(np.asarray(reference, dtype=np.int64), minlength=num_classes)
    if len(counts) > num_classes or counts.sum() == 0:
        raise ValueError(f"reference labels must lie in 0..{num_classes - 1} and be at least one, "
                         f"got {len(reference)} with classes up to {len(counts) - 1}")
    quota = n * counts / counts.sum()
    allotted = np.floor(quota).astype(np.int64)
    # Ties go to the lower class (a stable sort), as class_balanced_labels' do.
    allotted[np.argsort(-(quota - allotted), kind="stable")[: n - int(allotted.sum())]] += 1
    classes = np.repeat(np.arange(num_classes), allotted)
    rounds = np.concatenate([np.arange(c) for c in allotted])
    return torch.from_numpy(classes[np.argsort(rounds * num_classes + classes, kind="stable")])


def generate(
    model: GenerativeModel, n: int, seed: int, labels: torch.Tensor | None = None, batch_size: int = 256
) -> torch.Tensor:
    """``model.sample(n, labels, seed)`` in batches; identical to one big call (noise is per row)."""
    parts = []
    with evaluating(model):
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            batch_labels = None if labels is None else labels[start : start + count]
            parts.append(model.sample(count, labels=batch_labels, seed=seed, start=start).cpu())
    samples = torch.cat(parts)
    expected = (n, *model.image.shape)
    if tuple(samples.shape) != expected:
        raise ValueError(f"{model.family}.sample returned shape {tuple(samples.shape)}, expected {expected}")
    finite = bool(torch.isfinite(samples).all())
    if not finite or samples.min() < 0 or samples.max() > 1:
        # Non-finite samples raise as a NaN likelihood does (FloatingPointError): figures a broken
        # model gives, which the registry scores as NaN for a champion instead of failing the retrain.
        raise (ValueError if finite else FloatingPointError)(
            f"{model.family} samples must be finite and lie in [0, 1]; got range "
            f"{float(samples.nan_to_num().min()):.4g}..{float(samples.nan_to_num().max()):.4g}"
            f"{'' if finite else ' with NaN/inf'}"
        )
    return samples


def sample_quality(
    model: GenerativeModel,
    snapshot,
    network: DomainClassifier,
    n_samples: int = 2000,
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 256,
    judge: DomainClassifier | None = None,
) -> dict[str, float]:
    """FID, KID and precision/recall of ``n_samples`` model samples against the test split
    (first ``max_examples`` images; a conditional model's samples ask for its classes in that
    test subset's mix, :func:`labels_in_proportion`), the same distances from ``n_samples`` held-out real images
    (:func:`floor_images`: val, then training images where val holds fewer) to the test images
    as the floor a perfect model would reach with that many samples, and, for conditional
    models, ``class_accuracy``: how often the class judge (``judge``; ``network`` when None)
    names the requested class, over all samples and per class. With a separate judge,
    ``class_accuracy_domain`` is the same figure by ``network`` (the grey-level features)."""
    if n_samples <= PR_NEIGHBOURS:
        raise ValueError(f"n_samples must be > {PR_NEIGHBOURS} for FID/KID/precision-recall, got {n_samples}")
    reference = head(split_of(snapshot, "test"), max_examples)
    real_feats, _ = extract(network, reference_images(model, reference))
    labels = labels_in_proportion(reference.y, n_samples, model.image.num_classes) if model.conditional else None
    samples = generate(model, n_samples, seed, labels, batch_size)
    fake_feats, predicted_domain = extract(network, samples)
    floor_feats, _ = extract(network, floor_images(model, snapshot, n_samples, seed))

    precision, recall = quality.precision_recall(real_feats, fake_feats, PR_NEIGHBOURS)
    out = {
        "fid": quality.fid(real_feats, fake_feats),
        "kid": quality.kid(real_feats, fake_feats),
        "precision": precision,
        "recall": recall,
        "fid_real_floor": quality.fid(real_feats, floor_feats),
        "kid_real_floor": quality.kid(real_feats, floor_feats),
        "n_samples": float(n_samples),
        "n_reference": float(len(real_feats)),
        "n_floor": float(len(floor_feats)),
    }
    if labels is not None:
        asked = labels.numpy()
        predicted = predicted_domain if judge is None or judge is network else extract(judge, samples)[1]
        if predicted is not predicted_domain:
            out["class_accuracy_domain"] = float(np.mean(predicted_domain == asked))
        out["class_accuracy"] = float(np.mean(predicted == asked))
        # Per class too: an average hides the classes a conditional model cannot draw.
        for k in np.unique(asked):
            out[f"class_accuracy_{int(k)}"] = float(np.mean(predicted[asked == k] == k))
    return out


def evaluate(
    model: GenerativeModel,
    snapshot,
    *,
    storage,
    n_samples: int = 2000,
    iwae_k: int | None = None,
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 256,
    sample_batch_size: int | None = None,
    classifier_config: ClassifierConfig | None = None,
    judge_config: ClassifierConfig | None = None,
    progress=None,
    deadline: float | None = None,
    provenance: dict[str, str] | None = None,
) -> dict[str, float]:
    """Every metric that applies to ``model`` on ``snapshot``'s test split, as one flat dict.

    - likelihood (families with one): ``nll_nats``, ``bits_per_dim``; VAEs also
      ``elbo_nats``, ``elbo_bits_per_dim``, ``iwae_k{k}_nats``, ``recon_mse`` (see
      :func:`likelihood_metrics`);
    - sample quality in the domain classifier's feature space (labelled datasets):
      ``fid``, ``kid``, ``precision``, ``recall``, the real-vs-real floors ``fid_real_floor``
      and ``kid_real_floor``, ``classifier_test_accuracy`` (and ``..._binarized``); conditional models also
      ``class_accuracy`` and ``class_accuracy_<k>`` by the class judge, with the judge's own
      accuracy on the real test images as the ceiling (``class_judge_test_accuracy``, and
      ``class_judge_test_accuracy_binarized`` on their binarization) and
      ``class_accuracy_domain`` by the feature network when the judge is another network;
    - completion (PixelRNN, mixture): ``completion_nll_nats``, ``completion_bits_per_dim``,
      scored in the likelihood pass (see :func:`likelihood_metrics`);
    - counts: ``likelihood_examples``, ``n_samples``, ``n_reference``, ``n_floor``.

    The domain classifier comes from (or goes into) ``storage``; ``storage=None`` trains it
    afresh. ``max_examples`` caps the test images used (likelihood and FID reference).
    ``batch_size`` batches the likelihood pass, ``sample_batch_size`` (default: ``batch_size``)
    the samples; neither changes an image (noise is drawn per sample).
    ``progress`` (a storage) makes the likelihood pass resumable, and ``deadline`` bounds it (see
    :func:`likelihood_metrics`); it runs first, so a pause costs none of the sample figures' work.
    ``provenance``, when given, receives what the figures were measured with (see
    :func:`domain_metrics`). The class judge of a binary snapshot is a second classifier trained
    on grey levels and their binarized draws (``judge_config``; default :func:`class_judge_config` of
    ``classifier_config``), cached beside the feature network; other snapshots' samples (or
    a ``judge_config`` equal to the feature network's) are judged by the feature network itself.
    """
    if model.image != snapshot.image:
        raise ValueError(f"model was built for {model.image}, the snapshot holds {snapshot.image}")
    out = likelihood_metrics(model, snapshot, "test", max_examples=max_examples, batch_size=batch_size,
                             iwae_k=iwae_k, seed=seed, progress=progress, deadline=deadline)
    out.update(domain_metrics(model, snapshot, storage=storage, n_samples=n_samples, seed=seed,
                              max_examples=max_examples, batch_size=sample_batch_size or batch_size,
                              classifier_config=classifier_config, judge_config=judge_config,
                              provenance=provenance))
    bad = sorted(k for k, v in out.items() if math.isnan(v))
    if bad:
        raise FloatingPointError(f"evaluation of the {model.family} model produced NaN for {bad}")
    return out


def domain_metrics(
    model: GenerativeModel,
    snapshot,
    *,
    storage,
    n_samples: int = 2000,
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 256,
    classifier_config: ClassifierConfig | None = None,
    judge_config: ClassifierConfig | None = None,
    provenance: dict[str, str] | None = None,
) -> dict[str, float]:
    """The sample-quality half of :func:`evaluate` (the same figures for the same arguments):
    the domain classifier's and class judge's accuracies and :func:`sample_quality`. Minutes,
    where a ``cpu`` preset's likelihood pass takes hours; empty for a snapshot without labels.

    ``provenance``, when given, receives the :func:`weights_digest` of the networks the figures
    were measured with: ``feature_network`` (FID, KID, precision, recall live in its feature
    space: two models' figures compare only under the same one) and, for conditional models,
    ``class_judge``."""
    if snapshot.image.num_classes < 2:
        logger.warning("snapshot %s has no class labels: no domain classifier, so no FID/KID", snapshot.dataset)
        return {}
    out: dict[str, float] = {}
    classifier = load_or_train_classifier(snapshot, storage, classifier_config, module_device(model))
    if provenance is not None:
        provenance["feature_network"] = weights_digest(classifier.network)
    out["classifier_test_accuracy"] = classifier.test_accuracy
    if classifier.test_accuracy_binarized is not None:
        out["classifier_test_accuracy_binarized"] = classifier.test_accuracy_binarized
    judge = classifier
    if model.conditional:
        judge_config = judge_config or class_judge_config(snapshot.image, classifier_config)
        if judge_config is not None and judge_config != classifier.network.config:
            judge = load_or_train_classifier(snapshot, storage, judge_config, module_device(model), name="class-judge")
        out["class_judge_test_accuracy"] = judge.test_accuracy
        if provenance is not None:
            provenance["class_judge"] = weights_digest(judge.network)
        if judge.test_accuracy_binarized is not None:
            out["class_judge_test_accuracy_binarized"] = judge.test_accuracy_binarized
    out.update(sample_quality(model, snapshot, classifier.network, n_samples, seed, max_examples, batch_size,
                              judge=judge.network))
    return out
