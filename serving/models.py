"""The served models of one sampling replica (the Api ingress, or a Sampler), plain Python without Serve (testable alone): load
the registry's champions, describe them, sample in batches, interpolate, analogies, complete,
hot reload. Every refusal is a :class:`serving.errors.RequestError`."""

from __future__ import annotations

import base64
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import RequestError

logger = logging.getLogger("ray.serve")

#: Cap of rows per onnxruntime call; a batch above it is split (memory stays bounded at any batch size).
MAX_ROWS_PER_CALL = 4096

#: Pillow modes accepted for each channel count: grey images for C=1 ("1" is 1-bit grey), RGB for
#: C=3. Alpha, palettes and 16-bit grey are refused rather than guessed at.
_PNG_MODES = {1: ("L", "1"), 3: ("RGB",)}
_MODE_NAMES = {"1": "1-bit grey", "L": "8-bit grey", "LA": "grey + alpha", "I;16": "16-bit grey",
               "I": "32-bit grey", "P": "palette", "RGB": "RGB", "RGBA": "RGB + alpha"}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(raw: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (its first, by the PNG spec), or None when the
    bytes do not start like a PNG; reads 24 bytes, decodes nothing."""
    if len(raw) < 24 or not raw.startswith(_PNG_SIGNATURE) or raw[12:16] != b"IHDR":
        return None
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def decode_png(data: str, shape: Sequence[int]) -> np.ndarray:
    """A base64 PNG -> float32 [C, H, W] in [0, 1] (8-bit values / 255), for a model of image
    ``shape`` (C, H, W); :class:`RequestError` 422 naming what was expected and what came."""
    import binascii
    import io

    from PIL import Image, UnidentifiedImageError

    channels, height, width = (int(v) for v in shape)
    try:
        # Line-wrapped base64 (as `base64` and MIME encoders write it) is still base64.
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, "invalid_image", "image must be a base64-encoded PNG: it is not valid base64") from None
    header = png_size(raw)
    if header is None:
        raise RequestError(422, "invalid_image", f"image must be a base64-encoded PNG: its {len(raw)} bytes "
                                                 "are not one")
    if header != (width, height):
        # From the IHDR chunk, before Pillow sees the data: a header claiming 30000x30000 is refused
        # here, not by Pillow's decompression-bomb check (an exception of its own, a 500).
        raise RequestError(422, "invalid_image", f"image must be {width}x{height} pixels (width x height) "
                                                 f"for this model, got {header[0]}x{header[1]}")
    try:
        picture = Image.open(io.BytesIO(raw), formats=["PNG"])
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise RequestError(422, "invalid_image", f"image must be a base64-encoded PNG: its {len(raw)} bytes "
                                                 "are not one") from None
    with picture:
        # Size and mode come from the header: checked before any pixel is decompressed.
        if picture.size != (width, height):
            raise RequestError(422, "invalid_image", f"image must be {width}x{height} pixels (width x height) "
                                                     f"for this model, got {picture.size[0]}x{picture.size[1]}")
        if picture.mode not in _PNG_MODES.get(channels, ()):
            want = {1: "grey (8-bit or 1-bit)", 3: "RGB (8 bits per channel, no alpha)"}.get(
                channels, f"{channels}-channel")
            got = _MODE_NAMES.get(picture.mode, picture.mode)
            raise RequestError(422, "invalid_image", f"image must be {want} for this model's {channels} "
                                                     f"channel(s), got {got} (PNG mode {picture.mode!r})")
        try:
            pixels = np.asarray(picture.convert("L") if picture.mode == "1" else picture, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
            raise RequestError(422, "invalid_image", f"image is a damaged PNG: {exc}") from None
    pixels = pixels.reshape(height, width, channels).transpose(2, 0, 1)
    return (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def _checked_labels(check: Callable[..., np.ndarray | None], labels: Any, n: int,
                    field: str = "labels") -> np.ndarray | None:
    """A request's labels through the sampler's check; its refusal is the request's 422, naming
    the request's ``field``."""
    try:
        return check(labels, n, field)
    except ValueError as exc:  # the check's refusals; anything else is this server's fault (a 500)
        raise RequestError(422, "invalid_labels", str(exc)) from None


def _finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    # NaN/inf are not JSON: a metric that could not be computed is left out rather than sent.
    return {k: float(v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float)) and math.isfinite(v)}


