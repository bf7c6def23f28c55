"""Datasets: digits (ships with scikit-learn), MNIST (IDX files), CIFAR-10, synthetic.

Everything here is plain numpy; arrays go to JAX only in the training loop.
`load` returns a `Dataset` whose images are float32, NHWC, scaled to [0, 1]
and then standardised per channel with the *training* set's mean and standard
deviation (kept as `Dataset.mean` / `Dataset.std`, so the test set is
standardised with exactly the same numbers). Labels are int32. The data sets:

  | name        | source                                         | image shape | train / test   | `--augment`      |
  |-------------|------------------------------------------------|-------------|----------------|------------------|
  | `digits`    | `sklearn.datasets.load_digits()`, offline      | 8 x 8 x 1   | 1,347 / 450    | shift ±1         |
  | `mnist`     | four IDX files in `data_dir`                   | 28 x 28 x 1 | 60,000 / 10,000| shift ±2         |
  | `cifar10`   | python pickles in `data_dir` (dir or .tar.gz)  | 32 x 32 x 3 | 50,000 / 10,000| shift ±4, flips  |
  | `synthetic` | Gaussian blobs around per-class prototypes     | 8 x 8 x 1   | 512 / 128      | shift ±1         |

(`AUGMENTATIONS`: a shift is padding and a random crop, done on the device
in the training step.)

MNIST and CIFAR-10 are read from files the user downloaded, or fetched with
`download=True`, which checks each file's SHA-256 before it is kept.

Example:
    >>> from jax_resnet import data
    >>> ds = data.load("digits")
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((1347, 8, 8, 1), (450, 8, 8, 1), 10)
    >>> ds.x_train.dtype, ds.y_train.dtype
    (dtype('float32'), dtype('int32'))
    >>> xb, yb = next(data.batches(ds.x_train, ds.y_train, 32, key_or_seed=(0, 0)))
    >>> xb.shape, yb.shape
    ((32, 8, 8, 1), (32,))
    >>> data.num_batches(len(ds.x_train), 32)
    42
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "MNIST_URL",
    "MNIST_SHA256",
    "MNIST_FILES",
    "CIFAR10_URL",
    "CIFAR10_ARCHIVE",
    "CIFAR10_DIR",
    "CIFAR10_SHA256",
    "CIFAR10_TRAIN_BATCHES",
    "CIFAR10_TEST_BATCH",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "DataError",
    "Augmentation",
    "AUGMENTATIONS",
    "Dataset",
    "load",
    "default_data_dir",
    "digits",
    "synthetic",
    "read_idx",
    "read_mnist",
    "mnist_file_names",
    "read_cifar10",
    "num_batches",
    "batches",
]


DATASETS = ("digits", "mnist", "cifar10", "synthetic")

# Where `load` looks when no data_dir is given: $JAX_RESNET_DATA/<name>, else
# ~/.cache/jax-resnet/<name>.
DATA_DIR_ENV = "JAX_RESNET_DATA"

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# SHA-256 of the gzipped IDX files as distributed (the same bytes on every
# mirror). Cross-check: their MD5s, as used by torchvision, are
# f68b3c2dcbeaaa9fbdd348bbdeb94873, d53e105ee54ea40749a09fcbcd1e9432,
# 9fb629c4189551a2d022fa330f9573f3 and ec29112dd5afa0611ce80d1b7f02629c.
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
# SHA-256 of cifar-10-python.tar.gz (170,498,071 bytes; the value Keras checks).
# Cross-check: its MD5 is c58f30108f718f92721af3b95e74349a.
CIFAR10_SHA256 = {CIFAR10_ARCHIVE: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"}
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
    """A data file is missing, corrupt, or not in the expected format.

    The message names the file, says what was wrong and how to fix it.
    """


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The random changes training with `--augment` makes to a data set's images.

    Applied on the device, inside the jitted step (`jax_resnet.step.augment_batch`),
    to every training batch; never to the test set.

    Fields:
      pad: pixels added on every side before a random crop back to H x W,
        so an image moves by up to ±pad pixels in each direction (0: none).
      flip: mirror left-right with probability 1/2. Only where a mirrored
        image still shows its class: natural images yes, digits never (a
        mirrored 2 or 7 is no digit, and a mirrored 5 is close to a 2).
      fill: the padding's value per channel, in standardised units; empty
        means 0. `Dataset.augmentation` sets it to black (a zero pixel).
    """

    pad: int = 0
    flip: bool = False
    fill: tuple[float, ...] = ()


