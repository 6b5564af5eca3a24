"""Test-set likelihoods: NLL in nats per image and bits per dimension; ELBO, IWAE and
reconstruction error for the VAE families.

All likelihoods are of the *discrete* image (binary, or 8-bit levels), so bits/dim needs no
dequantization offset: it is ``nll_nats / (dims * ln 2)``. Families without a likelihood
(the GAN) get no likelihood keys at all rather than placeholder numbers.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from genmodels.data.loader import model_input
from genmodels.evaluation._common import evaluating, head, module_device, seeded_torch, split_of
from genmodels.evaluation.completion import completion_figures, visible_rows
from genmodels.models import weights_digest
from genmodels.models.base import GenerativeModel

#: k used when neither the caller nor the model's config names one.
DEFAULT_IWAE_K = 1000

#: Where :func:`likelihood_metrics` keeps its running sums in a ``progress`` storage.
PROGRESS_KEY = "likelihood-progress.json"

#: What the saved sums mean: raise it whenever a change of this code changes them (2: the ELBO
#: against a fitted latent mixture), so a record of the old computation is not resumed, or
#: returned whole for a finished pass, as if it were today's.
PROGRESS_FORMAT = 2


class LikelihoodPassPaused(Exception):
    """A resumable likelihood pass stopped at its deadline with ``done`` of its ``total`` images
    scored and written to its progress record: the same call goes on from there."""

    def __init__(self, done: int, total: int):
        super().__init__(f"likelihood pass paused after {done} of {total} images")
        self.done, self.total = done, total


def bits_per_dim(nats_per_image: float, dims: int) -> float:
    """Convert a per-image negative log-likelihood in nats to bits per dimension."""
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    return nats_per_image / (dims * math.log(2.0))


def is_latent_variable_model(model: Any) -> bool:
    """Whether ``model`` follows the VAE contract (encode/decode/elbo/iwae/reconstruct)."""
    return all(callable(getattr(model, name, None)) for name in ("elbo", "iwae", "reconstruct"))


def likelihood_metrics(
    model: GenerativeModel,
    snapshot,
    split: str = "test",
    max_examples: int | None = None,
    batch_size: int = 256,
    iwae_k: int | None = None,
    seed: int = 0,
    progress=None,
    deadline: float | None = None,
) -> dict[str, float]:
    """Likelihood metrics of ``model`` on the first ``max_examples`` images of ``split``.

    Keys (empty dict for a family without a likelihood):
    - ``nll_nats``: mean -log p(x) per image; for VAEs -IWAE(k), the tightest estimate here;
    - ``bits_per_dim``: the same per dimension in bits;
    - VAEs only: ``elbo_nats`` and ``iwae_k{k}_nats`` (the bounds themselves, i.e. log-
      likelihood lower bounds, negative numbers, both against the prior the NLL's model samples:
      a fitted latent mixture's, whose ELBO is the mean of the IWAE's log-weights), ``elbo_bits_per_dim``
      (the ELBO's NLL bound in bits/dim) and ``recon_mse`` (per-pixel squared error of ``reconstruct(x)``);
    - families that complete (PixelRNN, mixture): ``completion_nll_nats``,
      ``completion_bits_per_dim`` and ``completion_examples`` of the hidden bottom half given
      the visible top half (:func:`genmodels.evaluation.completion.completion_figures`), scored
      with log p(x) in the same pass;
    - ``likelihood_examples``: how many images were scored;
    - ``likelihood_seconds``: the time spent scoring them, summed over the calls of a resumed
      pass (a k=5000 pass runs across several; the time between them not counted); absent when
      the pass resumed a record that did not keep its time.

    ``seed`` fixes the VAE's Monte-Carlo draws: batch ``b`` draws from torch's global RNG
    seeded by (seed, b), forked so the caller's stream is untouched, so a batch's estimate does
    not depend on which batches ran before it in this process.

    ``progress`` (a storage, optional) makes a long evaluation resumable: the running sums are
    written to ``PROGRESS_KEY`` there after every batch, and a later call with the same weights,
    split, examples, batch size, k and seed continues after the last batch written (IWAE with
    k=5000 on 10k test images takes hours on 2 CPU cores). A record of other settings or other
    weights is ignored and replaced.

    ``deadline`` (a :func:`time.monotonic` instant; needs ``progress``) bounds the call: after the
    batch that crosses it, with batches left, the pass raises :class:`LikelihoodPassPaused`. At
    least one batch runs per call, so calls on a budget always get through.
    """
    if not model.has_likelihood:
        return {}
    if deadline is not None and progress is None:
        raise ValueError("a likelihood pass with a deadline needs a progress storage: without one, "
                         "the batches scored before the pause would be lost")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    image = model.image
    if image.shape != snapshot.image.shape or image.levels != snapshot.image.levels:
        raise ValueError(
            f"model images {image.shape} with {image.levels} levels do not match snapshot "
            f"{snapshot.image.shape} with {snapshot.image.levels} levels"
        )
    data = split_of(snapshot, split)
    data = head(data, max_examples)
    n = len(data.y)
    x_all = model_input(data, image)
    y_all = torch.as_tensor(data.y, dtype=torch.long)
    if n == 0:
        raise ValueError(f"split {split!r} is empty")

    latent = is_latent_variable_model(model)
    k = None
    if latent:
        k = iwae_k if iwae_k is not None else getattr(model.config, "iwae_k", None) or DEFAULT_IWAE_K
        if k < 1:
            raise ValueError(f"iwae_k must be >= 1, got {k}")

    completes = model.can_complete and not latent
    known = visible_rows(image) if completes else None
    sums, start, settings = {"log_px": 0.0, "elbo": 0.0, "sq_err": 0.0, "log_top": 0.0}, 0, None
    # Scoring the batches summed so far, in this call and the ones it resumes; None: unknown (a
    # record written before the time was kept), and then not reported rather than undercounted.
    seconds: float | None = 0.0
    device = module_device(model)
    if progress is not None:  # the weights' digest is only needed to match a saved record
        # The device too: the IWAE's draws come from its generator, so batches drawn on a CPU and
        # on a GPU would sum to a figure neither gives.
        settings = {"format": PROGRESS_FORMAT, "weights": weights_digest(model), "snapshot": getattr(snapshot, "hash", None), "split": split,
                    "examples": n, "batch_size": batch_size, "iwae_k": k, "seed": seed, "completion_rows": known,
                    "device": device.type}
        record = progress.get_json(PROGRESS_KEY) if progress.exists(PROGRESS_KEY) else {}
        # A record holding NaN sums (written before they stopped the pass) is no progress.
        if record.get("settings") == settings and not any(math.isnan(v) for v in record["sums"].values()):
            sums, start = record["sums"], record["next"]
            seconds = record.get("seconds")

    with evaluating(model):
        for start in range(start, n, batch_size):
            batch_began = time.perf_counter()
            x = x_all[start : start + batch_size].to(device)
            labels = y_all[start : start + batch_size].to(device) if model.conditional else None
            with seeded_torch(batch_seed(seed, start // batch_size)):
                if latent:
                    # The IWAE bound is the likelihood estimate, so it is computed once and
                    # used both as iwae_k{k} and as the NLL.
                    # The ELBO of the model whose NLL this is: against its latent mixture when it
                    # samples one (no closed-form KL: the mean log-weight of the same draws), else
                    # the training objective's closed form.
                    if getattr(model.config, "latent_mixture", 0):
                        log_px, elbo = model.iwae(x, labels, k=k, with_elbo=True)
                    else:
                        log_px, elbo = model.iwae(x, labels, k=k), model.elbo(x, labels)
                    sums["log_px"] += float(log_px.double().sum())
                    sums["elbo"] += float(elbo.double().sum())
                    sums["sq_err"] += float((model.reconstruct(x, labels) - x).double().pow(2).sum())
                elif completes:
                    log_px, log_top = model.log_likelihood_and_marginal(x, known, labels)
                    sums["log_px"] += float(log_px.double().sum())
                    sums["log_top"] += float(log_top.double().sum())
                else:
                    sums["log_px"] += float(model.log_likelihood(x, labels).double().sum())
            done = min(start + batch_size, n)
            if any(math.isnan(v) for v in sums.values()):
                # Found at the batch, not after hours of the others, and never recorded as progress.
                raise FloatingPointError(f"the likelihood of the {model.family} model is NaN in {split} images "
                                         f"{start}..{done - 1}")
            if seconds is not None:
                seconds += time.perf_counter() - batch_began
            if progress is not None:
                progress.put_json(PROGRESS_KEY, {"settings": settings, "sums": sums, "next": done, "seconds": seconds})
            if deadline is not None and done < n and time.monotonic() >= deadline:
                raise LikelihoodPassPaused(done, n)

    nll = -sums["log_px"] / n
    out = {"nll_nats": nll, "bits_per_dim": bits_per_dim(nll, image.dims), "likelihood_examples": float(n)}
    if seconds is not None:
        out["likelihood_seconds"] = seconds
    if latent:
        elbo = sums["elbo"] / n
        out[f"iwae_k{k}_nats"] = -nll
        out["elbo_nats"] = elbo
        out["elbo_bits_per_dim"] = bits_per_dim(-elbo, image.dims)
        out["recon_mse"] = sums["sq_err"] / (n * image.dims)
    if completes:
        out.update(completion_figures(sums["log_top"] - sums["log_px"], n, image))
    # inf is a legitimate answer (an image the model gives probability 0); NaN is a bug.
    for name, value in out.items():
        if math.isnan(value):
            raise FloatingPointError(f"likelihood metric {name} is NaN for the {model.family} model")
    return out


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch ``batch`` of a pass seeded by ``seed``: distinct streams for
    distinct (seed, batch) pairs, any non-negative seed."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, np.uint64)[0])
