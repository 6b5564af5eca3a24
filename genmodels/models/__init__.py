"""Registry of generative families, and the checkpoint format they share.

A checkpoint is ``{"format", "family", "config", "state_dict", "meta"}`` written by
``torch.save``: tensors and plain Python values only, so it loads with
``weights_only=True`` and never unpickles code.
"""

from __future__ import annotations

import hashlib
import importlib
import io
from pathlib import Path
from typing import Any, Mapping

import torch

from genmodels.models.base import GenerativeModel, ImageSpec, ModelConfig

# family name -> (module, class). Imported on first use so that importing one family (or the
# base) never pays for, or breaks on, the others.
_FAMILY_CLASSES = {
    "mixture": ("genmodels.models.mixture", "MixtureModel"),
    "vae": ("genmodels.models.vae", "VAE"),
    "cvae": ("genmodels.models.cvae", "CVAE"),
    "pixelrnn": ("genmodels.models.pixelrnn", "PixelRNN"),
    "gan": ("genmodels.models.gan", "GAN"),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_CLASSES)
CHECKPOINT_FORMAT = "genmodels.checkpoint/1"

__all__ = [
    "FAMILIES", "GenerativeModel", "ImageSpec", "ModelConfig", "build_model", "family_class", "initial_model",
    "parse_families",
    "checkpoint_bytes", "load_checkpoint", "save_checkpoint", "model_from_checkpoint", "one_line",
    "weights_digest",
]


def parse_families(spec: str | list[str]) -> list[str]:
    """``"all"``, ``"vae,cvae"`` or a list -> family names, each once; unknown ones are an error."""
    if isinstance(spec, str):
        names = list(FAMILIES) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown family {', '.join(map(repr, unknown)) or repr(spec)}; "
                         f"choose from {', '.join(FAMILIES)} or all")
    return list(dict.fromkeys(names))


def family_class(family: str) -> type[GenerativeModel]:
    try:
        module, name = _FAMILY_CLASSES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}") from None
    return getattr(importlib.import_module(module), name)


def build_model(family: str, image: ImageSpec, **overrides: Any) -> GenerativeModel:
    cls = family_class(family)
    config = cls.config_class.from_dict({**overrides, "image": image})
    return cls(config)


# Distinct from every (seed, epoch, rank) key the training loop derives its epochs' seeds from.
_INIT_STREAM = 0x494E4954


def initial_model(family: str, image: ImageSpec, config: Mapping[str, Any], seed: int) -> GenerativeModel:
    """A fresh model whose initial weights are a function of (config, ``seed``) alone, drawn
    without touching torch's global RNG: a plan run twice, locally or on Ray, starts from the
    same weights."""
    from genmodels.noise import derive_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, _INIT_STREAM))
        return build_model(family, image, **config)


def checkpoint_dict(model: GenerativeModel, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "family": model.family,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def checkpoint_bytes(model: GenerativeModel, meta: Mapping[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save(checkpoint_dict(model, meta), buf)
    return buf.getvalue()


def save_checkpoint(model: GenerativeModel, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(checkpoint_bytes(model, meta))
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu", *,
                    where: str | None = None) -> dict[str, Any]:
    """Read a checkpoint dict safely (``weights_only=True``) and check its format. ``where``: the
    URL (or path) the bytes came from, for the errors; a path names itself."""
    if where is None:
        # Bytes carry no name: callers that read them from storage pass ``where=url_for(key)``.
        where = "<bytes>" if isinstance(source, bytes) else str(source)
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        ckpt = torch.load(fileobj, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {where}") from None
    except Exception as exc:  # corrupt file or a pickle that carries code
        raise ValueError(f"{where}: not a loadable genmodels checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{where}: not a genmodels checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    return ckpt


def model_from_checkpoint(ckpt: Mapping[str, Any] | str | Path | bytes, *, where: str | None = None) -> GenerativeModel:
    """The model of a checkpoint (dict, path or bytes); ``where`` as for :func:`load_checkpoint`.
    A checkpoint of the right format whose family, config or weights do not make a model (an
    edited config, weights of another architecture) is a ValueError naming ``where``."""
    if not isinstance(ckpt, Mapping):
        if where is None and not isinstance(ckpt, bytes):
            where = str(ckpt)
        ckpt = load_checkpoint(ckpt, where=where)
    where = where or "checkpoint"
    missing = [key for key in ("family", "config", "state_dict") if key not in ckpt]
    if missing:
        raise ValueError(f"{where}: the checkpoint lacks {missing}")
    try:
        cls = family_class(ckpt["family"])
        model = cls(cls.config_class.from_dict(ckpt["config"]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: its config does not build a model ({exc})") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
        raise ValueError(f"{where}: its weights do not fit its {ckpt['family']} config ({one_line(exc)})") from None
    return model.eval()


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An error's text for one line of a message: torch lists every state-dict mismatch on lines
    of its own, and a config's refusal lists every field it knows; the CLI shows one line."""
    detail = "; ".join(line.strip().rstrip(":") for line in str(exc).splitlines() if line.strip())
    return detail if len(detail) <= limit else f"{detail[:limit]}..."


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes, values; not the memory layout)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