# Which augmentations each data set gets: a property of the data, not of the trainer.
AUGMENTATIONS = {
    "digits": Augmentation(pad=1),  # 8x8 images: one pixel is an eighth of the width
    # MNIST's digits fit a 20x20 box centred (by centre of mass) in 28x28, about 4 blank
    # pixels on every side, so a shift of up to 2 keeps the strokes in the image.
    "mnist": Augmentation(pad=2),
    # He et al. (2015), section 4.2: 4 pixels of padding, a random 32x32 crop and horizontal flips.
    "cifar10": Augmentation(pad=4, flip=True),
    "synthetic": Augmentation(pad=1),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of standardised images.

    `x_*` are float32 [N, H, W, C]: pixel values scaled to [0, 1], then
    `(x - mean) / std` per channel with the training set's statistics.
    `y_*` are int32 [N] class indices in `0..num_classes-1`. The arrays are
    read-only. `eq=False` because elementwise array comparison has no single
    truth value; compare the fields with numpy instead. `augmentation` is
    what training with `--augment` does to this data set's images
    (`AUGMENTATIONS`).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: np.ndarray  # float32 [C], per channel, of the [0, 1]-scaled training images
    std: np.ndarray  # float32 [C], likewise; a constant channel gets 1, not 0

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])

    @property
    def augmentation(self) -> Augmentation:
        """`AUGMENTATIONS[name]`, padding with a black pixel (0 before standardisation: -mean/std per channel)."""
        fill = tuple(float(-m / s) for m, s in zip(self.mean, self.std))
        return dataclasses.replace(AUGMENTATIONS.get(self.name, Augmentation()), fill=fill)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    **options: Any,
) -> Dataset:
    """Load a data set by name, standardised with its training statistics.

    Args:
      name: one of "digits", "mnist", "cifar10", "synthetic".
      data_dir: folder with the MNIST/CIFAR-10 files. Default:
        `$JAX_RESNET_DATA/<name>`, else `~/.cache/jax-resnet/<name>`. Unused by
        digits and synthetic.
      download: fetch missing MNIST/CIFAR-10 files into `data_dir`, checking
        their SHA-256 first. Files already there are used as they are.
      seed: the train/test split of digits and the draw of synthetic. MNIST and
        CIFAR-10 come with a fixed split, so it does not affect them.
      **options: keyword arguments of `synthetic` (n_train, n_test,
        image_shape, num_classes, noise); only for "synthetic".

    Returns:
      A `Dataset`.

    Raises:
      ValueError: unknown name, or options given for a data set without any.
      DataError: a file is missing or corrupt; the message names it.
    """
    if name not in DATASETS:
        raise ValueError(f"load: unknown data set {name!r}; valid names are {', '.join(map(repr, DATASETS))}")
    if name == "synthetic":
        return synthetic(seed=seed, **options)
    if options:
        raise ValueError(f"load: {name!r} takes no options, got {sorted(options)} (options are for 'synthetic')")
    if name == "digits":
        return digits(seed=seed)
    directory = default_data_dir(name) if data_dir is None else Path(data_dir)
    if name == "mnist":
        return _standardised("mnist", *read_mnist(directory, download=download), num_classes=10)
    return _standardised("cifar10", *read_cifar10(directory, download=download), num_classes=10)


