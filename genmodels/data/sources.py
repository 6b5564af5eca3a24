"""Dataset sources: read raw images and labels, validate them, return uint8 [N, C, H, W].

Every location (a directory, a file or a folder of images) may be a local path, a
``file://`` URL or an ``s3://`` URL: bytes are read through :mod:`genmodels.storage`.
Nothing here writes anything; every defect raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from genmodels.data.errors import DataError
from genmodels.storage import FileStorage, Storage, open_storage, split_url

__all__ = [
    "FASHION_MNIST_CLASSES", "IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC",
    "RawDataset", "decode_idx", "encode_idx", "read_digits", "read_fashion_mnist", "read_folder",
    "read_npz", "read_source", "source_names",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CHANNEL_MODES = {"L": 1, "RGB": 3}
# Images here are dataset samples of tens to hundreds of pixels a side; 4096x4096 leaves ample
# room while capping one decode at 64 MB (RGBA), far below Pillow's own ~89M-pixel default.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class RawDataset:
    """A validated source, before splitting and quantization."""

    name: str
    x: np.ndarray  # uint8 [N, C, H, W], intensities 0..255
    y: np.ndarray  # int64 [N] in [0, len(class_names))
    class_names: list[str]
    x_test: np.ndarray | None = None  # the source's own test split, when it has one
    y_test: np.ndarray | None = None
    location: str = ""
    #: sha256 over the source's bytes (per-file digests, in name order): provenance only.
    source_sha256: str = ""
    files: list[str] = field(default_factory=list)
    #: The examples come in an order that already mixes the classes (a published dataset's own
    #: order), kept inside each split. A folder is listed class by class and arrays come as their
    #: owner saved them: their splits are stored shuffled instead (genmodels.data.prep.prepare).
    mixed_order: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_test(self) -> bool:
        return self.x_test is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


# --- shared checks ------------------------------------------------------------------


def _digest(named_bytes: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in sorted(named_bytes):
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)]
        raise DataError(
            f"{where}: labels out of range: found {int(bad[0])} ({bad.size} bad labels); "
            f"expected 0..{num_classes - 1} for {num_classes} classes"
        )
    return y.astype(np.int64, copy=False)


def _check_count(n_images: int, n_labels: int, images_at: str, labels_at: str) -> None:
    if n_images != n_labels:
        raise DataError(
            f"{images_at} holds {n_images} images but {labels_at} holds {n_labels} labels: "
            "image/label count mismatch"
        )


def _check_nonempty(x: np.ndarray, where: str) -> None:
    if x.shape[0] == 0:
        raise DataError(f"{where}: holds no images")


# --- IDX (Fashion-MNIST, MNIST) ---------------------------------------------------------


# Bytes decoded per read: reads follow the data that is really there, never a header's claim.
_READ_CHUNK = 1 << 20


def _read_up_to(stream, n: int) -> bytearray:
    """At most ``n`` bytes of ``stream``, fewer only at its end."""
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(min(n - len(buf), _READ_CHUNK))
        if not chunk:
            break
        buf += chunk
    return buf


def decode_idx(data: bytes, where: str, expected_magic: int) -> np.ndarray:
    """Parse an IDX file (raw or gzip) of unsigned bytes into an array of its header's dims."""
    # Stream the gzip rather than decompress it whole: a few hundred kB of gzip can expand to
    # gigabytes, so decode only what the header accounts for, plus one byte to spot any excess.
    gzipped = data[:2] == b"\x1f\x8b"
    stream = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") if gzipped else io.BytesIO(data)
    try:
        with stream:
            head = _read_up_to(stream, 4)
            if len(head) < 4:
                raise DataError(f"{where}: too short for an IDX header ({len(head)} bytes)")
            (magic,) = struct.unpack(">I", head)
            if magic != expected_magic:
                raise DataError(
                    f"{where}: wrong IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
                    f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'} of unsigned bytes)"
                )
            ndim = magic & 0xFF
            header = 4 + 4 * ndim
            dims_bytes = _read_up_to(stream, 4 * ndim)
            if len(dims_bytes) < 4 * ndim:
                raise DataError(
                    f"{where}: IDX header needs {header} bytes for {ndim} dims, file holds {4 + len(dims_bytes)}"
                )
            dims = struct.unpack(f">{ndim}I", dims_bytes)
            if ndim > 1 and 0 in dims[1:]:
                raise DataError(f"{where}: IDX header dims {tuple(dims)}: its images hold no pixels")
            # Python ints: a fixed-width product of dims like (2**22, 2**21, 2**21) wraps to 0.
            expected = math.prod(dims)
            body = _read_up_to(stream, expected)
            if len(body) < expected:
                raise DataError(
                    f"{where}: IDX header dims {tuple(dims)} need {expected} data bytes but the file holds "
                    f"{len(body)} (truncated)"
                )
            if stream.read(1):
                raise DataError(
                    f"{where}: IDX header dims {tuple(dims)} need {expected} data bytes but the file holds "
                    "more (trailing bytes)"
                )
    except EOFError as exc:
        raise DataError(f"{where}: truncated gzip stream ({exc})") from exc
    except (gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise DataError(f"{where}: corrupt gzip stream ({exc})") from exc
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def encode_idx(array: np.ndarray, compress: bool = False) -> bytes:
    """The IDX bytes of a uint8 array (the inverse of decode_idx; handy for fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    # mtime=0 keeps the bytes reproducible.
    return gzip.compress(raw, mtime=0) if compress else raw


def _read_idx_pair(storage: Storage, split: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, bytes]]]:
    arrays = []
    named = []
    for kind, magic in (("images-idx3", IDX_IMAGES_MAGIC), ("labels-idx1", IDX_LABELS_MAGIC)):
        base = f"{split}-{kind}-ubyte"
        for name in (base + ".gz", base):
            if storage.exists(name):
                break
        else:
            raise FileNotFoundError(
                f"{storage.url}: missing {base}.gz (or {base}); a Fashion-MNIST directory holds "
                "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
            )
        data = storage.get_bytes(name)
        named.append((name, data))
        arrays.append((decode_idx(data, storage.url_for(name), magic), storage.url_for(name)))
    (images, images_at), (labels, labels_at) = arrays
    _check_count(images.shape[0], labels.shape[0], images_at, labels_at)
    _check_nonempty(images, images_at)
    labels = _check_labels(labels, len(FASHION_MNIST_CLASSES), labels_at)
    return images[:, None, :, :], labels, named


def read_fashion_mnist(location: str | None = None) -> RawDataset:
    """Fashion-MNIST IDX files (gzip or raw), with the source's own train/test split."""
    if location is None:
        from genmodels.config import get_settings

        location = get_settings().fashion_mnist_dir
    storage = open_storage(location)
    x, y, named = _read_idx_pair(storage, "train")
    x_test, y_test, named_test = _read_idx_pair(storage, "t10k")
    if x_test.shape[1:] != x.shape[1:]:
        raise DataError(f"{storage.url}: test images are {x_test.shape[2:]} but train images are {x.shape[2:]}")
    named += named_test
    return RawDataset(
        "fashion-mnist", x, y, list(FASHION_MNIST_CLASSES), x_test, y_test,
        location=storage.url, source_sha256=_digest(named), files=[storage.url_for(n) for n, _ in named],
        mixed_order=True,
    )


# --- sklearn digits ---------------------------------------------------------------------


def read_digits(location: str | None = None) -> RawDataset:
    """sklearn's 1797 8x8 digits; values 0..16 rescaled to 0..255. No test split of its own."""
    if location is not None:
        raise ValueError(f"the digits dataset ships with scikit-learn and takes no location (got {location!r})")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    return RawDataset(
        "digits", x, y, [str(int(c)) for c in bunch.target_names],
        location="sklearn.datasets.load_digits", source_sha256=_digest([("x", x.tobytes()), ("y", y.tobytes())]),
        mixed_order=True,
    )


# --- a folder of images -----------------------------------------------------------------


def _eight_bit(img, where: str):
    """``img`` with 8-bit channels. Pillow's convert() clips 16-bit grey to 255 instead of scaling
    it (a 16-bit scan came out 99.6% white); 32-bit integer and float images have no fixed range."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        wide = np.asarray(img).astype(np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        raise DataError(f"{where}: {'32-bit integer' if img.mode == 'I' else 'floating-point'} pixels have no "
                        "fixed range; save the images with 8 or 16 bits per channel")
    return img


def _decode_image(data: bytes, where: str, mode: str, image_size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow only warns between its own limit and twice it, then decodes (~282 MB for one
        # 12000x12000 image): an error instead, so that the file is refused before load().
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            # Checked on the header, before load() allocates the pixels.
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{where}: image too large ({img.width}x{img.height} = "
                                f"{img.width * img.height} pixels); the limit is {MAX_IMAGE_PIXELS} pixels")
            img.load()  # decode now, so a truncated file fails here with its name
            img = _eight_bit(img, where)
            img = img.convert(mode)
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{where}: image too large ({exc}); the limit is {MAX_IMAGE_PIXELS} pixels") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: unreadable image ({exc})") from exc
    return arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_folder(location: str, *, image_size: int | None = None, channels: str = "L") -> RawDataset:
    """PNG/JPEG images under ``location``; one class per sub-folder (sorted), or one class if flat.

    Images are converted to ``channels`` ("L" or "RGB") and resized to (image_size, image_size);
    without image_size, every image must already have the same size.
    """
    if not location:
        raise ValueError("the folder dataset needs a location (a directory or an s3:// prefix)")
    if channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be one of {sorted(CHANNEL_MODES)}, got {channels!r}")
    storage = open_storage(location)
    if isinstance(storage, FileStorage) and not storage.root.is_dir():
        raise DataError(f"{storage.url}: no such directory")
    keys = [k for k in storage.list() if k.lower().endswith(IMAGE_EXTENSIONS)]
    if not keys:
        raise DataError(f"{storage.url}: empty folder: no {'/'.join(IMAGE_EXTENSIONS)} images found")
    top = [k for k in keys if "/" not in k]
    nested = [k for k in keys if "/" in k]
    if top and nested:
        raise DataError(
            f"{storage.url}: mixes images at the top level ({storage.url_for(top[0])}) with class "
            f"sub-folders ({storage.url_for(nested[0])}); use one layout"
        )
    if top:
        name = storage.url.rstrip("/").rsplit("/", 1)[-1] or "0"
        class_names, labels = [name], [0] * len(top)
    else:
        class_names = sorted({k.split("/", 1)[0] for k in keys})
        index = {c: i for i, c in enumerate(class_names)}
        labels = [index[k.split("/", 1)[0]] for k in keys]

    images, named = [], []
    for key in keys:
        where = storage.url_for(key)
        data = storage.get_bytes(key)
        named.append((key, data))
        arr = _decode_image(data, where, channels, image_size)
        if images and arr.shape != images[0].shape:
            raise DataError(
                f"{where}: image is {arr.shape[2]}x{arr.shape[1]} but {storage.url_for(keys[0])} is "
                f"{images[0].shape[2]}x{images[0].shape[1]}; set image_size to resize them all"
            )
        images.append(arr)
    return RawDataset(
        "folder", np.stack(images), np.asarray(labels, dtype=np.int64), class_names,
        location=storage.url, source_sha256=_digest(named), files=[storage.url_for(k) for k in keys],
    )


# --- .npz arrays ------------------------------------------------------------------------


def _as_images(arr: np.ndarray, key: str, where: str) -> np.ndarray:
    """uint8 [N, C, H, W] from [N, H, W], [N, C, H, W] or [N, H, W, C] (C in {1, 3})."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: array {key!r} holds {int((~np.isfinite(arr)).sum())} NaN/inf values")
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{where}: float array {key!r} must lie in [0, 1] (found {lo:g}..{hi:g}); store 0..255 as uint8"
            )
        arr = np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    elif arr.dtype.kind in "iu":
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise DataError(
                f"{where}: integer array {key!r} must lie in 0..255 (found {int(arr.min())}..{int(arr.max())})"
            )
        arr = arr.astype(np.uint8)
    else:
        raise DataError(f"{where}: array {key!r} has dtype {arr.dtype}; expected uint8 (or float in [0, 1])")
    if arr.ndim in (3, 4) and 0 in arr.shape[1:]:
        raise DataError(f"{where}: array {key!r} has shape {arr.shape}: its images hold no pixels")
    if arr.ndim == 3:
        return arr[:, None, :, :]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3):  # channels-first wins when both readings are possible
            return arr
        if arr.shape[3] in (1, 3):
            return arr.transpose(0, 3, 1, 2)
    raise DataError(
        f"{where}: array {key!r} has shape {arr.shape}; "
        "expected [N, H, W], [N, C, H, W] or [N, H, W, C] with C in (1, 3)"
    )


