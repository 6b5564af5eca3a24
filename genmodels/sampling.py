"""The sampler runtime over exported ONNX graphs, shared by online serving and bulk jobs.

:class:`OnnxSampler` loads the files :func:`genmodels.export.export_sampler` wrote (recognized
by their ``genmodels.*`` metadata, never by name) and samples from them with onnxruntime on
CPU. Noise comes from :func:`genmodels.noise.make_noise` with the spec stored in the graphs,
so image ``i`` of seed ``s`` is the image ``model.sample(..., seed=s)`` gives in torch,
whatever the batching: online, in a batch of other requests, or in one shard of a bulk job.

Families with a ``sampler`` graph run it once; the PixelRNN's step graphs are driven pixel by
pixel by :class:`OnnxPixelRNNSampler`, exactly as ``PixelRNN.sample_cached`` does in torch.
A CVAE's ``analogies`` graph (when exported) renders given images' style in every class. A
VAE's or CVAE's ``latent`` and ``decode`` graphs (exported for models with a latent mixture)
split the sampler at the latent, for interpolations that walk between two samples' latents.

This module imports neither torch models nor :mod:`genmodels.export` (which imports it), and
needs the ``onnx`` package only for :func:`read_metadata`: a serving image needs onnxruntime.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from genmodels.checks import check_labels_array, check_temperature, completion_mask_array, require_completion
from genmodels.noise import (
    NoiseField,
    check_seed,
    concat_noise,
    interpolation_ends,
    interpolation_noise,
    latent_walk,
    make_noise,
)

__all__ = ["OnnxPixelRNNSampler", "OnnxSampler", "Request", "categorical_inverse_cdf_np", "read_metadata"]

META_PREFIX = "genmodels."
# Metadata every graph of one exported model carries with the same value; two files that
# disagree on one of these come from different models.
_MODEL_KEYS = ("family", "image", "conditional", "noise", "pixelrnn", "weights")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``genmodels.*`` metadata of an exported graph, keys without the prefix."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)}


def _session(path: str | Path, intra_op_num_threads: int | None = None):
    """An onnxruntime CPU session (``InferenceSession.run`` is safe to call from many threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_num_threads is not None:
        opts.intra_op_num_threads = int(intra_op_num_threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _session_metadata(session) -> dict[str, str]:
    # Read from the session rather than with onnx.load: the file is parsed once, and serving
    # needs no onnx package.
    props = session.get_modelmeta().custom_metadata_map
    return {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}


# --- PixelRNN runtime over the step graphs -----------------------------------------------------
def categorical_inverse_cdf_np(logits: np.ndarray, u: np.ndarray, temperature: float) -> np.ndarray:
    """numpy twin of ``pixelrnn.categorical_inverse_cdf`` (float64, unnormalized, same op order)."""
    z = logits.astype(np.float64) / float(temperature)
    cdf = np.cumsum(np.exp(z - z.max(axis=1, keepdims=True)), axis=1)
    below = cdf <= u.astype(np.float64)[:, None] * cdf[:, -1:]
    return np.minimum(below.sum(axis=1), logits.shape[1] - 1).astype(np.int64)


class OnnxPixelRNNSampler:
    """Samples a PixelRNN from its exported step graphs, mirroring ``PixelRNN.sample_cached``.

    Built from the files ``export_sampler`` wrote (recognized by their metadata). ``sample``
    takes the same noise (``u`` [n, C, H, W] uniform) and labels as the torch model and returns
    float32 images on the quantization grid. Keeps no per-call state: safe to share by threads.
    """

    def __init__(self, onnx_files: Sequence[str | Path], intra_op_num_threads: int | None = None) -> None:
        sessions: dict[str, Any] = {}
        meta = None
        for f in onnx_files:
            session = _session(f, intra_op_num_threads)
            m = _session_metadata(session)
            if m.get("family") != "pixelrnn":
                raise ValueError(f"{f}: not a PixelRNN graph (family={m.get('family')!r})")
            sessions[m["graph"]] = session
            if m["graph"] == "pixel_step":
                meta = m
        if meta is None:
            raise ValueError(f"no pixel_step graph among {[str(f) for f in onnx_files]}")
        self._init(sessions, meta)

    @classmethod
    def _from_sessions(cls, sessions: Mapping[str, Any], meta: Mapping[str, str]) -> OnnxPixelRNNSampler:
        self = cls.__new__(cls)
        self._init(dict(sessions), meta)
        return self

    def _init(self, sessions: dict[str, Any], meta: Mapping[str, str]) -> None:
        self.sessions = sessions
        self.image = json.loads(meta["image"])
        self.net = json.loads(meta["pixelrnn"])
        self.diagonal = self.net["directions"] == 2
        missing = [g for g in self.needed_graphs(self.net) if g not in self.sessions]
        if missing:
            raise ValueError(f"PixelRNN ONNX files lack the graph(s) {missing}")
        self.input_pad = self._input_pad(self.sessions["pixel_step"])
        # Graphs of a model with a position bias read the pixel's raster index; the graph says.
        self.positional = any(i.name == "pixel" for i in self.sessions["pixel_step"].get_inputs())

    @staticmethod
    def _input_pad(pixel_step) -> tuple[int, int]:
        """``PixelRNNConfig.input_pad``, read from the ``pixel_step`` graph's ``window`` input
        ([batch, C, pad_h + 1, 2 * pad_w + 1]): the graph itself, not metadata whose keys changed over
        time (graphs exported before ``input_width`` existed carry none). Read once, at load, so that
        a malformed graph fails there with the other graph checks."""
        window = next(i for i in pixel_step.get_inputs() if i.name == "window")
        rows, cols = window.shape[2:]
        if not (isinstance(rows, int) and isinstance(cols, int) and cols % 2 == 1):
            raise ValueError(f"pixel_step graph: window input of shape {window.shape}, expected "
                             "[batch, C, pad_h + 1, 2 * pad_w + 1] with static rows and columns")
        return rows - 1, cols // 2

    @staticmethod
    def needed_graphs(net: Mapping[str, Any]) -> list[str]:
        return ["pixel_step"] + (["row_step"] if net["directions"] == 2 else []) + \
               (["conditioning"] if net["conditional"] else [])

    @property
    def conditional(self) -> bool:
        return self.net["conditional"]

    def _conditioning(self, labels: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        L, h, d = self.net["num_layers"], self.net["hidden_channels"], self.net["directions"]
        labels = check_labels_array(labels, n, family="pixelrnn", conditional=self.conditional,
                                    num_classes=self.image["num_classes"])
        if labels is None:
            return np.zeros((n, L, d, 4 * h), np.float32), np.zeros((n, self.net["head_hidden"]), np.float32)
        gate, head = self.sessions["conditioning"].run(None, {"labels": labels})
        return gate, head

    def sample(self, u: np.ndarray, labels: np.ndarray | None = None, temperature: float = 1.0) -> np.ndarray:
        u = np.asarray(u, dtype=np.float32)
        C, H, W = (self.image[k] for k in ("channels", "height", "width"))
        if u.ndim != 4 or u.shape[1:] != (C, H, W):
            raise ValueError(f"noise 'u' must be [n, {C}, {H}, {W}], got {u.shape}")
        check_temperature(temperature)
        # Nothing known, one sample per noise row: the one driver, as in PixelRNN.sample_cached.
        blank = np.zeros((u.shape[0], C, H, W), np.int64)
        return self.complete_prefix(blank, 0, u, labels, temperature)[:, 0]

    def complete_prefix(self, known: np.ndarray, prefix: int, u: np.ndarray, labels: np.ndarray | None = None,
                        temperature: float = 1.0) -> np.ndarray:
        """``PixelRNN.complete_prefix_cached`` over the step graphs: ``known`` int64 levels
        [B, C, H, W], of which the first ``prefix`` pixels in raster order are kept; noise row
        ``b * n + j`` of ``u`` [B * n, C, H, W] draws completion ``j`` of image ``b``. The
        states are warmed over the known pixels once per image (one step per known pixel),
        then repeated n times. Returns float32 [B, n, C, H, W] on the grid."""
        C, H, W, levels = (self.image[k] for k in ("channels", "height", "width", "levels"))
        B = known.shape[0]
        n = u.shape[0] // B
        gate_bias, head_bias = self._conditioning(labels, B)
        L, hid = self.net["num_layers"], self.net["hidden_channels"]
        pad_h, pad_w = self.input_pad
        step, f32 = self.sessions["pixel_step"], np.float32
        scale = f32(levels - 1)
        s: dict[str, np.ndarray] = {"canvas": np.zeros((B, C, H + pad_h, W + 2 * pad_w), f32),
                                    "out": known.astype(np.int64), "gate_bias": gate_bias, "head_bias": head_bias}
        # Row buffers [B, L, W, h], as in PixelRNN._drive_cached: a pixel's column is runs of h floats.
        if self.diagonal:
            s["above_h"] = np.zeros((B, L, W, hid), f32)
            s["rl_above"] = np.zeros((B, L, W, hid), f32)
        else:
            s["above_h"] = np.zeros((B, L, W + 2, hid), f32)
            s["above_c"] = np.zeros((B, L, W, hid), f32)
        expanded = False

        def expand() -> None:
            for key, value in s.items():
                s[key] = np.repeat(value, n, axis=0)

        for i in range(H):
            rows = s["above_h"].shape[0]
            s["row_h"] = np.zeros_like(s["above_h"])
            if self.diagonal:
                s["left_h"] = np.zeros((rows, L, hid), f32)
                s["left_c"] = np.zeros((rows, L, hid), f32)
                s["row_inp"] = np.zeros((rows, L, W, hid), f32)
            else:
                s["row_c"] = np.zeros_like(s["above_c"])
                s["left_inp"] = np.zeros((rows, L, hid), f32)
            for j in range(W):
                is_known = i * W + j < prefix
                if not is_known and not expanded:
                    expand()
                    expanded = True
                canvas = s["canvas"]
                if is_known:
                    canvas[:, :, i + pad_h, j + pad_w] = (s["out"][:, :, i, j].astype(f32) / scale) * 2.0 - 1.0
                for ch in range(1 if is_known else C):
                    window = np.ascontiguousarray(canvas[:, :, i : i + pad_h + 1, j : j + 2 * pad_w + 1])
                    if self.diagonal:
                        feeds = {"window": window, "left_h": s["left_h"], "left_c": s["left_c"],
                                 "above_h": np.ascontiguousarray(s["above_h"][:, :, j]),
                                 "rl_above": np.ascontiguousarray(s["rl_above"][:, :, j]),
                                 "gate_bias": s["gate_bias"], "head_bias": s["head_bias"]}
                    else:
                        above_h = s["above_h"][:, :, j : j + 3].transpose(0, 1, 3, 2)  # the graph's [B, L, h, 3]
                        feeds = {"window": window, "above_h": np.ascontiguousarray(above_h),
                                 "above_c": np.ascontiguousarray(s["above_c"][:, :, j]), "left_inp": s["left_inp"],
                                 "gate_bias": s["gate_bias"], "head_bias": s["head_bias"]}
                    if self.positional:
                        feeds["pixel"] = np.array(i * W + j, np.int64)
                    logits, h, c, inp = step.run(None, feeds)
                    if not is_known:
                        level = categorical_inverse_cdf_np(logits[:, :, ch], u[:, ch, i, j], temperature)
                        s["out"][:, ch, i, j] = level
                        canvas[:, ch, i + pad_h, j + pad_w] = (level.astype(f32) / scale) * 2.0 - 1.0
                if self.diagonal:
                    s["left_h"], s["left_c"] = h, c
                    s["row_h"][:, :, j] = h
                    s["row_inp"][:, :, j] = inp
                else:
                    s["left_inp"] = inp
                    s["row_h"][:, :, j + 1] = h
                    s["row_c"][:, :, j] = c
            s["above_h"] = s["row_h"]
            if self.diagonal:
                if i + 1 < H:
                    across = (0, 1, 3, 2)  # the graph's rows are [B, L, h, W]
                    (rl_above,) = self.sessions["row_step"].run(None, {
                        "row_inp": np.ascontiguousarray(s["row_inp"].transpose(across)),
                        "rl_above": np.ascontiguousarray(s["rl_above"].transpose(across)),
                        "gate_bias": s["gate_bias"]})
                    s["rl_above"] = np.ascontiguousarray(rl_above.transpose(across))
            else:
                s["above_c"] = s["row_c"]
        if not expanded:
            expand()
        return (s["out"].astype(f32) / scale).astype(f32).reshape(B, n, C, H, W)


# --- the one runtime for every family ----------------------------------------------------------
class Request(NamedTuple):
    """One sampling request: images ``start .. start+n-1`` of ``seed`` (labels: None, one class
    or one per image)."""

    n: int
    seed: int
    labels: Any = None
    start: int = 0


def _count(value: Any, name: str, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class OnnxSampler:
    """Samples any family from its exported ONNX graphs with onnxruntime (CPU).

    ``OnnxSampler(files)`` or ``OnnxSampler.from_dir(directory)``. Safe to share between
    threads: sessions are read-only and every call keeps its state in locals.
    """

    def __init__(self, onnx_files: Sequence[str | Path], intra_op_num_threads: int | None = None) -> None:
        files = [Path(f) for f in onnx_files]
        if not files:
            raise ValueError("OnnxSampler needs at least one .onnx file, got none")
        sessions: dict[str, Any] = {}
        where: dict[str, Path] = {}
        meta: dict[str, str] | None = None
        first: Path | None = None
        for f in files:
            try:
                session = _session(f, intra_op_num_threads)
            except Exception as exc:  # not an ONNX model at all
                raise ValueError(f"{f}: onnxruntime cannot load it as an ONNX graph ({exc})") from exc
            m = _session_metadata(session)
            if "family" not in m or "graph" not in m:
                raise ValueError(f"{f}: not a genmodels graph (no genmodels.family/genmodels.graph metadata)")
            if meta is None:
                meta, first = m, f
            else:
                for key in _MODEL_KEYS:
                    if key in m and key in meta and m[key] != meta[key]:
                        what = "families are mixed" if key == "family" else f"their {key!r} metadata differs"
                        raise ValueError(f"{f} and {first} are graphs of different models ({what}: "
                                         f"{m[key]!r} vs {meta[key]!r})")
            graph = m["graph"]
            if graph in sessions:
                raise ValueError(f"{f} and {where[graph]} are both a {m['family']} {graph!r} graph; "
                                 f"keep one model's graphs per set of files")
            sessions[graph], where[graph] = session, f
        assert meta is not None
        self._sessions = sessions
        self._family = meta["family"]
        image = json.loads(meta["image"])
        self._image_shape = (int(image["channels"]), int(image["height"]), int(image["width"]))
        self._levels = int(image["levels"])
        self._num_classes = int(image["num_classes"])
        self._conditional = bool(json.loads(meta["conditional"]))
        self._noise_spec = {name: NoiseField(tuple(f["shape"]), f["distribution"])
                            for name, f in sorted(json.loads(meta["noise"]).items())}
        names = [str(f) for f in files]
        if self._family == "pixelrnn":
            pixel_meta = next((_session_metadata(s) for g, s in sessions.items() if g == "pixel_step"), None)
            if pixel_meta is None:
                raise ValueError(f"pixelrnn files {names} lack the 'pixel_step' graph")
            missing = [g for g in OnnxPixelRNNSampler.needed_graphs(json.loads(pixel_meta["pixelrnn"]))
                       if g not in sessions]
            if missing:
                raise ValueError(f"pixelrnn files {names} lack the graph(s) {missing}")
            self._pixelrnn: OnnxPixelRNNSampler | None = OnnxPixelRNNSampler._from_sessions(sessions, pixel_meta)
        else:
            if "sampler" not in sessions:
                raise ValueError(f"{self._family} files {names} lack the 'sampler' graph "
                                 f"(found {sorted(sessions)})")
            self._pixelrnn = None

    @classmethod
    def from_dir(cls, directory: str | Path, intra_op_num_threads: int | None = None) -> OnnxSampler:
        """All ``*.onnx`` files of ``directory`` (one model's graphs)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory}: not a directory")
        files = sorted(directory.glob("*.onnx"))
        if not files:
            raise ValueError(f"{directory}: no .onnx files there")
        return cls(files, intra_op_num_threads=intra_op_num_threads)

    @classmethod
    def from_bytes(cls, files: Mapping[str, bytes], intra_op_num_threads: int | None = None) -> OnnxSampler:
        """One model's graphs as ``{file name: bytes}`` (as :func:`genmodels.registry.fetch_graphs`
        gives them): written to a temporary folder only while onnxruntime reads them."""
        import os
        import tempfile

        if not files:
            raise ValueError("no graphs: give the model's ONNX graphs as {file name: bytes}")
        with tempfile.TemporaryDirectory(prefix="genmodels-graphs-") as tmp:
            paths = []
            for name, data in sorted(files.items()):
                path = os.path.join(tmp, os.path.basename(name) or "graph.onnx")
                with open(path, "wb") as f:
                    f.write(data)
                paths.append(path)
            return cls(paths, intra_op_num_threads=intra_op_num_threads)

    # --- what the model is ---------------------------------------------------------------
    @property
    def family(self) -> str:
        return self._family

    @property
    def conditional(self) -> bool:
        return self._conditional

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    @property
    def levels(self) -> int:
        return self._levels

    @property
    def noise_spec(self) -> dict[str, NoiseField]:
        return dict(self._noise_spec)

    @property
    def has_likelihood(self) -> bool:
        return "likelihood" in self._sessions

    @property
    def has_analogies(self) -> bool:
        return "analogies" in self._sessions

    @property
    def has_latent_walk(self) -> bool:
        """The ``latent`` and ``decode`` graphs of a VAE/CVAE with a latent mixture: interpolations
        walk between the two samples' latents (graphs exported before them walk the noise)."""
        return "latent" in self._sessions and "decode" in self._sessions

    @property
    def graphs(self) -> list[str]:
        return sorted(self._sessions)

    # --- sampling --------------------------------------------------------------------------
    def check_labels(self, labels: Any, n: int, field: str = "labels") -> np.ndarray | None:
        """None, one int for all ``n`` rows, or ``n`` ints in [0, num_classes) -> int64 [n]
        (:func:`genmodels.checks.check_labels_array`, the torch models' check too)."""
        return check_labels_array(labels, n, family=self._family, conditional=self._conditional,
                                  num_classes=self._num_classes, field=field)

    def request_labels(self, labels: Any, n: int, field: str = "labels") -> np.ndarray | None:
        """The labels of a request as the API and the MLflow model read it: :meth:`check_labels`,
        except that a conditional model asked without labels walks through the classes (image i
        gets class i % num_classes), so a grid of n >= num_classes images shows every class."""
        if labels is None and self._conditional:
            labels = np.arange(n, dtype=np.int64) % self._num_classes
        return self.check_labels(labels, n, field)

    def _check_noise(self, noise: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        missing = sorted(set(self._noise_spec) - set(noise))
        extra = sorted(set(noise) - set(self._noise_spec))
        if missing or extra:
            raise ValueError(f"{self._family} noise needs fields {sorted(self._noise_spec)}, got {sorted(noise)}")
        out: dict[str, np.ndarray] = {}
        sizes = set()
        for name, field in self._noise_spec.items():
            arr = np.ascontiguousarray(np.asarray(noise[name], dtype=np.float32))
            if arr.ndim != 1 + len(field.shape) or arr.shape[1:] != tuple(field.shape):
                raise ValueError(f"noise {name!r} must be [n, {', '.join(map(str, field.shape))}], got {arr.shape}")
            out[name] = arr
            sizes.add(arr.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"noise fields disagree on the batch size: { {k: v.shape[0] for k, v in out.items()} }")
        return out, sizes.pop()

    def sample_from_noise(self, noise: Mapping[str, Any], labels: Any = None, temperature: float = 1.0) -> np.ndarray:
        """Images float32 [n, C, H, W] from explicit noise (the fields of ``noise_spec``,
        float32 [n, *shape]); a pure function of (graphs, noise, labels, temperature)."""
        check_temperature(temperature)
        arrays, n = self._check_noise(noise)
        checked = self.check_labels(labels, n)
        if n == 0:  # some kernels reject empty batches; the answer is known
            return np.zeros((0, *self._image_shape), np.float32)
        if self._pixelrnn is not None:
            return self._pixelrnn.sample(arrays["u"], checked, float(temperature))
        feeds: dict[str, np.ndarray] = dict(arrays)
        if checked is not None:
            feeds["labels"] = checked
        feeds["temperature"] = np.asarray(temperature, np.float32)
        (images,) = self._sessions["sampler"].run(["images"], feeds)
        return np.asarray(images, dtype=np.float32)

    def sample(self, n: int, seed: int, labels: Any = None, temperature: float = 1.0, start: int = 0) -> np.ndarray:
        """Images ``start .. start+n-1`` of ``seed``: the same as ``model.sample(n, labels,
        seed=seed, temperature=temperature, start=start)`` in torch, whatever the batching."""
        return self.sample_many([Request(n, seed, labels, start)], temperature)[0]

    def sample_many(self, requests: Sequence[Request], temperature: float = 1.0) -> list[np.ndarray]:
        """Several requests in one graph call, each getting exactly the images :meth:`sample`
        gives it alone: each draws its own seed's noise, and samplers are row-independent, so
        sampling the concatenation once changes no image. How the serving API batches."""
        checked = [(_count(r.n, "n", 1), _count(r.start, "start", 0), check_seed(r.seed)) for r in requests]
        check_temperature(temperature)
        if not checked:
            return []
        # Labels before noise: a bad request fails before paying for the noise.
        labels = [self.check_labels(r.labels, n) for r, (n, _, _) in zip(requests, checked)]
        counts = [n for n, _, _ in checked]
        parts = [make_noise(self._noise_spec, seed, n, start=start) for n, start, seed in checked]
        noise = concat_noise(parts)
        images = self.sample_from_noise(noise, np.concatenate(labels) if self._conditional else None, temperature)
        return np.split(images, np.cumsum(counts)[:-1])

    def interpolate(self, seed_a: int, seed_b: int, steps: int, labels: Any = None,
                    temperature: float = 1.0) -> np.ndarray:
        """Images float32 [steps, C, H, W] along the slerp between sample 0 of ``seed_a`` and of
        ``seed_b`` (VAE, CVAE, GAN): ``genmodels.evaluation.pictures.interpolate`` in torch; the
        ends are those two samples. With the ``latent`` and ``decode`` graphs (a VAE/CVAE with a
        latent mixture) the walk is between the two samples' latents (each seed's own mixture
        component), decoded point by point; otherwise it is the slerp of the noise ``z``, other
        noise fields switching from seed_a's to seed_b's halfway
        (:func:`genmodels.noise.interpolation_noise`), as graphs exported before the split walk."""
        if "z" not in self._noise_spec:
            raise NotImplementedError(f"the {self._family} family has no latent 'z' to interpolate in "
                                      "(latent families: vae, cvae, gan)")
        steps = _count(steps, "steps", 2)
        checked = self.check_labels(labels, steps)
        seed_a, seed_b = check_seed(seed_a), check_seed(seed_b)
        if not self.has_latent_walk:
            noise = interpolation_noise(self._noise_spec, seed_a, seed_b, steps)
            return self.sample_from_noise(noise, checked, temperature)
        check_temperature(temperature)
        feeds: dict[str, np.ndarray] = dict(interpolation_ends(self._noise_spec, seed_a, seed_b, steps))
        if checked is not None:
            feeds["labels"] = checked[[0, -1]]  # the ends' labels
        feeds["temperature"] = np.asarray(temperature, np.float32)
        (z,) = self._sessions["latent"].run(["latent"], feeds)
        feeds = {"latent": np.ascontiguousarray(latent_walk(z[0], z[1], steps), dtype=np.float32)}
        if checked is not None:
            feeds["labels"] = checked
        (images,) = self._sessions["decode"].run(["images"], feeds)
        return np.asarray(images, dtype=np.float32)

    # --- likelihood ------------------------------------------------------------------------
    def log_likelihood(self, x: Any) -> np.ndarray:
        """log p(x) in nats per image, float64 [n], for images on the quantization grid."""
        if "likelihood" not in self._sessions:
            raise NotImplementedError(f"these {self._family} graphs have no likelihood graph "
                                      f"(exported: {sorted(self._sessions)})")
        arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if arr.ndim != 4 or arr.shape[1:] != self._image_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self._image_shape))}], got {arr.shape}")
        if not (np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1).all()):
            raise ValueError("x must hold values in [0, 1] (grid values k/(levels-1))")
        if arr.shape[0] == 0:
            return np.zeros(0, np.float64)
        (logp,) = self._sessions["likelihood"].run(None, {"x": arr})
        return np.asarray(logp, dtype=np.float64)

    # --- analogies ---------------------------------------------------------------------------
    def analogies(self, x: Any, labels: Any) -> np.ndarray:
        """float32 [n, num_classes, C, H, W]: image ``x[i]`` (of class ``labels[i]``) encoded, and
        its posterior mean decoded with every class label in turn (``CVAE.analogies`` in torch).

        ``x`` [n, C, H, W] holds values in [0, 1]; they are rounded onto the model's grid
        k/(levels-1) first, as training images were, so that 8-bit PNG values or a binary
        model's grey input get what the encoder saw in training. ``labels``: one int or n ints.
        """
        if "analogies" not in self._sessions:
            why = ("this cvae was exported without it: export it again" if self._family == "cvae"
                   else "style analogies need a conditional VAE (family cvae)")
            raise NotImplementedError(f"these {self._family} graphs have no analogies graph ({why}; "
                                      f"exported: {sorted(self._sessions)})")
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1:] != self._image_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self._image_shape))}], got {arr.shape}")
        if not (np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1).all()):
            raise ValueError("x must hold values in [0, 1]")
        n = arr.shape[0]
        checked = self.check_labels(labels, n)
        if n == 0:
            return np.zeros((0, self._num_classes, *self._image_shape), np.float32)
        scale = np.float32(self._levels - 1)
        arr = np.ascontiguousarray(np.rint(arr * scale) / scale, dtype=np.float32)
        (images,) = self._sessions["analogies"].run(["images"], {"x": arr, "labels": checked})
        return np.asarray(images, dtype=np.float32)

    # --- completion --------------------------------------------------------------------------
    @property
    def can_complete(self) -> bool:
        """PixelRNN (from its step graphs) and a mixture exported with its ``complete`` graph."""
        return self._family == "pixelrnn" or "complete" in self._sessions

    @property
    def completes_any_mask(self) -> bool:
        return self._family == "mixture"

    def completion_mask(self, known: Any) -> np.ndarray:
        """``known`` rows or a bool mask [H, W] (mixture) -> bool [H, W], True = known; the
        torch models' check (:func:`genmodels.checks.completion_mask_array`)."""
        if self._family == "mixture" and "complete" not in self._sessions:
            raise NotImplementedError(f"these mixture graphs have no complete graph (exported before "
                                      f"completion existed: export again; exported: {sorted(self._sessions)})")
        require_completion(self._family, self.can_complete)
        _, h, w = self._image_shape
        return completion_mask_array(known, family=self._family, height=h, width=w,
                                     any_mask=self.completes_any_mask)

    def complete_from_noise(self, x: Any, known: Any, noise: Mapping[str, Any], labels: Any = None,
                            temperature: float = 1.0) -> np.ndarray:
        """Completions float32 [B, n, C, H, W] of images ``x`` [B, C, H, W] (values in [0, 1],
        rounded to the grid): noise row ``b * n + j`` draws completion ``j`` of image ``b``.
        The same as ``model.complete_from_noise`` in torch, level for level."""
        mask = self.completion_mask(known)
        check_temperature(temperature)
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1:] != self._image_shape or arr.shape[0] < 1:
            raise ValueError(f"x must be [B >= 1, {', '.join(map(str, self._image_shape))}], got {arr.shape}")
        if not (np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 1).all()):
            raise ValueError("x must hold values in [0, 1]")
        arrays, m = self._check_noise(noise)
        b = arr.shape[0]
        if m % b or m == 0:
            raise ValueError(f"noise rows ({m}) must be a positive multiple of the {b} image(s): n per image")
        n = m // b
        checked = self.check_labels(labels, b)
        scale = np.float32(self._levels - 1)
        levels = np.rint(arr * scale).astype(np.int64)
        if self._pixelrnn is not None:
            prefix = int(mask[:, 0].sum()) * self._image_shape[2]
            return self._pixelrnn.complete_prefix(levels, prefix, arrays["u"], checked, float(temperature))
        rows = np.repeat((levels.astype(np.float32) / scale).astype(np.float32), n, axis=0)
        known_rows = np.broadcast_to(mask, (m, *self._image_shape)).astype(np.float32)
        feeds: dict[str, np.ndarray] = {"x": rows, "known": known_rows, **arrays}
        if checked is not None:
            feeds["labels"] = np.repeat(checked, n)
        feeds["temperature"] = np.asarray(temperature, np.float32)
        (images,) = self._sessions["complete"].run(["images"], feeds)
        return np.asarray(images, dtype=np.float32).reshape(b, n, *self._image_shape)

    def complete(self, x: Any, known: Any, n: int, seed: int, temperature: float = 1.0, labels: Any = None,
                 start: int = 0) -> np.ndarray:
        """``n`` completions of each image, as ``model.complete`` in torch: ``x`` [C, H, W] ->
        [n, C, H, W], [B, C, H, W] -> [B, n, C, H, W]; completion ``j`` uses noise stream
        ``start + j`` of ``seed`` whatever the batch."""
        self.completion_mask(known)  # a family without completion fails before anything else
        n = _count(n, "n", 1)
        start = _count(start, "start", 0)
        seed = check_seed(seed)
        check_temperature(temperature)
        arr = np.asarray(x, dtype=np.float32)
        single = arr.ndim == 3
        batch = arr[None] if single else arr
        b = batch.shape[0] if batch.ndim == 4 else 1
        noise = {k: np.tile(v, (b, *([1] * (v.ndim - 1))))
                 for k, v in make_noise(self._noise_spec, seed, n, start=start).items()}
        out = self.complete_from_noise(batch, known, noise, labels, temperature)
        return out[0] if single else out

    def __repr__(self) -> str:
        return (f"OnnxSampler(family={self._family!r}, image_shape={self._image_shape}, levels={self._levels}, "
                f"conditional={self._conditional}, graphs={self.graphs})")