def default_data_dir(name: str) -> Path:
    """`$JAX_RESNET_DATA/<name>`, or `~/.cache/jax-resnet/<name>` when it is unset."""
    root = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "jax-resnet"
    return Path(root).expanduser() / name


# --- digits ------------------------------------------------------------------


def digits(*, seed: int = 0, test_size: float = 0.25) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16), split 75/25.

    The split is stratified by class and fixed by `seed`, so every class has
    the same share of test images (to within one image) and the same seed
    always gives the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
    return _standardised("digits", x_train, y_train, x_test, y_test, num_classes=10)


# --- synthetic ---------------------------------------------------------------


def synthetic(
    *,
    n_train: int = 512,
    n_test: int = 128,
    image_shape: tuple[int, int, int] = (8, 8, 1),
    num_classes: int = 10,
    noise: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """Class-conditional Gaussian blobs, for smoke tests.

    Each class has a prototype image drawn uniformly from [0, 1]; an example
    is its class prototype plus N(0, noise^2) per pixel, clipped to [0, 1].
    Classes are balanced (label i % num_classes, then shuffled). Train and test
    share the prototypes; everything is fixed by `seed`.
    """
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"synthetic: image_shape must be (H, W, C) of positive ints, got {image_shape}")
    if n_train < 1 or n_test < 1 or num_classes < 1:
        raise ValueError(
            f"synthetic: n_train, n_test and num_classes must be >= 1, got {n_train}, {n_test}, {num_classes}"
        )
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, (num_classes, *image_shape))

    def draw(n):
        y = rng.permutation(np.arange(n) % num_classes).astype(np.int32)
        x = np.clip(prototypes[y] + noise * rng.standard_normal((n, *image_shape)), 0.0, 1.0)
        return x.astype(np.float32), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return _standardised("synthetic", x_train, y_train, x_test, y_test, num_classes=num_classes)


