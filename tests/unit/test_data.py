"""genmodels.data: sources, validation, prep and snapshots (tiny synthetic data + sklearn digits)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genmodels.data import (
    FASHION_MNIST_CLASSES,
    DataError,
    PrepConfig,
    dataset_names,
    decode_idx,
    encode_idx,
    load_source,
    prepare,
    read_snapshot,
    write_snapshot,
)
from genmodels.data.sources import IDX_IMAGES_MAGIC
from genmodels.storage import FileStorage, open_storage


# --- fixtures ---------------------------------------------------------------------------


def synthetic_idx(seed: int = 0, n_train: int = 12, n_test: int = 5, size: int = 4):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx_dir(root: Path, arrays=None, compress: bool = True) -> Path:
    arrays = synthetic_idx() if arrays is None else arrays
    root.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        (root / f"{stem}-ubyte{'.gz' if compress else ''}").write_bytes(encode_idx(arr, compress=compress))
    return root


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root: Path) -> Path:
    """Two classes, mixed sizes, modes and formats; class folders listed out of order."""
    rng = np.random.default_rng(1)
    files = {
        "zebra/a.png": png_bytes(rng.integers(0, 256, (6, 6), dtype=np.uint8)),  # L
        "zebra/b.JPG": png_bytes(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), "JPEG"),  # RGB 10x8
        "apple/c.png": png_bytes(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),  # RGB 7x5
        "apple/notes.txt": b"ignored: not an image",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def digits_like_npz(path: Path, n: int = 30, **extra) -> Path:
    rng = np.random.default_rng(2)
    arrays = {"x": rng.integers(0, 256, (n, 5, 5), dtype=np.uint8), "y": rng.integers(0, 3, n)}
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


# --- IDX -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trips_gz_and_raw(tmp_path, compress):
    arrays = synthetic_idx()
    root = write_idx_dir(tmp_path / "fm", arrays, compress=compress)
    raw = load_source("fashion-mnist", str(root))
    np.testing.assert_array_equal(raw.x[:, 0], arrays["train-images-idx3"])
    np.testing.assert_array_equal(raw.y, arrays["train-labels-idx1"].astype(np.int64))
    np.testing.assert_array_equal(raw.x_test[:, 0], arrays["t10k-images-idx3"])
    np.testing.assert_array_equal(raw.y_test, arrays["t10k-labels-idx1"].astype(np.int64))
    assert raw.x.dtype == np.uint8 and raw.x.shape == (12, 1, 4, 4) and raw.y.dtype == np.int64
    assert raw.class_names == list(FASHION_MNIST_CLASSES)
    # The gzip and raw encodings of the same arrays hold the same data, hence the same hash.
    assert raw.source_sha256 and len(raw.files) == 4


def test_idx_gz_and_raw_give_the_same_snapshot(tmp_path):
    a = prepare("fashion-mnist", str(write_idx_dir(tmp_path / "gz", compress=True)))
    b = prepare("fashion-mnist", (write_idx_dir(tmp_path / "raw", compress=False)).as_uri())
    assert a.hash == b.hash
    assert a.source["sha256"] != b.source["sha256"]  # provenance still tells them apart


def test_decode_idx_header():
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = encode_idx(arr)
    assert data[:4] == b"\x00\x00\x08\x03" and data[4:16] == b"\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04"
    np.testing.assert_array_equal(decode_idx(data, "mem", IDX_IMAGES_MAGIC), arr)
    np.testing.assert_array_equal(decode_idx(gzip.compress(data), "mem", IDX_IMAGES_MAGIC), arr)


def test_fashion_mnist_directory_from_env(tmp_path, monkeypatch):
    root = write_idx_dir(tmp_path / "fm")
    monkeypatch.setenv("GENMODELS_FASHION_MNIST_DIR", str(root))
    raw = load_source("fashion-mnist")
    assert raw.location == root.as_uri() and len(raw.x) == 12


def test_fashion_mnist_missing_file_names_it(tmp_path):
    root = write_idx_dir(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_source("fashion-mnist", str(root))


def test_fashion_mnist_on_s3(tmp_path, s3_bucket):
    arrays = synthetic_idx()
    store = open_storage(s3_bucket).child("fm")
    for stem, arr in arrays.items():
        store.put_bytes(f"{stem}-ubyte.gz", encode_idx(arr, compress=True))
    local = prepare("fashion-mnist", str(write_idx_dir(tmp_path / "fm", arrays)))
    remote = prepare("fashion-mnist", store.url)
    assert remote.hash == local.hash


# --- validation: every defect raises DataError naming file + defect, and writes nothing ---------


def _bad_idx(tmp_path: Path, stem: str, data: bytes) -> tuple[str, str]:
    root = write_idx_dir(tmp_path / "fm")
    (root / f"{stem}-ubyte.gz").write_bytes(data)
    return str(root), f"{stem}-ubyte.gz"


def case_wrong_magic(tmp_path):
    labels = encode_idx(np.zeros(12, np.uint8), compress=True)  # a labels file where images belong
    loc, name = _bad_idx(tmp_path, "train-images-idx3", labels)
    return "fashion-mnist", loc, name, r"wrong IDX magic 0x00000801, expected 0x00000803"


def case_dims_vs_bytes(tmp_path):
    raw = encode_idx(np.zeros((12, 4, 4), np.uint8))[:-3]
    loc, name = _bad_idx(tmp_path, "train-images-idx3", gzip.compress(raw))
    return "fashion-mnist", loc, name, r"header dims \(12, 4, 4\) need 192 data bytes but the file holds 189"


def case_trailing_bytes(tmp_path):
    raw = encode_idx(np.zeros(12, np.uint8)) + b"\x00"
    loc, name = _bad_idx(tmp_path, "train-labels-idx1", gzip.compress(raw))
    return "fashion-mnist", loc, name, r"need 12 data bytes but the file holds more \(trailing bytes\)"


def case_idx_dims_whose_product_overflows_int64(tmp_path):
    # 2**64 bytes: a fixed-width product wraps to 0 and matches this empty body.
    raw = struct.pack(">4I", IDX_IMAGES_MAGIC, 2**22, 2**21, 2**21)
    loc, name = _bad_idx(tmp_path, "train-images-idx3", gzip.compress(raw))
    return "fashion-mnist", loc, name, r"need 18446744073709551616 data bytes but the file holds 0 \(truncated\)"


def case_idx_images_without_pixels(tmp_path):
    loc, name = _bad_idx(tmp_path, "train-images-idx3", encode_idx(np.zeros((12, 0, 28), np.uint8), compress=True))
    return "fashion-mnist", loc, name, r"IDX header dims \(12, 0, 28\): its images hold no pixels"


def case_npz_images_without_pixels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 0, 28), np.uint8), y=np.zeros(5, np.int64))
    return "npz", str(tmp_path / "d.npz"), "d.npz", r"array 'x' has shape \(5, 0, 28\): its images hold no pixels"


def case_no_test_split_at_all(tmp_path):
    return "npz", str(digits_like_npz(tmp_path / "d.npz")), "d.npz", r"test_size=0 leaves no test split"


def npz_with_member(path: Path, member: str, data: bytes) -> Path:
    """An .npz whose ``member`` holds ``data`` as given, beside a well-formed 'y'."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        with archive.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(4, np.int64))
    return path