@dataclass
class SampleItem:
    """One validated sample request, bound to the model version it started on."""

    loaded: Any  # registry.LoadedSampler
    n: int
    seed: int
    labels: np.ndarray | None
    temperature: float
    images: np.ndarray | None = field(default=None, repr=False)
    #: Why ``images`` stayed None: the failure of this item's group in :meth:`ModelSet.run_batch`.
    error: Exception | None = None


class ModelSet:
    """The served models of one replica: load, describe, sample in batches, hot reload.

    ``self._models`` is replaced, never changed in place: a reload or a newly served model swaps
    that one reference. A request reads its model once, in :meth:`prepare`, and keeps that
    ``LoadedSampler`` to the end, so a reload never changes the version (or the images) of a
    request already under way.

    ``names`` None: every registered model with the alias, including those that get it later
    (found by :meth:`poll_once`); a list pins the served models.
    """

    def __init__(self, names: Sequence[str] | None, alias: str, tracking_uri: str | None,
                 intra_op_num_threads: int | None = None) -> None:
        from genmodels import registry

        registry.configure(tracking_uri)
        self.alias = alias
        self._threads = intra_op_num_threads
        self._pinned = bool(names)
        names = list(names) if names else registry.served_models(alias)
        if not names:
            raise ValueError(f"no registered model has a version with the alias {alias!r}: nothing to serve "
                             "(run `genmodels retrain` first, or name models that have one)")
        self._models: dict[str, Any] = {}
        failures: dict[str, Exception] = {}
        for name in names:
            # One model whose graphs cannot be loaded (missing, corrupt) must not keep the replica
            # from serving the others: a replica that raises here serves nothing and is restarted.
            try:
                self._models[name] = self._load(name)
            except Exception as exc:  # noqa: BLE001 - the reason is logged; poll_once tries again
                logger.error("%s@%s cannot be loaded; serving the other models, trying again every reload",
                             name, alias, exc_info=True)
                failures[name] = exc
        if not self._models:
            raise next(iter(failures.values()))
        #: Wanted but not loaded: :meth:`poll_once` tries them again (pinned or not). Replaced, never
        #: changed in place: request threads read it while the poller thread updates it.
        self._missing: frozenset[str] = frozenset(failures)
        self.onnx_calls = 0
        self.requests_sampled = 0
        # Batches of different models run in threads at once (serving.app.LocalSampling): `+=` on
        # the counters would lose counts between them.
        self._counting = threading.Lock()

    def _load(self, name: str):
        from genmodels import registry

        return registry.load_sampler(name, self.alias, intra_op_num_threads=self._threads)

    # --- what is served ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self) -> dict[str, str]:
        return {name: loaded.version for name, loaded in sorted(self._models.items())}

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for name, loaded in sorted(self._models.items()):
            s = loaded.sampler
            tags = loaded.tags or {}
            out.append({"name": name, "family": s.family, "version": loaded.version, "conditional": s.conditional,
                        "num_classes": s.num_classes, "image_shape": list(s.image_shape),
                        "can_complete": bool(s.can_complete), "completes_any_mask": bool(s.completes_any_mask),
                        "can_interpolate": "z" in s.noise_spec, "has_analogies": bool(s.has_analogies),
                        "dataset": tags.get("genmodels.dataset"), "preset": tags.get("genmodels.preset"),
                        "snapshot_hash": tags.get("genmodels.snapshot_hash"),
                        "registered_at": getattr(loaded, "registered_at", None),
                        "metrics": _finite_metrics(loaded.metrics)})
        return out

    def get(self, name: str):
        loaded = self._models.get(name)
        if loaded is None:
            missing = self._missing
            # The poller swaps a model in before it drops it from _missing: one that loaded since
            # the first look is served, not answered as unknown.
            loaded = self._models.get(name)
            if loaded is not None:
                return loaded
            if name in missing:
                raise RequestError(503, "model_unavailable", f"model {name!r} is served here but its "
                                                             f"{self.alias!r} version could not be loaded yet; "
                                                             "try again later")
            raise RequestError(404, "model_not_found", f"no served model {name!r}; served: {self.names}")
        return loaded

    # --- sampling -----------------------------------------------------------------------------
    def prepare(self, request: Mapping[str, Any]) -> SampleItem:
        """Validate a sample request against its model (raises :class:`RequestError`)."""
        loaded = self.get(request["model"])
        s = loaded.sampler
        n = int(request["n"])
        field = "label" if "label" in request else "labels"  # as the client named them (the grid: label)
        checked = _checked_labels(s.request_labels, request.get(field), n, field)
        return SampleItem(loaded, n, int(request["seed"]), checked, float(request["temperature"]))

    def run_batch(self, items: Sequence[SampleItem]) -> None:
        """Fill ``item.images`` for every item with as few onnxruntime calls as possible: items
        grouped by (model version, temperature), temperature being one scalar input of the
        graphs, each group in :meth:`genmodels.sampling.OnnxSampler.sample_many` calls of at
        most :data:`MAX_ROWS_PER_CALL` rows. A group that fails leaves its exception in
        ``item.error`` of its items still without images; the other groups are unaffected."""
        groups: dict[tuple[int, float], list[SampleItem]] = {}
        for item in items:
            groups.setdefault((id(item.loaded), item.temperature), []).append(item)
        for group in groups.values():
            # The items of a batch come from unrelated requests: one model's runtime failure (a graph
            # that loads but cannot run) must fail its own requests only.
            try:
                self._run_group(group)
            except Exception as exc:  # noqa: BLE001 - the requests of this group answer it (a 500)
                loaded = group[0].loaded
                logger.error("sampling %s v%s failed for %d request(s) of its batch: %r", loaded.name,
                             loaded.version, len(group), exc)
                for it in group:
                    if it.images is None:
                        it.error = exc
        with self._counting:
            self.requests_sampled += len(items)

    def _run_group(self, group: list[SampleItem]) -> None:
        from genmodels.sampling import Request

        sampler, temperature = group[0].loaded.sampler, group[0].temperature
        start = 0
        while start < len(group):
            # Chunks of whole requests up to MAX_ROWS_PER_CALL rows (a single request may exceed it).
            chunk, rows = [], 0
            while start < len(group) and (not chunk or rows + group[start].n <= MAX_ROWS_PER_CALL):
                chunk.append(group[start])
                rows += group[start].n
                start += 1
            images = sampler.sample_many([Request(it.n, it.seed, it.labels) for it in chunk], temperature)
            with self._counting:
                self.onnx_calls += 1
            for it, out in zip(chunk, images):
                it.images = out

    def interpolate(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Images along the slerp between seed_a's and seed_b's latent points, both ends exactly
        those two samples (a VAE/CVAE with a latent mixture: between the two samples' latents,
        through its ``latent`` and ``decode`` graphs; otherwise the noise ``z``):
        :meth:`genmodels.sampling.OnnxSampler.interpolate`."""
        loaded = self.get(request["model"])
        s = loaded.sampler
        if "z" not in s.noise_spec:
            raise RequestError(422, "not_a_latent_model",
                               f"the {s.family} family has no latent 'z' to interpolate in (latent families: "
                               "vae, cvae, gan)")
        steps = int(request["steps"])
        labels = _checked_labels(s.check_labels, request.get("label"), steps, "label")
        images = s.interpolate(request["seed_a"], request["seed_b"], steps, labels, float(request["temperature"]))
        return {"model": loaded.name, "version": loaded.version, "seed_a": request["seed_a"],
                "seed_b": request["seed_b"], "images": images}

    def analogies(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{model, image (base64 PNG), label}`` -> the image's style drawn in every class:
        ``{model, version, label, images}`` with images float32 [num_classes, C, H, W]."""
        loaded = self.get(request["model"])
        s = loaded.sampler
        if not s.has_analogies:
            why = ("this version was exported before CVAEs had an analogies graph: export and register it again"
                   if s.family == "cvae" else f"the {s.family} family has none: style analogies need a "
                                              "conditional VAE (family cvae)")
            raise RequestError(422, "no_analogies", f"{request['model']} v{loaded.version} has no analogies "
                                                    f"graph ({why})")
        labels = _checked_labels(s.check_labels, request["label"], 1, "label")
        x = decode_png(request["image"], s.image_shape)
        images = s.analogies(x[None], labels)[0]
        return {"model": loaded.name, "version": loaded.version, "label": int(labels[0]), "images": images}

    def complete(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{model, image, known_rows | mask, n, seed, temperature, labels}`` -> ``{model, version,
        seed, images}`` with images float32 [n, C, H, W]: n draws of the unknown pixels given the
        known ones (PixelRNN: the rows above ``known_rows``; mixture: any mask, white = known)."""
        loaded = self.get(request["model"])
        s = loaded.sampler
        if not s.can_complete:
            why = (f"the {s.family} family has no exact completion: pixelrnn (known rows) and mixture (any mask) "
                   "do" if s.family != "mixture" else "this version was exported before mixtures had a complete "
                                                      "graph: export and register it again")
            raise RequestError(422, "no_completion", f"{request['model']} v{loaded.version} cannot complete "
                                                     f"images ({why})")
        rows, mask_png = request.get("known_rows"), request.get("mask")
        if (rows is None) == (mask_png is None):
            raise RequestError(422, "invalid_known", "give exactly one of known_rows (the number of known rows "
                                                     "from the top) and mask (a PNG, white = known), got "
                                                     f"{'both' if rows is not None else 'neither'}")
        channels, height, width = s.image_shape
        if mask_png is not None and not s.completes_any_mask:
            raise RequestError(422, "invalid_known", f"the {s.family} family completes after known rows only: "
                                                     "send known_rows; a mask needs a mixture model")
        x = decode_png(request["image"], s.image_shape)
        if rows is not None:
            if not 1 <= int(rows) <= height - 1:
                raise RequestError(422, "invalid_known", f"known_rows must be in [1, {height - 1}] for this "
                                                         f"model's {height} rows, got {rows}")
            known: Any = int(rows)
        else:
            try:
                known = decode_png(mask_png, (1, height, width))[0] >= 0.5
            except RequestError as exc:
                raise RequestError(422, "invalid_mask", exc.detail.replace("image", "mask", 1)) from None
        labels = _checked_labels(s.check_labels, request.get("labels"), 1)
        images = s.complete(x[None], known, int(request["n"]), int(request["seed"]),
                            float(request["temperature"]), labels)[0]
        return {"model": loaded.name, "version": loaded.version, "seed": int(request["seed"]), "images": images}

    # --- hot reload ---------------------------------------------------------------------------
    def poll_once(self) -> list[str]:
        """Load every model whose alias moved, every wanted model that failed to load before, and
        (unpinned) every model that newly has the alias, and swap it in; the names swapped or added."""
        from genmodels import registry

        swapped = []
        for name, loaded in self._models.items():
            try:
                current = registry.current_version(name, self.alias)
                if current is None or current == loaded.version:
                    continue  # alias removed: keep serving what we have rather than fail requests
                fresh = self._load(name)
            except Exception:  # registry briefly unreachable or locked: try again next tick
                logger.warning("reload of %s failed; still serving v%s", name, loaded.version, exc_info=True)
                continue
            self._models = {**self._models, name: fresh}  # the one swap: later requests see the new version
            swapped.append(name)
            logger.info("%s: serving v%s (was v%s)", name, fresh.version, loaded.version)
        wanted = set(self._missing)
        if not self._pinned:
            try:
                listed = registry.served_models(self.alias)
            except Exception:
                logger.warning("listing models with the alias %r failed; trying again next tick", self.alias,
                               exc_info=True)
            else:
                # A model that lost the alias since it failed to load is no longer wanted.
                wanted = {n for n in listed if n not in self._models}
        missing = set()
        for name in sorted(wanted):
            try:
                fresh = self._load(name)
            except Exception:
                logger.warning("loading %s failed; trying again next tick", name, exc_info=True)
                missing.add(name)
                continue
            self._models = {**self._models, name: fresh}
            swapped.append(name)
            logger.info("%s: now served (v%s)", name, fresh.version)
        self._missing = frozenset(missing)
        return swapped

    def close(self) -> None:
        """Nothing to release: the graphs live in onnxruntime's memory only (kept for callers
        that close what they open)."""