# --- MNIST: IDX files --------------------------------------------------------


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (raw, or gzip when the name ends in .gz) as a uint8 array.

    The IDX layout, all integers big-endian:
      bytes 0-1  zero
      byte  2    element type: 0x08 unsigned byte (the only type read here)
      byte  3    number of dimensions d
      then d 4-byte sizes, then prod(sizes) elements in row-major order.
    So the first 4 bytes, read as one big-endian integer, are the "magic
    number": 0x00000803 for MNIST images [N, 28, 28] and 0x00000801 for
    labels [N].

    Args:
      path: the file.
      magic: the magic number to insist on; None accepts any uint8 IDX file.

    Returns:
      uint8 array with the shape the header gives.

    Raises:
      DataError: corrupt gzip, bad magic number, truncated file or trailing
        bytes; the message names the file.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, too short for the 4-byte magic number")
    (got,) = struct.unpack(">I", raw[:4])
    dtype_code, ndim = (got >> 8) & 0xFF, got & 0xFF
    if (magic is not None and got != magic) or got >> 16 != 0 or dtype_code != 0x08:
        expected = f"0x{magic:08x}" if magic is not None else "0x000008NN (unsigned bytes)"
        if raw[:2] == _GZIP_MAGIC:
            detail = "the file is gzip-compressed: give it a .gz suffix or decompress it"
        elif got >> 16 == 0 and dtype_code in _IDX_TYPES:
            detail = f"element type {_IDX_TYPES[dtype_code]}, {ndim} dimensions"
        else:
            detail = "not an IDX file"
        raise DataError(f"{path}: bad magic number: expected {expected}, got 0x{got:08x} ({detail})")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} header bytes, got {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_bytes = math.prod(dims)
    got_bytes = len(raw) - header_len
    if got_bytes != expected_bytes:
        problem = "truncated file" if got_bytes < expected_bytes else "trailing bytes after the data"
        raise DataError(
            f"{path}: {problem}: header says shape {tuple(dims)}, so expected {expected_bytes} bytes of data, "
            f"got {got_bytes}"
        )
    return np.frombuffer(raw, np.uint8, count=expected_bytes, offset=header_len).reshape(dims)


def read_mnist(
    data_dir: str | os.PathLike, *, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the four MNIST IDX files from `data_dir`, unnormalised.

    Each file may be raw (`train-images-idx3-ubyte`) or gzipped
    (`train-images-idx3-ubyte.gz`), under its official name or the variant
    `train-images.idx3-ubyte` (`mnist_file_names` lists them in the order
    tried; the first found wins).

    Returns:
      (x_train, y_train, x_test, y_test): uint8 [N, 28, 28, 1] images and
      uint8 [N] labels.
    """
    data_dir = Path(data_dir)
    found = {key: _find_idx(data_dir, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing and download:
        for stem in missing:
            gz = stem + ".gz"
            _download(MNIST_URL + gz, data_dir / gz, "sha256", MNIST_SHA256[gz])
        found = {key: _find_idx(data_dir, stem) for key, stem in MNIST_FILES.items()}
        missing = [MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        looked_for = "; ".join(_either(mnist_file_names(stem)) for stem in missing)
        raise DataError(
            f"mnist: missing file(s) in {data_dir}: looked for {looked_for}. Fetch them with "
            f"load('mnist', {str(data_dir)!r}, download=True) (the CLI's --download), or download the .gz "
            f"files from {MNIST_URL} into that folder."
        )
    paths = {key: path for key, path in found.items() if path is not None}
    split = []
    for prefix in ("train", "test"):
        images_path, labels_path = paths[f"{prefix}_images"], paths[f"{prefix}_labels"]
        images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: wrong image size: expected 28x28, got {images.shape[1]}x{images.shape[2]}")
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path.name} has {images.shape[0]} images but {labels_path.name} has "
                f"{labels.shape[0]} labels (in {data_dir}); the files do not belong together"
            )
        _check_labels(labels_path, labels, 10)
        split += [images[..., None], labels]
    x_train, y_train, x_test, y_test = split
    return x_train, y_train, x_test, y_test


def mnist_file_names(stem: str) -> tuple[str, ...]:
    """The names one MNIST file is accepted under, in the order they are tried.

    The official name (`train-images-idx3-ubyte`) and the widespread variant
    with a dot (`train-images.idx3-ubyte`, as in many mirrors and Kaggle
    copies), each raw, then gzipped. Where an archive unpacked a file into a
    folder of its own name (`train-images-idx3-ubyte/train-images-idx3-ubyte`),
    the file in that folder is used.

        >>> mnist_file_names("t10k-labels-idx1-ubyte")
        ('t10k-labels-idx1-ubyte', 't10k-labels-idx1-ubyte.gz', 't10k-labels.idx1-ubyte', 't10k-labels.idx1-ubyte.gz')
    """
    dotted = stem.replace("-idx", ".idx", 1)
    return (stem, stem + ".gz", dotted, dotted + ".gz")


def _either(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}"


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in mnist_file_names(stem):
        candidate = data_dir / name
        if candidate.is_dir():
            candidate = candidate / name
        if candidate.is_file():
            return candidate
    return None


def _read_maybe_gzip(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip file ({e}); delete it and download it again") from e


# --- CIFAR-10: python pickles ------------------------------------------------


def read_cifar10(
    data_dir: str | os.PathLike, *, download: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read CIFAR-10 (python version) from `data_dir`, unnormalised.

    Looks for the extracted folder `data_dir/cifar-10-batches-py/` first, then
    the archive `data_dir/cifar-10-python.tar.gz`, whose members are read in
    place (no extraction). Five training batches `data_batch_1..5` and one
    `test_batch`, each a pickled dict (protocol 2, written by Python 2, so it
    is loaded with `encoding="bytes"` and its keys are bytes):
      b"data":   uint8 array [N, 3072]; one row is an image in CHW order, i.e.
                 1024 red, then 1024 green, then 1024 blue values, each plane
                 32 rows of 32 pixels;
      b"labels": list of N ints in 0..9.
    (Also b"batch_label" and b"filenames", not needed here.) The pickles are
    read with an unpickler that accepts only numpy arrays and builtins, so a
    tampered file cannot run code.

    Returns:
      (x_train, y_train, x_test, y_test): uint8 [N, 32, 32, 3] images (NHWC)
      and uint8 [N] labels.
    """
    data_dir = Path(data_dir)
    folder, archive = data_dir / CIFAR10_DIR, data_dir / CIFAR10_ARCHIVE
    if not folder.is_dir() and not archive.is_file():
        if not download:
            raise DataError(
                f"cifar10: missing data in {data_dir}: looked for the folder {CIFAR10_DIR}/ and the archive "
                f"{CIFAR10_ARCHIVE}. Fetch it with load('cifar10', {str(data_dir)!r}, download=True) (the CLI's "
                f"--download), or download {CIFAR10_URL} into that folder."
            )
        _download(CIFAR10_URL, archive, "sha256", CIFAR10_SHA256[CIFAR10_ARCHIVE])
    names = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    if folder.is_dir():
        batches = {name: _cifar_batch(folder / name, _read_file(folder / name)) for name in names}
    else:
        batches = _cifar_batches_from_archive(archive, names)
    x_train = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN_BATCHES])
    y_train = np.concatenate([batches[n][1] for n in CIFAR10_TRAIN_BATCHES])
    return x_train, y_train, *batches[CIFAR10_TEST_BATCH]


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR-10 batch; the folder {path.parent} is incomplete")
    return path.read_bytes()


