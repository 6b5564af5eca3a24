"""The domain feature network: a small CNN classifier trained once per dataset snapshot.

Inception features (the usual FID backbone) are meaningless on 8x8 digits or binarized
28x28 clothes, so FID/KID here use the penultimate layer of a classifier trained on the
snapshot's own training split. It sees grey levels (intensities / 255) so that decoder
means and GAN outputs are in its input domain, and it is cached in storage under
``classifiers/<hash16>.pt``: every model evaluated on a snapshot is measured with the very
same features, which is what makes their FIDs comparable.

Binary snapshots get a second network of the same shape, the *class judge*
(:func:`class_judge_config`), used for one thing: naming the class of conditional samples
(``class_accuracy``). The grey-level feature network names the class of only about half of
the real *binarized* Fashion-MNIST test images, so it cannot judge a model of binarized
images; the judge is trained on grey levels and on Bernoulli draws of them (both domains a
binary model's output lives in: decoder means are pixel probabilities, i.e. expected
binarized images; its samples are draws), and its own accuracy on the real binarized test
images is reported beside the figure as the ceiling. FID/KID and precision/recall keep the
grey-level features: the judge ignores pixel noise, which would blunt them.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from genmodels.config import dataclass_from_dict
from genmodels.evaluation._common import evaluating, module_device, seeded_torch, split_of
from genmodels.models.base import ImageSpec

logger = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "genmodels.classifier/1"
#: The training code's version, stored in each cache entry's meta. A snapshot hash and a config
#: do not say which code trained the weights: c4a3566's channels-last layout alone changed
#: them, and the old entries went on being served, so a FID depended on the store's history.
#: Entries without this version, or with another, are retrained. Bump it with any change of
#: this module that changes what training produces (network, layout, data order, optimizer).
CLASSIFIER_CODE_VERSION = 2
#: binarized_fraction of the class judge of binary snapshots: half of each batch as grey
#: levels, half as a fresh Bernoulli draw of them (benchmarks/RESULTS.md has the comparison).
CLASS_JUDGE_BINARIZED_FRACTION = 0.5


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that rebuilds and retrains the classifier (stored with its weights)."""

    channels: int
    height: int
    width: int
    num_classes: int
    base_channels: int = 32
    feature_dim: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    max_train_examples: int | None = None
    #: Fraction of each training batch shown as a Bernoulli draw of its intensities (dynamic
    #: binarization). Off by default: it makes the classifier name the class of binarized
    #: images far better (a grey-only one gets 51% of real binarized Fashion-MNIST test images),
    #: but it also teaches it to ignore pixel noise, so random images land inside the real
    #: features' k-NN manifold (precision 1.0 on digits) and FID/precision lose their bite.
    binarized_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channels", "height", "width", "base_channels", "feature_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(
                f"the domain classifier needs a labelled dataset with >= 2 classes, got num_classes={self.num_classes}"
            )
        if self.lr <= 0:
            raise ValueError(f"ClassifierConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.binarized_fraction <= 1.0:
            raise ValueError(f"ClassifierConfig.binarized_fraction must be in [0, 1], got {self.binarized_fraction}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise ValueError(f"ClassifierConfig.max_train_examples must be >= 1 or None, got {self.max_train_examples}")

    @classmethod
    def for_image(cls, image: ImageSpec, **overrides: Any) -> "ClassifierConfig":
        return cls(image.channels, image.height, image.width, image.num_classes, **overrides)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassifierConfig":
        return dataclass_from_dict(cls, data)


class DomainClassifier(nn.Module):
    """Three conv stages, then a ``feature_dim`` penultimate layer and the class logits.

    Stages halve the resolution only while it is >= 8, so 8x8 digits and 64x64 RGB images
    get the same network shape; pooling to 2x2 at the end keeps coarse layout information in
    the features (global pooling alone would make a shape and its mirror image identical).
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        size = min(config.height, config.width)
        ch_in = config.channels
        for mult in (1, 2, 4):
            ch_out = config.base_channels * mult
            layers += [nn.Conv2d(ch_in, ch_out, 3, padding=1), nn.BatchNorm2d(ch_out), nn.ReLU()]
            if size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            ch_in = ch_out
        layers.append(nn.AdaptiveAvgPool2d(2))
        self.body = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(ch_in * 4, config.feature_dim), nn.ReLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        # Channels-last convs, batch norm and pooling: 1.65x the training images/s of the
        # default layout on these CPUs (a one-thread A/B, benchmarks/RESULTS.md).
        self.to(memory_format=torch.channels_last)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.config.shape:
            raise ValueError(f"classifier expects images [B, {', '.join(map(str, self.config.shape))}], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, feature_dim] of images in [0, 1]."""
        self._check(x)
        return self.embed(self.body(x.contiguous(memory_format=torch.channels_last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _as_unit_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 intensities -> [0, 1]; float tensors are taken as already in [0, 1]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def extract(
    network: DomainClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(features float64 [N, feature_dim], predicted labels int64 [N]) of ``images``.

    ``images`` are float in [0, 1] or uint8 intensities.
    """
    device = module_device(network)
    feats, preds = [], []
    with evaluating(network):
        for start in range(0, len(images), batch_size):
            x = _as_unit_float(images[start : start + batch_size]).to(device)
            f = network.features(x)
            feats.append(f.double().cpu())
            preds.append(network.head(f).argmax(dim=1).cpu())
    if not feats:
        return np.zeros((0, network.config.feature_dim)), np.zeros((0,), dtype=np.int64)
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def accuracy(network: DomainClassifier, images: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    _, pred = extract(network, images)
    return float(np.mean(pred == np.asarray(labels)))


def train_classifier(
    x: np.ndarray, y: np.ndarray, config: ClassifierConfig, device: str | torch.device = "cpu"
) -> DomainClassifier:
    """Train on uint8 images ``x`` [N,C,H,W] with labels ``y``; deterministic given ``config.seed``
    (on CPU; cuDNN convolutions may add run-to-run noise on GPUs)."""
    if tuple(x.shape[1:]) != config.shape:
        raise ValueError(f"training images have shape {tuple(x.shape[1:])}, the classifier config says {config.shape}")
    n = len(y) if config.max_train_examples is None else min(config.max_train_examples, len(y))
    if n == 0:
        raise ValueError("cannot train the domain classifier on an empty training split")
    y_t = torch.as_tensor(np.asarray(y[:n]), dtype=torch.long)
    if int(y_t.min()) < 0 or int(y_t.max()) >= config.num_classes:
        raise ValueError(f"training labels must lie in [0, {config.num_classes}), got {int(y_t.min())}..{int(y_t.max())}")
    steps_per_epoch = math.ceil(n / config.batch_size)
    with seeded_torch(config.seed):
        network = DomainClassifier(config).to(device)
        network.train()
        optimizer = torch.optim.Adam(network.parameters(), lr=config.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
        )
        order_rng = torch.Generator().manual_seed(config.seed)
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=order_rng).numpy()
            total = 0.0
            for start in range(0, n, config.batch_size):
                idx = np.sort(order[start : start + config.batch_size])
                xb = _as_unit_float(x[idx]).to(device)
                if config.binarized_fraction > 0:
                    flip = torch.rand(len(idx), 1, 1, 1, device=device) < config.binarized_fraction
                    xb = torch.where(flip, torch.bernoulli(xb), xb)
                yb = y_t[idx].to(device)
                loss = nn.functional.cross_entropy(network(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
            logger.debug("domain classifier epoch %d/%d: train loss %.4f", epoch + 1, config.epochs, total / n)
    return network.eval()


@dataclass
class TrainedClassifier:
    network: DomainClassifier
    test_accuracy: float
    #: Whether it came from the storage cache rather than being trained by this call.
    from_cache: bool
    key: str | None
    #: Accuracy on the test split's one-time binarization (binary snapshots; None otherwise
    #: or for a cache entry written before it was recorded).
    test_accuracy_binarized: float | None = None


def classifier_key(snapshot, name: str = "domain") -> str:
    """``classifiers/<hash16>.pt`` for the domain feature network, ``classifiers/<hash16>-<name>.pt``
    for another network of the snapshot (the class judge)."""
    suffix = "" if name == "domain" else f"-{name}"
    return f"classifiers/{snapshot.hash[:16]}{suffix}.pt"


def class_judge_config(image: ImageSpec, base: ClassifierConfig | None = None) -> ClassifierConfig | None:
    """Config of the class judge of a snapshot with images ``image``: ``base`` (default: the
    domain classifier's) trained on grey levels and binarized draws for binary images; None
    for other quantizations, whose samples are in the domain classifier's own input domain."""
    if image.levels != 2:
        return None
    base = base or ClassifierConfig.for_image(image)
    return dataclasses.replace(base, binarized_fraction=CLASS_JUDGE_BINARIZED_FRACTION)


def classifier_bytes(network: DomainClassifier, meta: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(
        {
            "format": CLASSIFIER_FORMAT,
            "config": network.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "meta": dict(meta),
        },
        buf,
    )
    return buf.getvalue()


def load_classifier(data: bytes, device: str | torch.device = "cpu") -> tuple[DomainClassifier, dict[str, Any]]:
    """(network, meta) from :func:`classifier_bytes` output, loaded with ``weights_only=True``."""
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"not a loadable domain-classifier checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"not a domain-classifier checkpoint (expected format {CLASSIFIER_FORMAT!r})")
    # An entry whose config or weights today's network cannot take (its architecture changed
    # since) is as unusable as an unreadable one: ValueError, which the cache treats as a miss.
    try:
        # The layers' random initialization, overwritten at once, must not draw from the
        # caller's stream: a warm cache would advance it and a cold one (seeded) would not.
        with torch.random.fork_rng(devices=[]):
            network = DomainClassifier(ClassifierConfig.from_dict(ckpt["config"]))
        network.load_state_dict(ckpt["state_dict"])
    except Exception as exc:
        raise ValueError(f"domain-classifier checkpoint does not fit today's network ({exc})") from exc
    return network.to(device).eval(), dict(ckpt.get("meta", {}))


def load_or_train_classifier(
    snapshot,
    storage=None,
    config: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    name: str = "domain",
) -> TrainedClassifier:
    """The snapshot's domain classifier: from the storage cache when present and built with
    the same config for the same snapshot, else trained on the train split and cached.

    ``name`` picks the cache entry (``"domain"``: the FID feature network; ``"class-judge"``:
    see :func:`class_judge_config`). ``storage=None`` trains without caching (ad-hoc use;
    pipelines always pass storage).
    """
    config = config or ClassifierConfig.for_image(snapshot.image)
    if config.shape != snapshot.image.shape or config.num_classes != snapshot.image.num_classes:
        raise ValueError(
            f"classifier config is for images {config.shape} with {config.num_classes} classes, the snapshot has "
            f"{snapshot.image.shape} with {snapshot.image.num_classes}"
        )
    key = classifier_key(snapshot, name) if storage is not None else None
    cached = _from_cache(snapshot, storage, config, device, key)
    if cached is not None:
        return cached
    if key is None:  # no storage: nothing to share, train for this caller
        return _train_and_cache(snapshot, storage, config, device, name, key)
    # Evaluations at the same time (two retrains of different families, a retrain and
    # `genmodels evaluate`, threads of one process) may need the same missing classifier: one
    # trains it, the others wait for it and read it from the cache.
    from genmodels.lease import Lease

    with Lease(storage, key, ttl_s=CLASSIFIER_LEASE_TTL_S, wait_s=CLASSIFIER_WAIT_S, poll_s=1.0):
        cached = _from_cache(snapshot, storage, config, device, key)
        return cached or _train_and_cache(snapshot, storage, config, device, name, key)


#: A trainer that stopped renewing (killed) keeps the others out this long; they wait this long.
CLASSIFIER_LEASE_TTL_S = 120.0
CLASSIFIER_WAIT_S = 3600.0


def _from_cache(snapshot, storage, config: ClassifierConfig, device, key: str | None) -> TrainedClassifier | None:
    """The cached classifier when it is there, readable by today's network, trained by this code
    version (:data:`CLASSIFIER_CODE_VERSION`), of this snapshot and this config."""
    if key is None or not storage.exists(key):
        return None
    try:
        network, meta = load_classifier(storage.get_bytes(key), device)
    except ValueError as exc:
        logger.warning("cached classifier %s is unreadable (%s); retraining", key, exc)
        return None
    if meta.get("code_version") != CLASSIFIER_CODE_VERSION:
        logger.warning("cached classifier %s was trained by code version %s, this is %s; retraining", key,
                       meta.get("code_version"), CLASSIFIER_CODE_VERSION)
        return None
    if meta.get("snapshot_hash") != snapshot.hash:
        logger.warning("cached classifier %s belongs to snapshot %s; retraining", key, meta.get("snapshot_hash"))
        return None
    if network.config != config:
        logger.warning("cached classifier %s was built with %s; retraining with %s", key, network.config, config)
        return None
    binarized = meta.get("test_accuracy_binarized")
    return TrainedClassifier(network, float(meta["test_accuracy"]), from_cache=True, key=key,
                             test_accuracy_binarized=None if binarized is None else float(binarized))


def _train_and_cache(snapshot, storage, config: ClassifierConfig, device, name: str, key: str | None) -> TrainedClassifier:
    train, test = split_of(snapshot, "train"), split_of(snapshot, "test")
    # A module-global lookup at call time: tests patch it to count trainings.
    network = train_classifier(train.x, train.y, config, device)
    test_accuracy = accuracy(network, test.x, test.y)
    binarized = None
    if getattr(test, "x_binary", None) is not None:
        binarized = accuracy(network, test.x_binary.astype(np.float32), test.y)
    logger.info("%s classifier for %s: test accuracy %.4f (binarized: %s)", name, getattr(snapshot, "dataset", "?"),
                test_accuracy, "—" if binarized is None else f"{binarized:.4f}")
    if key is not None:
        meta = {"code_version": CLASSIFIER_CODE_VERSION, "snapshot_hash": snapshot.hash,
                "test_accuracy": test_accuracy, "train_examples": int(len(train.y))}
        if binarized is not None:
            meta["test_accuracy_binarized"] = binarized
        storage.put_bytes(key, classifier_bytes(network, meta))
    return TrainedClassifier(network, test_accuracy, from_cache=False, key=key, test_accuracy_binarized=binarized)
