"""ONNX export of each family's sampler, and the parity check of those graphs against torch.

Graphs written (``torch.onnx.export(dynamo=True)``, dynamic batch axis everywhere):

- VAE, CVAE, GAN, mixture: ``sampler``: inputs = the noise fields of ``model.noise_spec()``
  (float32 [batch, *shape], sorted by name), ``labels`` (int64 [batch], conditional models
  only), ``temperature`` (float32 scalar); output ``images`` [batch, C, H, W].
- CVAE also: ``analogies``: inputs ``x`` (float32 [batch, C, H, W], on the quantization grid)
  and ``labels`` (int64 [batch]); output ``images`` [batch, num_classes, C, H, W]: each image's
  posterior mean decoded with every class label (``CVAE.analogies``).
- VAE, CVAE with a latent mixture also: ``latent``: the sampler's inputs (noise fields,
  ``labels`` if conditional, ``temperature``); output ``latent`` [batch, latent_dim]: the
  sampler's latent in the prior's standardized coordinates (``VAE.standardized_latent``: the
  mixture draw). And ``decode``: inputs ``latent`` (float32 [batch, latent_dim]) and ``labels``
  (conditional only); output ``images`` (``VAE.decode_standardized``: the class prior's mean
  and scale, then the decoder mean). ``sampler`` = ``decode`` of ``latent``; interpolations
  walk between two seeds' latents and decode the walk (``OnnxSampler.interpolate``).
- Mixture also: ``complete``: inputs ``x``, ``known`` (float32 [batch, C, H, W]; 1 = known
  pixel), the sampler's noise fields, ``labels`` (conditional only), ``temperature``; output
  ``images``: one completion per row (``MixtureModel.complete_rows``: the posterior over
  components given the known pixels, then the unknown pixels). An 8-bit mixture's graph holds
  its log P(level) table as a constant (D * 256 * classes * K float64).
- PixelRNN: its step graphs, which a runtime drives pixel by pixel exactly as
  ``PixelRNN.sample_cached`` does (:class:`genmodels.sampling.OnnxPixelRNNSampler`): ``pixel_step``,
  ``row_step`` (Diagonal BiLSTM only) and ``conditioning`` (class-conditional only: labels ->
  per-sample class biases; an unconditional model's biases are zeros). A model with a position
  bias has one more ``pixel_step`` input, ``pixel`` (int64 scalar: the raster index i * W + j);
  the runtime feeds it where the graph has it, so graphs exported before it still sample.
- ``likelihood`` (x [batch, C, H, W] -> log p(x) [batch]) where it exports cleanly: the
  unconditional PixelRNN. Not exported: VAE/CVAE (the IWAE estimate draws from torch's
  global RNG inside the graph), GAN (no likelihood), mixture (its float64 chunked path froze
  the batch size at export), conditional PixelRNN (its label checks read tensor values).

Every graph carries ``metadata_props``: ``genmodels.family``, ``genmodels.graph``, what a
runtime needs to rebuild the sampler's shapes (``genmodels.image``, ``genmodels.pixelrnn``),
and the sha256 of the weights (``genmodels.weights``), so that files are recognized by content,
never by name, and graphs of two models are never loaded as one.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genmodels.models import weights_digest
from genmodels.models.base import GenerativeModel, make_noise_tensors

# The runtime lives in genmodels.sampling (serving and bulk jobs use it without the exporter);
# re-exported here so that ``from genmodels.export import read_metadata`` keeps working.
from genmodels.sampling import OnnxPixelRNNSampler, OnnxSampler, read_metadata

__all__ = ["ExportError", "ExportParityError", "OnnxPixelRNNSampler", "check_parity", "export_sampler", "read_metadata"]

OPSET = 18


class ExportError(RuntimeError):
    """A model could not be exported as a graph fit to serve (e.g. its batch size froze)."""


class ExportParityError(AssertionError):
    """An exported graph disagrees with the torch model it was exported from."""


# --- wrappers: one nn.Module per graph, with plain positional tensor inputs -------------------
class _Sampler(nn.Module):
    """``model.<method>(noise, labels, temperature)`` on the sampler's inputs: ``sample_from_noise``
    (the ``sampler`` graph) or ``standardized_latent`` (a latent mixture's ``latent`` graph)."""

    def __init__(self, model: GenerativeModel, fields: Sequence[str], method: str = "sample_from_noise") -> None:
        super().__init__()
        self.model = model
        self.fields = tuple(fields)
        self.method = method

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        noise = dict(zip(self.fields, args[: len(self.fields)]))
        rest = args[len(self.fields):]
        labels = rest[0] if self.model.conditional else None
        return getattr(self.model, self.method)(noise, labels, rest[-1])


class _Analogies(nn.Module):
    """``CVAE._analogies``: the export path, without the label value checks of ``analogies``."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model._analogies(x, labels)


class _Decode(nn.Module):
    """``VAE.decode_standardized``: z (and labels) -> images."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.decode_standardized(args[0], args[1] if self.model.conditional else None)


class _MixtureComplete(nn.Module):
    """``MixtureModel.complete_rows``, with the 8-bit log P(level) table as a constant: the
    model's own table is a cache keyed by parameter versions, which tracing must not see."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model
        self.log_mass = None if model.binary else model._gaussian_tables()[0].clone()

    def forward(self, x: torch.Tensor, known: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        component, pixels = args[0], args[1]
        labels = args[2] if self.model.conditional else None
        return self.model.complete_rows(x, known, component, pixels, labels, args[-1], self.log_mass)


class _Likelihood(nn.Module):
    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_likelihood(x)


class _PixelStep(nn.Module):
    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # With a position bias the last input is the pixel's raster index (see _export_all).
        if self.model.config.position_bias:
            *states, pixel = states
            return self.model.pixel_step(window, *states, pixel=pixel)
        return self.model.pixel_step(window, *states)


class _RowStep(nn.Module):
    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, row_inp: torch.Tensor, rl_above: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
        return self.model.row_step(row_inp, rl_above, gate_bias)


class _Conditioning(nn.Module):
    """``PixelRNN.conditioning`` without its label value checks (they read tensor values)."""

    def __init__(self, model: GenerativeModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        return m.gate_class_bias[:, :, labels].permute(2, 0, 1, 3), m.head_class_bias[labels]


# --- export ------------------------------------------------------------------------------------
def _pixelrnn_meta(model: GenerativeModel) -> dict[str, Any]:
    cfg = model.config
    return {
        "layer": cfg.layer, "num_layers": cfg.num_layers, "hidden_channels": cfg.hidden_channels,
        "head_hidden": cfg.head_hidden, "input_kernel": cfg.input_kernel,
        "input_width": cfg.input_columns, "directions": model.directions,
        "conditional": bool(model.conditional), "position_bias": bool(cfg.position_bias),
    }


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: Any, meta: Mapping[str, str]) -> Path:
    import onnx

    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    # The exporter warns once per torchvision op it cannot register; none is used here.
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)
    proto = program.model_proto
    # A Python branch on the batch size freezes it silently; refuse such a graph here rather
    # than let a runtime fail on the first other batch size.
    frozen = [i.name for i in proto.graph.input
              if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if frozen:
        raise ExportError(f"{meta.get('genmodels.family')} graph {meta.get('genmodels.graph')!r}: export "
                           f"froze the batch axis of input(s) {frozen}; the graph would serve one batch size only")
    onnx.helper.set_model_props(proto, dict(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)  # a reader never sees a half-written graph
    return path


def _graph_paths(path_or_dir: str | Path, graphs: Sequence[str]) -> dict[str, Path]:
    """A directory gets ``<graph>.onnx``; a ``*.onnx`` path gets the first graph, and the others
    go beside it as ``<stem>.<graph>.onnx``."""
    p = Path(path_or_dir)
    if p.suffix != ".onnx":
        return {g: p / f"{g}.onnx" for g in graphs}
    return {g: p if i == 0 else p.with_name(f"{p.stem}.{g}.onnx") for i, g in enumerate(graphs)}


def export_sampler(model: GenerativeModel, path_or_dir: str | Path, likelihood: bool = True) -> list[Path]:
    """Export ``model``'s sampler graph(s) (and its likelihood graph where one exports cleanly);
    returns the files written. See the module docstring for the graphs of each family."""
    was_training = model.training
    model.eval()
    try:
        return _export_all(model, path_or_dir, likelihood)
    finally:
        model.train(was_training)


def _export_all(model: GenerativeModel, path_or_dir: str | Path, likelihood: bool) -> list[Path]:
    batch = torch.export.Dim("batch")
    img = model.image
    base = {
        "genmodels.family": model.family,
        "genmodels.image": json.dumps({"channels": img.channels, "height": img.height, "width": img.width,
                                       "levels": img.levels, "num_classes": img.num_classes}),
        "genmodels.conditional": json.dumps(bool(model.conditional)),
        # Which weights: graphs of two exports left in one folder must not load as one model.
        "genmodels.weights": weights_digest(model),
        # What a runtime needs to draw the same noise with genmodels.noise.make_noise.
        "genmodels.noise": json.dumps({name: {"shape": list(f.shape), "distribution": f.distribution}
                                       for name, f in sorted(model.noise_spec().items())}),
    }
    n = 2  # example batch; the batch axis is dynamic
    labels = torch.arange(n, dtype=torch.long) % max(img.num_classes, 1)
    x_example = torch.zeros(n, *img.shape)
    graphs: dict[str, tuple] = {}

    if model.family == "pixelrnn":
        meta = {**base, "genmodels.pixelrnn": json.dumps(_pixelrnn_meta(model))}
        cfg = model.config
        L, h, hh, C, W = cfg.num_layers, cfg.hidden_channels, cfg.head_hidden, img.channels, img.width
        pad_h, pad_w = cfg.input_pad
        window = torch.zeros(n, C, pad_h + 1, 2 * pad_w + 1)
        gate_bias = torch.zeros(n, L, model.directions, 4 * h)
        head_bias = torch.zeros(n, hh)
        if model.directions == 1:
            states = (torch.zeros(n, L, h, 3), torch.zeros(n, L, h), torch.zeros(n, L, h), gate_bias, head_bias)
            state_names = ["above_h", "above_c", "left_inp", "gate_bias", "head_bias"]
        else:
            states = (torch.zeros(n, L, h), torch.zeros(n, L, h), torch.zeros(n, L, h), torch.zeros(n, L, h),
                      gate_bias, head_bias)
            state_names = ["left_h", "left_c", "above_h", "rl_above", "gate_bias", "head_bias"]
        state_shapes = tuple({0: batch} for _ in states)
        if cfg.position_bias:
            # An int64 scalar, no batch axis: every row of a step is at the same pixel.
            states, state_names = (*states, torch.tensor(0)), [*state_names, "pixel"]
            state_shapes = (*state_shapes, None)
        # *states is one positional argument of forward: its shapes go in one extra tuple.
        graphs["pixel_step"] = (
            _PixelStep(model), (window, *states), ["window", *state_names], ["logits", "h", "c", "layer_inp"],
            ({0: batch}, state_shapes),
        )
        if model.directions == 2:
            row = torch.zeros(n, L, h, W)
            graphs["row_step"] = (
                _RowStep(model), (row, row.clone(), gate_bias), ["row_inp", "rl_above", "gate_bias"], ["rl_h"],
                ({0: batch}, {0: batch}, {0: batch}),
            )
        if model.conditional:
            graphs["conditioning"] = (
                _Conditioning(model), (labels,), ["labels"], ["gate_bias", "head_bias"], ({0: batch},),
            )
        if likelihood and not model.conditional:
            graphs["likelihood"] = (_Likelihood(model), (x_example,), ["x"], ["log_likelihood"], ({0: batch},))
    else:
        meta = base
        spec = model.noise_spec()
        fields = sorted(spec)
        noise = [torch.zeros(n, *spec[f].shape) for f in fields]
        args: list[torch.Tensor] = list(noise)
        names = list(fields)
        if model.conditional:
            args.append(labels)
            names.append("labels")
        args.append(torch.tensor(1.0))
        names.append("temperature")
        dyn = tuple([{0: batch}] * (len(args) - 1) + [None])
        graphs["sampler"] = (_Sampler(model, fields), tuple(args), names, ["images"], (dyn,))
        if model.family == "mixture":
            # The sampler's noise fields are exactly ("component", "pixels"), in that order.
            graphs["complete"] = (_MixtureComplete(model), (x_example, x_example.clone(), *args),
                                  ["x", "known", *names], ["images"], ({0: batch}, {0: batch}, dyn))
        if getattr(model, "has_latent_mixture", False):
            graphs["latent"] = (_Sampler(model, fields, "standardized_latent"), tuple(args), names, ["latent"], (dyn,))
            z_args = (torch.zeros(n, model.latent_dim), *([labels] if model.conditional else []))
            graphs["decode"] = (_Decode(model), z_args, ["latent", *(["labels"] if model.conditional else [])],
                                ["images"], (tuple({0: batch} for _ in z_args),))
        if model.family == "cvae":
            graphs["analogies"] = (_Analogies(model), (x_example, labels), ["x", "labels"], ["images"],
                                   ({0: batch}, {0: batch}))

    paths = _graph_paths(path_or_dir, list(graphs))
    written = []
    for name, (module, args, inputs, outputs, dyn) in graphs.items():
        written.append(_export(module, args, paths[name], inputs, outputs, dyn, {**meta, "genmodels.graph": name}))
    return written


# --- parity --------------------------------------------------------------------------------------
def _fail(family: str, graph: str, n: int, err: float, detail: str) -> ExportParityError:
    return ExportParityError(f"{family} graph {graph!r} at batch size {n}: ONNX and torch disagree "
                             f"(max abs error {err:.3g}; {detail})")


def check_parity(model: GenerativeModel, onnx_files: Sequence[str | Path], batch_sizes: Sequence[int] = (1, 5),
                 seed: int = 0, atol: float = 1e-4, temperature: float = 0.8) -> None:
    """Check every exported graph against ``model`` with onnxruntime (CPU) on the same noise and
    labels, at each batch size (a conditional model's also at one with every class); raises
    :class:`ExportParityError` on the first disagreement.

    Samplers on the quantization grid are compared level by level: PixelRNN exactly; an 8-bit
    mixture may differ by exactly one grey level (floor at a bin boundary can round either way
    across runtimes), nothing more. Continuous outputs and likelihoods must agree within
    ``atol`` (likelihoods relative to their magnitude: they are sums over all pixels). A CVAE's
    ``analogies`` graph (required) is compared with ``model.analogies`` within ``atol`` on the
    sampled images rounded to the grid. Interpolations of a latent family (torch's
    ``genmodels.evaluation.pictures.interpolate`` against the runtime's, through a latent
    mixture's ``latent`` and ``decode`` graphs, which such a model's files must hold) agree
    within ``atol`` too.
    """
    import onnx

    family = model.family
    for f in onnx_files:
        try:
            onnx.checker.check_model(str(f), full_check=True)
        except Exception as exc:
            raise ExportParityError(f"{family}: {f} fails onnx.checker: {exc}") from exc
    # The same runtime serving and bulk jobs use: parity of the graphs alone would miss a
    # runtime that feeds them wrongly.
    try:
        runtime = OnnxSampler(onnx_files)
    except ValueError as exc:
        raise ExportParityError(f"{family}: the files are not one model's complete graphs: {exc}") from exc
    if runtime.family != family:
        raise ExportParityError(f"{family}: the files are {runtime.family} graphs")
    if family == "mixture" and not runtime.can_complete:
        raise ExportParityError(f"{family}: the files lack the 'complete' graph (found {runtime.graphs})")
    if getattr(model, "has_latent_mixture", False) and not runtime.has_latent_walk:
        # The runtime interpolates without them (older exports walk the noise), but a fresh export
        # always writes them, and the torch walk below would not match the older one.
        raise ExportParityError(f"{family}: the files lack the 'latent' and 'decode' graphs (found {runtime.graphs})")
    if family == "cvae" and not runtime.has_analogies:
        # The runtime loads a CVAE without it (older exports), but a fresh export always writes it.
        raise ExportParityError(f"{family}: the files lack the 'analogies' graph (found {runtime.graphs})")
    model = model.eval()
    img = model.image
    spec = model.noise_spec()
    graph = "pixel_step" if family == "pixelrnn" else "sampler"
    sizes = list(batch_sizes)
    if model.conditional and max(sizes, default=0) < img.num_classes:
        # A batch of n labels its rows 0..n-1: without one batch of every class, a graph wrong for
        # the higher labels only (10 classes against batches of 1 and 5) would pass.
        sizes.append(img.num_classes)
    for n in sizes:
        noise = make_noise_tensors(spec, seed, n)
        labels = torch.arange(n, dtype=torch.long) % max(img.num_classes, 1) if model.conditional else None
        with torch.no_grad():
            expected = model.sample_from_noise(noise, labels, temperature)
        got = runtime.sample_from_noise({k: v.numpy() for k, v in noise.items()},
                                        None if labels is None else labels.numpy(), temperature)
        if model.samples_on_grid:
            allowed = 1 if family == "mixture" and img.levels == 256 else 0
            _compare_levels(model, graph, n, expected.numpy(), got, max_levels=allowed)
        else:
            _compare_close(family, graph, n, expected.numpy(), got, atol)
        if runtime.has_likelihood:
            x = model.from_levels(model.to_levels(expected.float()))
            with torch.no_grad():
                want = model.log_likelihood(x).double().numpy()
            have = runtime.log_likelihood(x.numpy())
            tol = atol * max(1.0, float(np.abs(want).max(initial=0.0)))
            _compare_close(family, "likelihood", n, want, have, tol)
        if runtime.can_complete:
            _check_completion_parity(model, runtime, expected, labels, seed, temperature)
        if runtime.has_analogies:
            # Real images are on the grid, and so is what the runtime feeds the graph.
            x = model.from_levels(model.to_levels(expected.float()))
            want = model.analogies(x, labels).numpy()
            _compare_close(family, "analogies", n, want, runtime.analogies(x.numpy(), labels.numpy()), atol)
    if model.has_latent and "z" in spec:
        # The walk (a latent mixture's: its latent and decode graphs) of steps = n + 1, one label each.
        from genmodels.evaluation.pictures import interpolate

        for n in sizes:
            label = None if not model.conditional else n % img.num_classes
            want = interpolate(model, seed, seed + 1, n + 1, label, temperature).numpy()
            have = runtime.interpolate(seed, seed + 1, n + 1, label, temperature)
            _compare_close(family, "interpolate", n + 1, want, have, atol)


def _check_completion_parity(model: GenerativeModel, runtime: OnnxSampler, images: torch.Tensor,
                             labels: torch.Tensor | None, seed: int, temperature: float) -> None:
    """Torch and the runtime complete the sampled ``images`` alike (2 completions each) after
    half the rows, and for a mixture given a checkerboard mask too."""
    img = model.image
    n = images.shape[0]
    x = model.from_levels(model.to_levels(images.float()))
    knowns: list[Any] = [img.height // 2]
    if runtime.completes_any_mask:
        knowns.append((np.add.outer(np.arange(img.height), np.arange(img.width)) % 2 == 0))
    noise = make_noise_tensors(model.noise_spec(), seed + 1, 2 * n)
    allowed = 1 if model.family == "mixture" and img.levels == 256 else 0
    for known in knowns:
        with torch.no_grad():
            want = model.complete_from_noise(x, known, noise, labels, temperature).numpy()
        got = runtime.complete_from_noise(x.numpy(), known, {k: v.numpy() for k, v in noise.items()},
                                          None if labels is None else labels.numpy(), temperature)
        what = "complete" if model.family == "mixture" else "pixel_step (completion)"
        _compare_levels(model, what, n, want, got, max_levels=allowed)


def _compare_close(family: str, graph: str, n: int, want: np.ndarray, have: np.ndarray, atol: float) -> None:
    if want.shape != have.shape:
        raise ExportParityError(f"{family} graph {graph!r} at batch size {n}: shape {have.shape}, "
                                f"torch gives {want.shape}")
    err = float(np.abs(want - have).max(initial=0.0))
    if not err <= atol:  # also catches NaN
        raise _fail(family, graph, n, err, f"atol {atol:g}")


def _compare_levels(model: GenerativeModel, graph: str, n: int, want: np.ndarray, have: np.ndarray,
                    max_levels: int) -> None:
    family = model.family
    if want.shape != have.shape:
        raise ExportParityError(f"{family} graph {graph!r} at batch size {n}: shape {have.shape}, "
                                f"torch gives {want.shape}")
    scale = model.image.levels - 1
    diff = np.abs(np.rint(want * scale) - np.rint(have * scale))
    worst = float(diff.max(initial=0.0)) if np.isfinite(have).all() else float("inf")
    if not worst <= max_levels:
        err = float(np.abs(want - have).max(initial=0.0))
        raise _fail(family, graph, n, err, f"{int(np.sum(diff > max_levels))} values off by more than "
                    f"{max_levels} level(s), worst {worst:g}")