def _cifar_batches_from_archive(archive: Path, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                member = f"{CIFAR10_DIR}/{name}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise DataError(f"{archive}: has no file {member}; it is not the CIFAR-10 python archive")
                with f:
                    out[name] = _cifar_batch(f"{archive}:{member}", f.read())
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{archive}: corrupt archive ({e}); delete it and download it again") from e
    return out


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and builtins only: a pickle names the callables it
    runs, and these are all a CIFAR batch needs (numpy 1.x and 2.x spellings)."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _cifar_batch(path: Path | str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in any of a dozen ways
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e}); the file is corrupt") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    missing = [key for key in (b"data", b"labels") if key not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(map(repr, batch))}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: wrong data: expected uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: labels are not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but labels of shape {list(labels.shape)}")
    _check_labels(path, labels, 10)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.uint8)


def _check_labels(path: Path | str, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: label values must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}"
        )


# --- download with checksum --------------------------------------------------


def _verify(path: str | os.PathLike, algorithm: str, expected: str, *, name: str | None = None) -> None:
    """Raise DataError unless the `algorithm` digest ("sha256", "md5", ...) of `path` is `expected`.

    `name` is the file name the message reports (default: that of `path`).
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got != expected.lower():
        name = Path(path).name if name is None else name
        raise DataError(f"{name}: {algorithm} checksum mismatch: expected {expected}, got {got}")


def _download(url: str, dest: Path, algorithm: str, expected: str, *, timeout: float = 60.0) -> None:
    """Fetch `url` to `dest`: into a temporary file beside it, renamed only once the digest matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, f, 1 << 20)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(
                f"{dest.name}: download from {url} failed ({e}); check the network, or download it by hand "
                f"into {dest.parent}"
            ) from e
        try:
            _verify(tmp, algorithm, expected, name=dest.name)
        except DataError as e:
            raise DataError(
                f"{e}; downloaded from {url}, not kept. Try again, or download it by hand into {dest.parent}"
            ) from None
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the data is not
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --- standardisation ---------------------------------------------------------