def _as_labels(arr: np.ndarray, key: str, where: str) -> np.ndarray:
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{where}: array {key!r} must be 1-D integers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_npz_members(data: bytes, where: str) -> None:
    """Refuse a member whose .npy header declares more bytes than the member holds.

    numpy allocates the declared shape before it reads a byte, so a 100-byte member claiming
    (2**44, 28, 28) would fail with a MemoryError naming no file, or reserve terabytes.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                try:
                    version = np.lib.format.read_magic(member)
                except ValueError as exc:
                    raise DataError(f"{where}: member {info.filename!r} is not a .npy array ({exc})") from exc
                read_header = _NPY_HEADER_READERS.get(version)
                if read_header is None:
                    # Version 3.0 exists only for structured dtypes, which no source accepts.
                    raise DataError(f"{where}: member {info.filename!r} has .npy format version "
                                    f"{version[0]}.{version[1]}; save it with np.savez")
                shape, _, dtype = read_header(member)
                if dtype.hasobject:
                    continue  # np.load refuses object arrays (allow_pickle=False)
                declared = math.prod(shape) * dtype.itemsize
                held = info.file_size - member.tell()
                if declared > held:
                    raise DataError(
                        f"{where}: member {info.filename!r} declares shape {shape} of {dtype} "
                        f"({declared} bytes) but holds {max(held, 0)} bytes of data"
                    )


def read_npz(location: str) -> RawDataset:
    """``.npz`` with ``x`` and optional ``y``, ``x_test``/``y_test``, ``class_names``."""
    if not location:
        raise ValueError("the npz dataset needs a location (a .npz file path or URL)")
    storage, key = split_url(location)
    where = storage.url_for(key)
    data = storage.get_bytes(key)
    # Judged by its magic, not loaded: np.load would allocate whatever shape a lone .npy declares.
    if data.startswith(np.lib.format.MAGIC_PREFIX):
        raise DataError(f"{where}: a single .npy array, not an .npz archive; save the images as one with "
                        "np.savez(path, x=images, y=labels)")
    try:
        _check_npz_members(data, where)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{where}: not a readable .npz archive ({exc})") from exc
    except MemoryError as exc:
        raise DataError(f"{where}: arrays too large to load in memory ({exc!r})") from exc
    if "x" not in arrays:
        raise DataError(f"{where}: no array 'x' (found {sorted(arrays)})")
    unknown = sorted(set(arrays) - {"x", "y", "x_test", "y_test", "class_names"})
    if unknown:
        raise DataError(f"{where}: unknown arrays {unknown}; expected x, y, x_test, y_test, class_names")
    labelled = "y" in arrays
    if "y_test" in arrays and not labelled:
        raise DataError(f"{where}: has 'y_test' but no 'y'")
    if "x_test" in arrays and labelled and "y_test" not in arrays:
        raise DataError(f"{where}: has 'x_test' but no 'y_test' while 'x' is labelled by 'y'")
    if "y_test" in arrays and "x_test" not in arrays:
        raise DataError(f"{where}: has 'y_test' but no 'x_test'")

    x = _as_images(arrays["x"], "x", where)
    _check_nonempty(x, f"{where} array 'x'")
    y = _as_labels(arrays["y"], "y", where) if labelled else np.zeros(len(x), np.int64)
    _check_count(len(x), len(y), f"{where} array 'x'", "array 'y'")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test = _as_images(arrays["x_test"], "x_test", where)
        _check_nonempty(x_test, f"{where} array 'x_test'")  # else evaluation finds it empty after training
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{where}: 'x_test' images are {x_test.shape[1:]} but 'x' images are {x.shape[1:]}")
        y_test = _as_labels(arrays["y_test"], "y_test", where) if labelled else np.zeros(len(x_test), np.int64)
        _check_count(len(x_test), len(y_test), f"{where} array 'x_test'", "array 'y_test'")

    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US" or names.size == 0:
            raise DataError(
                f"{where}: 'class_names' must be a non-empty 1-D string array, got {names.dtype} {names.shape}"
            )
        try:  # bytes names (dtype S) are text: str() of them would keep the b'...' around each
            class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names.tolist()]
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: 'class_names' holds bytes that are not UTF-8 text ({exc})") from None
    else:
        all_y = y if y_test is None else np.concatenate([y, y_test])
        if int(all_y.min()) < 0:
            raise DataError(f"{where}: labels out of range: found {int(all_y.min())}; labels must be >= 0")
        class_names = [str(i) for i in range(int(all_y.max()) + 1)]
    y = _check_labels(y, len(class_names), f"{where} array 'y'")
    if y_test is not None:
        y_test = _check_labels(y_test, len(class_names), f"{where} array 'y_test'")
    return RawDataset(
        "npz", x, y, class_names, x_test, y_test,
        location=where, source_sha256=_digest([(key, data)]), files=[where],
    )


# --- dispatch ----------------------------------------------------------------------------

_READERS: dict[str, Callable[..., RawDataset]] = {
    "fashion-mnist": read_fashion_mnist,
    "digits": read_digits,
    "folder": read_folder,
    "npz": read_npz,
}


def source_names() -> list[str]:
    return list(_READERS)


def read_source(
    dataset: str, location: str | None = None, *, image_size: int | None = None, channels: str = "L"
) -> RawDataset:
    """Read and validate a source. ``image_size``/``channels`` apply to folder sources only."""
    if dataset not in _READERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {source_names()}")
    if dataset == "folder":
        return read_folder(location, image_size=image_size, channels=channels)  # type: ignore[arg-type]
    if image_size is not None or channels != "L":
        # Ignored, they would still enter the snapshot's recorded prep: refused instead.
        raise ValueError(f"image_size and channels apply to folder sources only; the {dataset} source's images "
                         f"are read as stored (got image_size={image_size!r}, channels={channels!r})")
    return _READERS[dataset](location)