def case_npz_member_claiming_a_huge_shape(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (2**44, 28, 28)})
    path = npz_with_member(tmp_path / "d.npz", "x.npy", header.getvalue() + bytes(100))
    return "npz", str(path), "d.npz", (
        r"member 'x\.npy' declares shape \(17592186044416, 28, 28\) of uint8 \(13792273858822144 bytes\) "
        r"but holds 100 bytes"
    )


def case_npz_member_that_is_not_an_array(tmp_path):
    path = npz_with_member(tmp_path / "d.npz", "x", bytes(100))
    return "npz", str(path), "d.npz", r"member 'x' is not a \.npy array"


def case_truncated_gzip(tmp_path):
    data = encode_idx(np.zeros((12, 4, 4), np.uint8), compress=True)
    loc, name = _bad_idx(tmp_path, "train-images-idx3", data[: len(data) // 2])
    return "fashion-mnist", loc, name, r"truncated gzip"


def case_idx_labels_out_of_range(tmp_path):
    labels = np.zeros(12, np.uint8)
    labels[3] = 10
    loc, name = _bad_idx(tmp_path, "train-labels-idx1", encode_idx(labels, compress=True))
    return "fashion-mnist", loc, name, r"labels out of range: found 10 .*expected 0\.\.9 for 10 classes"


def case_idx_count_mismatch(tmp_path):
    loc, name = _bad_idx(tmp_path, "t10k-labels-idx1", encode_idx(np.zeros(4, np.uint8), compress=True))
    return "fashion-mnist", loc, name, r"holds 5 images but .* holds 4 labels: image/label count mismatch"


def case_npz_count_mismatch(tmp_path):
    path = digits_like_npz(tmp_path / "d.npz", y=np.zeros(29, np.int64))
    return "npz", str(path), "d.npz", r"holds 30 images but array 'y' holds 29 labels"


def case_npz_nan(tmp_path):
    x = np.full((4, 3, 3), 0.5, np.float32)
    x[1, 1, 1] = np.nan
    np.savez(tmp_path / "f.npz", x=x)
    return "npz", str(tmp_path / "f.npz"), "f.npz", r"array 'x' holds 1 NaN/inf values"


def case_npz_inf(tmp_path):
    x = np.zeros((4, 3, 3), np.float64)
    x[0, 0, 0] = np.inf
    x[2, 0, 0] = -np.inf
    np.savez(tmp_path / "f.npz", x=x, y=np.zeros(4, np.int64))
    return "npz", str(tmp_path / "f.npz"), "f.npz", r"array 'x' holds 2 NaN/inf values"


def case_npz_labels_vs_class_names(tmp_path):
    path = digits_like_npz(tmp_path / "d.npz", class_names=np.array(["a", "b"]))  # y has 3 classes
    return "npz", str(path), "d.npz", r"labels out of range: found 2 .*for 2 classes"


def case_npz_not_a_zip(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 nonsense")
    return "npz", str(tmp_path / "d.npz"), "d.npz", r"not a readable \.npz archive"


def case_empty_folder(tmp_path):
    (tmp_path / "imgs" / "cls").mkdir(parents=True)
    (tmp_path / "imgs" / "cls" / "readme.txt").write_text("no images here")
    return "folder", str(tmp_path / "imgs"), "imgs", r"empty folder: no \.png/\.jpg/\.jpeg images"


def case_unreadable_image(tmp_path):
    root = write_folder(tmp_path / "imgs")
    (root / "zebra" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return "folder", str(root), "zebra/broken.png", r"unreadable image"


def case_truncated_jpeg(tmp_path):
    root = write_folder(tmp_path / "imgs")
    data = (root / "zebra" / "b.JPG").read_bytes()
    (root / "zebra" / "b.JPG").write_bytes(data[: len(data) // 2])
    return "folder", str(root), "zebra/b.JPG", r"unreadable image"


def case_mixed_sizes_without_resize(tmp_path):
    root = write_folder(tmp_path / "imgs")
    return "folder_no_resize", str(root), "a.png", r"image is 6x6 but .*c.png is 7x5; set image_size"


def case_npy_given_as_npz(tmp_path):
    np.save(tmp_path / "d.npy", np.zeros((4, 5, 5), np.uint8))
    return "npz", str(tmp_path / "d.npy"), "d.npy", r"a single \.npy array, not an \.npz archive"


def case_float_pixels_in_a_folder(tmp_path):
    root = write_folder(tmp_path / "imgs")
    Image.fromarray(np.full((6, 6), 1.5, np.float32)).save(root / "zebra" / "f.tif")
    (root / "zebra" / "f.tif").rename(root / "zebra" / "f.png")  # a PNG's name on another file: Pillow reads it
    return "folder", str(root), "zebra/f.png", r"floating-point pixels have no fixed range"


def case_npz_empty_test_split(tmp_path):
    # Caught here, not by the evaluation that finds an empty test split after a whole training run.
    path = digits_like_npz(tmp_path / "d.npz", x_test=np.zeros((0, 5, 5), np.uint8), y_test=np.zeros(0, np.int64))
    return "npz", str(path), "d.npz", r"array 'x_test'.*holds no images"


def case_a_split_that_rounds_to_none(tmp_path):
    return "npz", str(digits_like_npz(tmp_path / "d.npz", n=6)), "d.npz", r"val_size=0\.1 of 5 images rounds to none"


BAD_INPUTS = [
    case_wrong_magic, case_dims_vs_bytes, case_trailing_bytes, case_idx_dims_whose_product_overflows_int64,
    case_truncated_gzip, case_npz_member_claiming_a_huge_shape, case_npz_member_that_is_not_an_array,
    case_idx_labels_out_of_range, case_idx_count_mismatch, case_npz_count_mismatch, case_npz_nan,
    case_npz_inf, case_npz_labels_vs_class_names, case_npz_not_a_zip, case_npy_given_as_npz, case_empty_folder,
    case_unreadable_image, case_truncated_jpeg, case_mixed_sizes_without_resize, case_float_pixels_in_a_folder,
    case_a_split_that_rounds_to_none, case_npz_empty_test_split, case_idx_images_without_pixels,
    case_npz_images_without_pixels, case_no_test_split_at_all,
]


@pytest.mark.parametrize("make_case", BAD_INPUTS, ids=lambda f: f.__name__[len("case_"):])
def test_bad_input_raises_data_error_naming_file_and_defect(tmp_path, make_case):
    dataset, location, filename, defect = make_case(tmp_path)
    # image_size applies to folder sources only (the others refuse it).
    prep = PrepConfig(image_size=4 if dataset == "folder" else None,
                      test_size=0 if make_case is case_no_test_split_at_all else 0.2)
    dataset = dataset.replace("_no_resize", "")
    out = tmp_path / "store"
    with pytest.raises(DataError, match=defect) as info:
        write_snapshot(prepare(dataset, location, prep), FileStorage(out))
    assert filename in str(info.value)
    assert not out.exists()  # nothing written


def test_idx_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    # 1x28x28 images, then 32 MiB of zeros that gzip squeezes into ~32 kB.
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = squeeze.compress(encode_idx(np.zeros((1, 28, 28), np.uint8)))
    zeros = bytes(1 << 20)
    bomb += b"".join(squeeze.compress(zeros) for _ in range(32)) + squeeze.flush()
    loc, name = _bad_idx(tmp_path, "train-images-idx3", bomb)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"need 784 data bytes but the file holds more \(trailing bytes\)") as info:
            load_source("fashion-mnist", loc)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert name in str(info.value)
    assert peak < 4 << 20, f"peak {peak} bytes: the excess was decompressed"


def test_npz_memory_error_names_the_file(tmp_path, monkeypatch):
    path = digits_like_npz(tmp_path / "d.npz")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 9.9 TiB")

    monkeypatch.setattr(np, "load", out_of_memory)
    with pytest.raises(DataError, match=r"d\.npz: arrays too large to load in memory"):
        load_source("npz", str(path))


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header (with a matching checksum) claims width x height."""
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# Over our limit only; over Pillow's warning limit (it would decode); over its error limit.
@pytest.mark.parametrize("side", [5000, 12000, 20000])
def test_folder_source_refuses_a_huge_image_before_decoding_it(tmp_path, side):
    root = write_folder(tmp_path / "imgs")
    (root / "zebra" / "huge.png").write_bytes(png_claiming(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI shows one line: no warning beside the error
        with pytest.raises(DataError, match=r"zebra/huge\.png: image too large .*the limit is 16777216 pixels"):
            load_source("folder", str(root), PrepConfig(image_size=4))


# --- folder, npz, digits sources ----------------------------------------------------------------


@pytest.mark.parametrize("channels,c", [("L", 1), ("RGB", 3)])
def test_folder_source_resizes_converts_and_labels_by_subfolder(tmp_path, channels, c):
    root = write_folder(tmp_path / "imgs")
    raw = load_source("folder", str(root), PrepConfig(image_size=4, channels=channels))
    assert raw.x.shape == (3, c, 4, 4) and raw.x.dtype == np.uint8
    assert raw.class_names == ["apple", "zebra"]  # sorted sub-folder names
    assert raw.y.tolist() == [0, 1, 1]  # apple/c.png, zebra/a.png, zebra/b.JPG
    assert [f.rsplit("/", 2)[-2:] for f in raw.files] == [["apple", "c.png"], ["zebra", "a.png"], ["zebra", "b.JPG"]]
    # The grey PNG converted to RGB has three equal planes; resizing a flat image keeps it flat.
    (root / "zebra" / "a.png").write_bytes(png_bytes(np.full((6, 6), 77, np.uint8)))
    raw = load_source("folder", str(root), PrepConfig(image_size=4, channels=channels))
    assert (raw.x[1] == 77).all()


def test_folder_source_scales_16_bit_grey_to_8_bits(tmp_path):
    root = tmp_path / "scans"
    root.mkdir()
    wide = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(wide).save(root / "a.png")
    assert Image.open(root / "a.png").mode.startswith("I;16")  # really 16 bits on disk
    raw = load_source("folder", str(root))
    assert raw.x[0, 0].tolist() == [[0, 1, 128, 255]]  # scaled, not clipped to 255


def test_folder_source_follows_a_linked_class_folder_and_a_link_loop_ends(tmp_path):
    root = write_folder(tmp_path / "imgs")
    elsewhere = tmp_path / "mnt" / "more"
    elsewhere.mkdir(parents=True)
    (elsewhere / "d.png").write_bytes(png_bytes(np.full((6, 6), 9, np.uint8)))
    (root / "mango").symlink_to(elsewhere)
    (root / "zebra" / "loop").symlink_to(root)  # would list the tree again and again
    raw = load_source("folder", str(root), PrepConfig(image_size=4))
    assert raw.class_names == ["apple", "mango", "zebra"] and raw.y.tolist() == [0, 1, 2, 2]


def test_folder_source_native_size_and_flat_layout(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    imgs = [np.random.default_rng(i).integers(0, 256, (5, 3), dtype=np.uint8) for i in range(3)]
    for i, arr in enumerate(imgs):
        (root / f"{i}.png").write_bytes(png_bytes(arr))
    raw = load_source("folder", str(root))
    assert raw.class_names == ["flat"] and raw.y.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(raw.x[:, 0], np.stack(imgs))  # PNG is lossless: exact pixels


def test_folder_source_on_s3_matches_local(tmp_path, s3_bucket):
    root = write_folder(tmp_path / "imgs")
    store = open_storage(s3_bucket).child("imgs")
    for path in root.rglob("*"):
        if path.is_file():
            store.put_bytes(path.relative_to(root).as_posix(), path.read_bytes())
    prep = PrepConfig(image_size=4, channels="RGB", test_size=1, val_size=0)
    assert prepare("folder", store.url, prep).hash == prepare("folder", str(root), prep).hash


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_npz_source_layouts(tmp_path, layout):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (6, 4, 5) if layout == "NHW" else (6, 3, 4, 5), dtype=np.uint8)
    stored = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
    np.savez(tmp_path / "a.npz", x=stored, y=np.array([0, 1, 2, 0, 1, 2]))
    raw = load_source("npz", str(tmp_path / "a.npz"))
    expected = x[:, None] if layout == "NHW" else x
    np.testing.assert_array_equal(raw.x, expected)
    assert raw.class_names == ["0", "1", "2"] and raw.x_test is None


def test_npz_source_with_test_split_float_input_and_class_names(tmp_path):
    x = np.linspace(0, 1, 8 * 9, dtype=np.float32).reshape(8, 3, 3)
    np.savez(
        tmp_path / "a.npz", x=x, y=np.array([0, 1] * 4), x_test=x[:3], y_test=np.array([1, 1, 0]),
        class_names=np.array(["cat", "dog"]),
    )
    raw = load_source("npz", (tmp_path / "a.npz").as_uri())
    np.testing.assert_array_equal(raw.x[:, 0], np.rint(x.astype(np.float64) * 255).astype(np.uint8))
    assert raw.x[0, 0, 0, 0] == 0 and raw.x[-1, 0, -1, -1] == 255
    assert raw.class_names == ["cat", "dog"] and raw.y_test.tolist() == [1, 1, 0]
    snap = prepare("npz", str(tmp_path / "a.npz"), PrepConfig(val_size=2))
    assert [len(snap.splits[s]) for s in ("train", "val", "test")] == [6, 2, 3]  # source test split kept
    np.testing.assert_array_equal(snap.splits["test"].x, raw.x_test)


def test_npz_class_names_stored_as_bytes_are_text():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = digits_like_npz(Path(tmp) / "d.npz", class_names=np.array([b"shirt", b"shoe", b"bag"]))
        assert load_source("npz", str(path)).class_names == ["shirt", "shoe", "bag"]  # not "b'shirt'"
        np.savez(path, x=np.zeros((4, 5, 5), np.uint8), y=np.zeros(4, np.int64), class_names=np.array([b"\xff"]))
        with pytest.raises(DataError, match=r"d\.npz: 'class_names' holds bytes that are not UTF-8 text"):
            load_source("npz", str(path))


@pytest.mark.parametrize("dataset", ["digits", "npz"])
def test_image_size_and_channels_of_a_source_that_is_no_folder_are_refused(tmp_path, dataset):
    # Ignored, they entered the snapshot's recorded prep all the same.
    location = str(digits_like_npz(tmp_path / "d.npz")) if dataset == "npz" else None
    for prep in (PrepConfig(image_size=32), PrepConfig(channels="RGB")):
        with pytest.raises(ValueError, match=f"apply to folder sources only; the {dataset} source"):
            prepare(dataset, location, prep)


def test_digits_source():
    raw = load_source("digits")
    assert raw.x.shape == (1797, 1, 8, 8) and raw.x.dtype == np.uint8
    assert int(raw.x.max()) == 255 and int(raw.x.min()) == 0
    assert set(np.unique(raw.x).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    assert raw.class_names == [str(i) for i in range(10)] and not raw.has_test
    assert dataset_names() == ["fashion-mnist", "digits", "folder", "npz"]


# --- prep -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_snapshot():
    return prepare("digits", prep=PrepConfig(seed=3))


def test_splits_partition_the_source(digits_snapshot):
    snap = digits_snapshot
    counts = {name: len(split) for name, split in snap.splits.items()}
    assert counts == {"train": 1294, "val": 144, "test": 359}  # 0.2 * 1797 -> 359; 0.1 * 1438 -> 144
    raw = load_source("digits")
    rows = lambda x, y: sorted(xi.tobytes() + bytes([yi]) for xi, yi in zip(x, y))  # noqa: E731
    merged = [np.concatenate([s.x for s in snap.splits.values()]), np.concatenate([s.y for s in snap.splits.values()])]
    assert rows(*merged) == rows(raw.x, raw.y)  # every image in exactly one split, label kept
    assert snap.image.shape == (1, 8, 8) and snap.image.levels == 2 and snap.image.num_classes == 10


def test_binarized_splits_are_bits_reproducible_and_follow_intensity(digits_snapshot):
    snap = digits_snapshot
    assert snap.splits["train"].x_binary is None and snap.binarize_seed == 3
    for name in ("val", "test"):
        split = snap.splits[name]
        xb = split.x_binary
        assert xb.dtype == np.uint8 and set(np.unique(xb).tolist()) == {0, 1}
        assert (xb[split.x == 0] == 0).all() and (xb[split.x == 255] == 1).all()
        # Bernoulli(x/255): the mean bit matches the mean intensity (n = 9k-23k pixels).
        assert abs(xb.mean() - split.x.mean() / 255) < 0.01
    again = prepare("digits", prep=PrepConfig(seed=3))
    np.testing.assert_array_equal(again.splits["test"].x_binary, snap.splits["test"].x_binary)
    other = prepare("digits", prep=PrepConfig(seed=4, test_size=359))
    assert not np.array_equal(other.splits["test"].x_binary, snap.splits["test"].x_binary)


def test_8bit_snapshot_keeps_levels_and_has_no_bits():
    snap = prepare("digits", prep=PrepConfig(quantization="8bit"))
    assert snap.image.levels == 256 and snap.binarize_seed is None
    assert all(s.x_binary is None for s in snap.splits.values())
    assert snap.hash != prepare("digits").hash


def test_same_input_same_hash_and_identical_files(tmp_path):
    root = write_idx_dir(tmp_path / "fm")
    a = prepare("fashion-mnist", str(root), PrepConfig(val_size=3))
    b = prepare("fashion-mnist", str(root), PrepConfig(val_size=3))
    assert a.hash == b.hash
    pa = write_snapshot(a, FileStorage(tmp_path / "s1"))
    pb = write_snapshot(b, FileStorage(tmp_path / "s2"))
    assert pa == pb == f"snapshots/fashion-mnist/{a.hash[:16]}/"
    files = sorted(p.relative_to(tmp_path / "s1") for p in (tmp_path / "s1").rglob("*") if p.is_file())
    assert [f.name for f in files] == ["manifest.json", "test.npz", "train.npz", "val.npz"]
    for f in files:
        assert (tmp_path / "s1" / f).read_bytes() == (tmp_path / "s2" / f).read_bytes(), f
    # Writes a second apart must match too: no wall-clock time inside the zip entries.
    with zipfile.ZipFile(tmp_path / "s1" / pa / "train.npz") as zf:
        assert [(i.filename, i.date_time) for i in zf.infolist()] == [
            ("x.npy", (1980, 1, 1, 0, 0, 0)), ("y.npy", (1980, 1, 1, 0, 0, 0))
        ]


@pytest.mark.parametrize("change", [{"seed": 1}, {"quantization": "8bit"}, {"val_size": 4}, {"max_train": 5}])
def test_different_settings_give_a_different_hash(tmp_path, change):
    root = write_idx_dir(tmp_path / "fm")
    base = prepare("fashion-mnist", str(root), PrepConfig(val_size=3))
    assert prepare("fashion-mnist", str(root), PrepConfig(**{"val_size": 3, **change})).hash != base.hash


def test_max_train_is_a_deterministic_subset(digits_snapshot):
    capped = prepare("digits", prep=PrepConfig(seed=3, max_train=100))
    assert len(capped.splits["train"]) == 100
    for name in ("val", "test"):  # only train is capped
        np.testing.assert_array_equal(capped.splits[name].x, digits_snapshot.splits[name].x)
    full_rows = {r.tobytes() for r in digits_snapshot.splits["train"].x}
    assert all(r.tobytes() in full_rows for r in capped.splits["train"].x)
    again = prepare("digits", prep=PrepConfig(seed=3, max_train=100))
    np.testing.assert_array_equal(again.splits["train"].x, capped.splits["train"].x)


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"quantization": "4bit"}, "quantization"), ({"val_size": 1.0}, "val_size"), ({"test_size": -1}, "test_size"),
     ({"val_size": True}, "val_size"), ({"channels": "RGBA"}, "channels"), ({"image_size": 0}, "image_size"),
     ({"max_train": 0}, "max_train"), ({"seed": -1}, "seed")],
)
def test_prep_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=f"PrepConfig.{msg}"):
        PrepConfig(**kwargs)


def test_split_sizes_that_leave_no_training_data(tmp_path):
    path = digits_like_npz(tmp_path / "d.npz", n=10)
    with pytest.raises(DataError, match=r"d.npz: val_size=8 would take 8 of 8 images"):
        prepare("npz", str(path), PrepConfig(test_size=2, val_size=8))


def test_unknown_dataset_and_missing_location():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        prepare("cifar")
    with pytest.raises(ValueError, match="npz dataset needs a location"):
        prepare("npz")


# --- snapshots in storage ---------------------------------------------------------------------


def _storage(kind: str, tmp_path: Path, request) -> object:
    if kind == "file":
        return open_storage((tmp_path / "store").as_uri())
    return open_storage(request.getfixturevalue("s3_bucket"))


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_snapshot_round_trip_with_checksums(tmp_path, request, kind, digits_snapshot):
    storage = _storage(kind, tmp_path, request)
    prefix = write_snapshot(digits_snapshot, storage)
    assert storage.list(prefix) == [prefix + n for n in ("manifest.json", "test.npz", "train.npz", "val.npz")]
    back = read_snapshot(storage, prefix)
    assert back.hash == digits_snapshot.hash and back.image == digits_snapshot.image
    assert back.prep == digits_snapshot.prep and back.class_names == digits_snapshot.class_names
    assert back.binarize_seed == 3 and back.dataset == "digits"
    for name, split in digits_snapshot.splits.items():
        got = back.splits[name]
        np.testing.assert_array_equal(got.x, split.x)
        np.testing.assert_array_equal(got.y, split.y)
        assert (got.x_binary is None) == (split.x_binary is None)
        if split.x_binary is not None:
            np.testing.assert_array_equal(got.x_binary, split.x_binary)
    manifest = storage.get_json(prefix + "manifest.json")
    assert manifest == back.manifest() == digits_snapshot.manifest()
    # The reader also accepts the snapshot's own root (a URL handed between pipeline steps).
    assert read_snapshot(open_storage(storage.url_for(prefix.rstrip("/")))).hash == digits_snapshot.hash


def test_manifest_contents(digits_snapshot, tmp_path):
    storage = FileStorage(tmp_path)
    prefix = write_snapshot(digits_snapshot, storage)
    m = json.loads((tmp_path / prefix / "manifest.json").read_text())
    assert m["format"] == "genmodels.snapshot/1" and m["hash"] == digits_snapshot.hash
    assert m["quantization"] == "binary" and m["seeds"] == {"split": 3, "binarize": 3}
    assert m["image"] == {"channels": 1, "height": 8, "width": 8, "levels": 2, "num_classes": 10}
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 1294, "val": 144, "test": 359}
    assert sum(m["splits"]["test"]["class_counts"]) == 359
    assert m["splits"]["train"]["arrays"] == ["x", "y"] and m["splits"]["val"]["arrays"] == ["x", "x_binary", "y"]
    for name, meta in m["files"].items():
        data = (tmp_path / prefix / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with np.load(tmp_path / prefix / "train.npz") as npz:  # plain np.load reads the files
        np.testing.assert_array_equal(npz["x"], digits_snapshot.splits["train"].x)


def test_rewriting_a_verified_snapshot_is_a_noop(tmp_path, digits_snapshot):
    class CountingStorage(FileStorage):
        puts: list[str] = []

        def put_bytes(self, key, data):
            self.puts.append(key)
            super().put_bytes(key, data)

    storage = CountingStorage(tmp_path)
    prefix = write_snapshot(digits_snapshot, storage)
    assert storage.puts[-1] == prefix + "manifest.json" and len(storage.puts) == 4  # manifest last
    storage.puts.clear()
    assert write_snapshot(digits_snapshot, storage) == prefix
    assert storage.puts == []


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_corrupted_object_is_detected_and_repaired(tmp_path, request, kind, digits_snapshot):
    storage = _storage(kind, tmp_path, request)
    prefix = write_snapshot(digits_snapshot, storage)
    good = storage.get_bytes(prefix + "val.npz")
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    storage.put_bytes(prefix + "val.npz", bytes(bad))
    with pytest.raises(DataError, match=r"val.npz: checksum mismatch") as info:
        read_snapshot(storage, prefix)
    assert storage.url_for(prefix + "val.npz") in str(info.value)
    storage.delete(prefix + "test.npz")
    with pytest.raises(DataError, match=r"test.npz: listed in the manifest but missing"):
        read_snapshot(storage, prefix)
    write_snapshot(digits_snapshot, storage)  # not verified -> rewritten
    assert storage.get_bytes(prefix + "val.npz") == good
    assert read_snapshot(storage, prefix).hash == digits_snapshot.hash


def test_unfinished_snapshot_is_not_read(tmp_path, digits_snapshot):
    storage = FileStorage(tmp_path)
    prefix = write_snapshot(digits_snapshot, storage)
    storage.delete(prefix + "manifest.json")
    with pytest.raises(FileNotFoundError, match="missing manifest"):
        read_snapshot(storage, prefix)


# --- split order: the caps take a split's first examples -------------------------------------
def _classes_in(y: np.ndarray, n: int) -> set[int]:
    return set(np.asarray(y[:n]).tolist())


def test_a_class_sorted_source_stores_its_splits_shuffled_so_the_caps_see_every_class(tmp_path):
    """max_train_examples / max_val_examples / a quick evaluation's first test images take a
    split's first examples: a source saved class by class (a folder lists so) must not give them
    its first classes only. Prepared again, the same order (the seed decides it)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 60)  # class by class
    x = rng.integers(0, 256, (len(y), 4, 4), dtype=np.uint8)
    y_test = np.repeat(np.arange(10), 20)
    x_test = rng.integers(0, 256, (len(y_test), 4, 4), dtype=np.uint8)
    own_test = tmp_path / "own.npz"
    np.savez(own_test, x=x, y=y, x_test=x_test, y_test=y_test)
    carved = tmp_path / "carved.npz"
    np.savez(carved, x=x, y=y)
    for path in (own_test, carved):
        snapshot = prepare("npz", str(path), PrepConfig(val_size=0.1))
        for name, first in (("train", 60), ("val", 30), ("test", 50)):
            assert _classes_in(snapshot.splits[name].y, first) == set(range(10)), (path.name, name)
        again = prepare("npz", str(path), PrepConfig(val_size=0.1))
        assert again.hash == snapshot.hash
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(again.splits[name].x, snapshot.splits[name].x)
    # The same examples as before, only in another order: nothing lost or repeated.
    split = prepare("npz", str(own_test), PrepConfig(val_size=0.1)).splits
    assert sorted(map(bytes, np.concatenate([split["train"].x, split["val"].x]))) == sorted(
        map(bytes, x[:, None]))
    assert sorted(map(bytes, split["test"].x)) == sorted(map(bytes, x_test[:, None]))


def test_a_folder_listed_class_by_class_is_stored_shuffled(tmp_path):
    rng = np.random.default_rng(1)
    for k, name in enumerate(("ant", "bee", "cat", "dog")):
        for i in range(12):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{i:02d}.png").write_bytes(png_bytes(rng.integers(0, 256, (4, 4), dtype=np.uint8)))
    snapshot = prepare("folder", str(tmp_path), PrepConfig(val_size=8, test_size=8))
    assert _classes_in(snapshot.splits["train"].y, 16) == {0, 1, 2, 3}  # listed in order: all "ant"


def test_mixed_sources_keep_their_own_order_inside_each_split():
    """Digits and Fashion-MNIST come mixed: their splits keep the source order (and the
    snapshots, hence every recorded figure, stay as they were)."""
    raw = load_source("digits")
    snapshot = prepare("digits", None, PrepConfig())
    position = {bytes(row): i for i, row in enumerate(raw.x)}
    for name in ("train", "val", "test"):
        where = [position[bytes(row)] for row in snapshot.splits[name].x]
        assert where == sorted(where), name