def _standardised(name, x_train, y_train, x_test, y_test, *, num_classes) -> Dataset:
    """[0, 1]-scale (uint8 / 255) and standardise with the training set's per-channel stats."""
    x_train, x_test = _unit_float32(x_train), _unit_float32(x_test)
    mean, std = _channel_stats(x_train)
    for x in (x_train, x_test):
        x -= mean
        x /= std
    arrays = dict(
        x_train=x_train,
        y_train=np.asarray(y_train, np.int32),
        x_test=x_test,
        y_test=np.asarray(y_test, np.int32),
        mean=mean,
        std=std,
    )
    for a in arrays.values():
        a.flags.writeable = False
    return Dataset(name=name, num_classes=num_classes, **arrays)


def _unit_float32(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        out = x.astype(np.float32)
        out /= 255.0
        return out
    return np.array(x, dtype=np.float32)  # a copy: it is standardised in place


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in float64, a chunk of images at a time (CIFAR-10 in
    float64 at once would need 1.2 GB)."""
    count = x.shape[0] * x.shape[1] * x.shape[2]
    total = sum(x[i : i + chunk].sum(axis=(0, 1, 2), dtype=np.float64) for i in range(0, len(x), chunk))
    mean = total / count
    sq = sum(np.square(x[i : i + chunk] - mean).sum(axis=(0, 1, 2)) for i in range(0, len(x), chunk))
    std = np.sqrt(sq / count)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


# --- batching ----------------------------------------------------------------


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """How many batches `batches` yields for `n` examples."""
    if batch_size < 1:
        raise ValueError(f"num_batches: batch_size must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key_or_seed: Any,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over one epoch of (x, y) minibatches in a reproducible order.

    The order is a permutation drawn from a numpy Generator seeded with
    `key_or_seed`, so the same seed always gives the same batches. Pass a new
    seed each epoch, e.g. `(seed, epoch)`.

    Args:
      x, y: arrays with the same leading dimension.
      batch_size: examples per batch.
      key_or_seed: an int, a tuple of non-negative ints such as (seed, epoch),
        or a JAX PRNG key (typed or raw uint32). Ignored, and may be None, when
        shuffle is False.
      shuffle: permute the examples; otherwise keep their order.
      drop_last: skip the final short batch, so every batch has the same shape
        (and jit compiles once).

    Yields:
      (x_batch, y_batch), `num_batches(len(x), batch_size, drop_last)` times.

    Example:
      >>> import numpy as np
      >>> x, y = np.arange(10).reshape(10, 1), np.arange(10)
      >>> [yb.tolist() for _, yb in batches(x, y, 4, key_or_seed=None, shuffle=False, drop_last=False)]
      [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"batches: x has {n} examples but y has {len(y)}")
    count = num_batches(n, batch_size, drop_last)
    if count == 0 and n > 0:
        raise ValueError(
            f"batches: batch_size {batch_size} exceeds the {n} examples and drop_last=True, so no batch "
            f"would come out; lower batch_size or pass drop_last=False"
        )
    if shuffle:
        order = np.random.default_rng(_seed_entropy(key_or_seed)).permutation(n)
    else:
        order = np.arange(n)

    def generate():
        for b in range(count):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield x[idx], y[idx]

    return generate()


def _seed_entropy(key_or_seed) -> list[int]:
    if key_or_seed is None:
        raise ValueError("batches: shuffle=True needs key_or_seed (an int, a tuple such as (seed, epoch), or a key)")
    if type(key_or_seed).__module__.startswith("jax"):
        import jax  # only here: the data layer itself never needs JAX

        if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
            key_or_seed = jax.random.key_data(key_or_seed)
    values = np.asarray(key_or_seed)
    if values.dtype.kind not in "iu" or (values < 0).any():
        raise ValueError(f"batches: key_or_seed must be non-negative integers or a JAX key, got {key_or_seed!r}")
    return [int(v) for v in values.ravel()]
