"""The data layer: digits, MNIST IDX files, CIFAR-10 pickles, synthetic, downloads, batching.

MNIST and CIFAR-10 files are written here, tiny, in the real on-disk formats
(IDX headers with struct.pack; CIFAR batches as protocol-2 pickled dicts), so
the parsers are tested byte for byte without the network.
"""

import doctest
import gzip
import hashlib
import io
import pickle
import struct
import tarfile
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from jax_resnet import data
from jax_resnet.data import DataError

# --- helpers: files in the real formats --------------------------------------


def idx_bytes(array, magic=None):
    """An IDX file: big-endian magic (0x0000_08_<ndim> for uint8), one 4-byte size per dim, the bytes."""
    a = np.asarray(array, np.uint8)
    magic = 0x0800 | a.ndim if magic is None else magic
    return struct.pack(">I", magic) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def write_mnist(directory, gz=False, n_train=5, n_test=3, size=28, name=lambda stem: stem):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for i, (stem, array) in enumerate(arrays.items()):
        use_gz = gz if isinstance(gz, bool) else i % 2 == 1  # "mixed": every other file gzipped
        write(directory / (name(stem) + ".gz" if use_gz else name(stem)), idx_bytes(array), use_gz)
    return arrays


def cifar_value(i, row, col, channel):
    return (i * 31 + row * 7 + col * 3 + channel * 101) % 256


def cifar_rows(first, n):
    """Rows of a CIFAR batch, built channel plane by plane (CHW), independently of any reshape."""
    rows = [
        [cifar_value(i, r, c, ch) for ch in range(3) for r in range(32) for c in range(32)]
        for i in range(first, first + n)
    ]
    return np.array(rows, np.uint8)


def cifar_expected_nhwc(first, n):
    return np.array(
        [
            [[[cifar_value(i, r, c, ch) for ch in range(3)] for c in range(32)] for r in range(32)]
            for i in range(first, first + n)
        ],
        np.uint8,
    )


def cifar_pickle(rows, labels, overrides=None):
    """A batch as the Python-2 originals are: a protocol-2 pickled dict with bytes keys.
    The global is spelled `numpy.core.multiarray`, as numpy 1.x wrote it."""
    batch = {
        b"batch_label": b"a test batch",
        b"data": rows,
        b"labels": list(labels),
        b"filenames": [b"img_%d.png" % i for i in range(len(rows))],
    }
    batch.update(overrides or {})
    return pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


CIFAR_PER_BATCH = 2
CIFAR_TEST_N = 3


def cifar_files():
    """{batch name: pickle bytes}; training batch k holds images 2k..2k+1, the test batch images 100..102."""
    files = {}
    for k, name in enumerate(data.CIFAR10_TRAIN_BATCHES):
        first = k * CIFAR_PER_BATCH
        files[name] = cifar_pickle(cifar_rows(first, CIFAR_PER_BATCH), [(first + j) % 10 for j in range(2)])
    files["test_batch"] = cifar_pickle(cifar_rows(100, CIFAR_TEST_N), [9, 0, 5])
    return files


def write_cifar_dir(directory, files):
    folder = directory / data.CIFAR10_DIR
    folder.mkdir(parents=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return folder


def cifar_tar_bytes(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{data.CIFAR10_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


# --- digits ------------------------------------------------------------------


def test_digits_shapes_dtypes_and_75_25_split():
    ds = data.load("digits")
    assert ds.x_train.shape == (1347, 8, 8, 1) and ds.x_test.shape == (450, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_test) == int(np.ceil(0.25 * 1797))  # scikit-learn rounds the test share up
    assert ds.mean.shape == ds.std.shape == (1,)


def test_digits_split_is_stratified():
    ds = data.load("digits")
    totals = np.bincount(ds.y_train, minlength=10) + np.bincount(ds.y_test, minlength=10)
    test_counts = np.bincount(ds.y_test, minlength=10)
    assert np.all(np.abs(test_counts - 0.25 * totals) <= 1), (test_counts, totals)


def test_digits_split_is_fixed_by_seed():
    a, b, c = data.load("digits", seed=0), data.load("digits", seed=0), data.load("digits", seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)


def test_standardisation_uses_training_statistics():
    ds = data.load("digits", seed=3)
    bunch = load_digits()
    x = (bunch.images / 16.0)[..., None]
    x_train, x_test, _, _ = train_test_split(x, bunch.target, test_size=0.25, stratify=bunch.target, random_state=3)
    np.testing.assert_allclose(ds.mean, [x_train.mean()], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [x_train.std()], rtol=1e-6)
    np.testing.assert_allclose(ds.x_test, (x_test - x_train.mean()) / x_train.std(), atol=1e-5)
    assert abs(ds.x_train.mean()) < 1e-5 and abs(ds.x_train.std() - 1) < 1e-5
    assert abs(ds.x_test.mean()) > 1e-4  # test data is not re-centred on its own statistics


def test_dataset_arrays_are_read_only():
    ds = data.load("synthetic")
    with pytest.raises(ValueError, match="read-only"):
        ds.x_train[0, 0, 0, 0] = 1.0


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'digits', 'mnist', 'cifar10', 'synthetic'"):
        data.load("imagenet")


def test_options_are_only_for_synthetic():
    with pytest.raises(ValueError, match="takes no options"):
        data.load("digits", n_train=3)


def test_augmentations_are_a_property_of_the_data_set():
    """Every data set has its row; only CIFAR-10 flips; padding is a black pixel, standardised."""
    assert set(data.AUGMENTATIONS) == set(data.DATASETS)
    assert {name for name, a in data.AUGMENTATIONS.items() if a.flip} == {"cifar10"}
    assert all(a.pad > 0 for a in data.AUGMENTATIONS.values())
    ds = data.load("synthetic", image_shape=(4, 4, 3))
    augmentation = ds.augmentation
    assert augmentation.pad == data.AUGMENTATIONS["synthetic"].pad
    np.testing.assert_allclose(augmentation.fill, -ds.mean / ds.std, rtol=1e-6)
    hash(augmentation)  # a static argument of the compiled step


# --- synthetic ---------------------------------------------------------------


def test_synthetic_is_configurable_balanced_and_seeded():
    ds = data.load("synthetic", n_train=60, n_test=20, image_shape=(6, 5, 3), num_classes=4, seed=7)
    assert ds.x_train.shape == (60, 6, 5, 3) and ds.x_test.shape == (20, 6, 5, 3)
    assert ds.mean.shape == (3,) and ds.num_classes == 4
    np.testing.assert_array_equal(np.bincount(ds.y_train), [15, 15, 15, 15])
    again = data.load("synthetic", n_train=60, n_test=20, image_shape=(6, 5, 3), num_classes=4, seed=7)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    assert not np.array_equal(
        ds.x_train, data.load("synthetic", n_train=60, n_test=20, image_shape=(6, 5, 3), num_classes=4, seed=8).x_train
    )


def test_synthetic_classes_are_separable_by_nearest_class_mean():
    ds = data.load("synthetic")
    centroids = np.stack([ds.x_train[ds.y_train == k].mean(0) for k in range(10)])
    dist = ((ds.x_test[:, None] - centroids[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == ds.y_test).mean() > 0.9


# --- MNIST: IDX --------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True, "mixed"], ids=["raw", "gz", "mixed"])
def test_mnist_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    x_train, y_train, x_test, y_test = data.read_mnist(tmp_path)
    np.testing.assert_array_equal(x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(x_test[..., 0], arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])

    ds = data.load("mnist", tmp_path)
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    np.testing.assert_allclose(ds.x_train * ds.std + ds.mean, x_train / 255.0, atol=1e-5)
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_dotted_file_names_are_read(tmp_path, gz):
    """The widespread variant `train-images.idx3-ubyte` (a dot before idx), raw or gzipped."""
    arrays = write_mnist(tmp_path, gz=gz, name=lambda stem: stem.replace("-idx", ".idx"))
    assert (tmp_path / ("train-images.idx3-ubyte" + (".gz" if gz else ""))).is_file()
    x_train, y_train, x_test, y_test = data.read_mnist(tmp_path)
    np.testing.assert_array_equal(x_train[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_file_in_a_folder_of_its_own_name_is_read(tmp_path):
    """As some archives unpack: train-images-idx3-ubyte/train-images-idx3-ubyte."""
    arrays = write_mnist(tmp_path)
    stem = "train-images-idx3-ubyte"
    (tmp_path / stem).rename(tmp_path / "moved")
    (tmp_path / stem).mkdir()
    (tmp_path / "moved").rename(tmp_path / stem / stem)
    np.testing.assert_array_equal(data.read_mnist(tmp_path)[0][..., 0], arrays[stem])


def test_mnist_official_name_wins_over_the_variant(tmp_path):
    arrays = write_mnist(tmp_path)
    write(tmp_path / "train-images.idx3-ubyte", idx_bytes(np.zeros((7, 28, 28))))
    np.testing.assert_array_equal(data.read_mnist(tmp_path)[0][..., 0], arrays["train-images-idx3-ubyte"])


def test_mnist_default_dir_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist")
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.load("mnist").x_train.shape == (5, 28, 28, 1)


def test_idx_header_is_big_endian(tmp_path):
    # 300 images of 1x1: a little-endian reader would see 300 as 0x2c010000 and fail.
    path = write(tmp_path / "x", idx_bytes(np.arange(300).reshape(300, 1, 1) % 256))
    assert data.read_idx(path, magic=data.IDX_IMAGES_MAGIC).shape == (300, 1, 1)


def test_idx_bad_magic(tmp_path):
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5)))
    with pytest.raises(
        DataError,
        match=r"train-labels-idx1-ubyte: bad magic number: expected 0x00000803, "
        r"got 0x00000801 \(element type uint8, 1 dimensions\)",
    ):
        data.read_idx(labels, magic=data.IDX_IMAGES_MAGIC)


def test_idx_gzip_without_suffix_is_diagnosed(tmp_path):
    path = write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(3)), gz=True)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: bad magic number.*gzip-compressed"):
        data.read_idx(path, magic=data.IDX_LABELS_MAGIC)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_truncated(tmp_path, gz):
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = write(tmp_path / name, idx_bytes(np.zeros((2, 28, 28)))[:-10], gz)
    with pytest.raises(DataError, match=rf"{name}: truncated file: .*expected 1568 bytes of data, got 1558"):
        data.read_idx(path, magic=data.IDX_IMAGES_MAGIC)


def test_idx_truncated_header_and_trailing_bytes(tmp_path):
    short = write(tmp_path / "short-idx1-ubyte", idx_bytes(np.zeros(4))[:6])
    with pytest.raises(DataError, match="short-idx1-ubyte: truncated IDX header"):
        data.read_idx(short)
    long = write(tmp_path / "long-idx1-ubyte", idx_bytes(np.zeros(4)) + b"\0")
    with pytest.raises(DataError, match="long-idx1-ubyte: trailing bytes.*expected 4 bytes of data, got 5"):
        data.read_idx(long)


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte has 3 images but t10k-labels-idx1-ubyte has 4 labels"):
        data.read_mnist(tmp_path)


def test_mnist_wrong_image_size(tmp_path):
    write_mnist(tmp_path, size=10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: wrong image size: expected 28x28, got 10x10"):
        data.read_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes([0, 1, 2, 3, 10]))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label values must be in 0\.\.9, got 0\.\.10"):
        data.read_mnist(tmp_path)


def test_mnist_missing_files_are_named_with_how_to_get_them(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        data.load("mnist", tmp_path)
    message = str(err.value)
    assert (
        "train-labels-idx1-ubyte, train-labels-idx1-ubyte.gz, train-labels.idx1-ubyte or train-labels.idx1-ubyte.gz"
        in message
    )
    assert "t10k-images-idx3-ubyte, t10k-images-idx3-ubyte.gz, t10k-images.idx3-ubyte or" in message
    assert "train-images" not in message and "download=True" in message and data.MNIST_URL in message


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: b"this is not gzip at all",
        lambda gz: gz[: len(gz) // 2],  # cut mid-stream
        lambda gz: gz[:-8] + bytes(8),  # CRC and length trailer zeroed
    ],
    ids=["not-gzip", "cut", "bad-crc"],
)
def test_mnist_corrupt_gzip(tmp_path, damage):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: corrupt gzip file"):
        data.read_mnist(tmp_path)


# --- CIFAR-10 ----------------------------------------------------------------


def check_cifar_pixels(x_train, y_train, x_test, y_test):
    assert x_train.shape == (10, 32, 32, 3) and x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(x_train, cifar_expected_nhwc(0, 10))
    np.testing.assert_array_equal(x_test, cifar_expected_nhwc(100, 3))
    np.testing.assert_array_equal(y_train, np.arange(10))
    np.testing.assert_array_equal(y_test, [9, 0, 5])


def test_cifar_nhwc_from_the_folder(tmp_path):
    write_cifar_dir(tmp_path, cifar_files())
    check_cifar_pixels(*data.read_cifar10(tmp_path))
    # one spot by hand: image 1, row 2, column 3, blue = (31 + 14 + 9 + 202) % 256
    assert data.read_cifar10(tmp_path)[0][1, 2, 3, 2] == 0


def test_cifar_nhwc_from_the_archive(tmp_path):
    (tmp_path / data.CIFAR10_ARCHIVE).write_bytes(cifar_tar_bytes(cifar_files()))
    check_cifar_pixels(*data.read_cifar10(tmp_path))


def test_cifar_load_standardises_per_channel(tmp_path):
    write_cifar_dir(tmp_path, cifar_files())
    ds = data.load("cifar10", tmp_path)
    raw = cifar_expected_nhwc(0, 10) / 255.0
    np.testing.assert_allclose(ds.mean, raw.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, raw.std(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(np.rint((ds.x_test * ds.std + ds.mean) * 255), cifar_expected_nhwc(100, 3))


def test_cifar_missing_everything(tmp_path):
    expected = r"cifar-10-batches-py/ and the archive cifar-10-python\.tar\.gz.*download=True"
    with pytest.raises(DataError, match=expected):
        data.load("cifar10", tmp_path)


def test_cifar_missing_batch(tmp_path):
    folder = write_cifar_dir(tmp_path, cifar_files())
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4: missing CIFAR-10 batch"):
        data.read_cifar10(tmp_path)


def test_cifar_archive_missing_member(tmp_path):
    files = cifar_files()
    del files["test_batch"]
    (tmp_path / data.CIFAR10_ARCHIVE).write_bytes(cifar_tar_bytes(files))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: has no file cifar-10-batches-py/test_batch"):
        data.read_cifar10(tmp_path)


@pytest.mark.parametrize("damage", [lambda b: b"not a tarball", lambda b: b[: len(b) // 2]], ids=["junk", "cut"])
def test_cifar_corrupt_archive(tmp_path, damage):
    (tmp_path / data.CIFAR10_ARCHIVE).write_bytes(damage(cifar_tar_bytes(cifar_files())))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: corrupt archive"):
        data.read_cifar10(tmp_path)


def bad_batch(overrides):
    return cifar_pickle(cifar_rows(0, CIFAR_PER_BATCH), [0, 1], overrides)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x80\x02garbage", "data_batch_2: not a readable pickle"),
        (bad_batch({})[:100], "data_batch_2: not a readable pickle"),
        (pickle.dumps([1, 2, 3], protocol=2), "data_batch_2: expected a pickled dict, got list"),
        (pickle.dumps({b"data": cifar_rows(0, 2)}, protocol=2), r"data_batch_2: missing key\(s\) \[b'labels'\]"),
        (
            pickle.dumps({"data": cifar_rows(0, 2), "labels": [0, 1]}, protocol=2),
            r"data_batch_2: missing key\(s\) \[b'data', b'labels'\]",
        ),
        (bad_batch({b"data": cifar_rows(0, 2)[:, :1024]}), r"data_batch_2: wrong data: expected uint8 \[N, 3072\]"),
        (bad_batch({b"data": cifar_rows(0, 2).astype(np.float32)}), "data_batch_2: wrong data.*float32"),
        (bad_batch({b"labels": [0, 1, 2]}), r"data_batch_2: 2 images but labels of shape \[3\]"),
        (bad_batch({b"labels": [0, 10]}), r"data_batch_2: label values must be in 0\.\.9, got 0\.\.10"),
        (bad_batch({b"labels": [-1, 3]}), r"data_batch_2: label values must be in 0\.\.9, got -1\.\.3"),
    ],
    ids=["junk", "cut", "not-dict", "no-labels", "str-keys", "short-rows", "float", "count", "label-10", "label-neg"],
)
def test_cifar_bad_batch(tmp_path, payload, match):
    files = cifar_files()
    files["data_batch_2"] = payload
    write_cifar_dir(tmp_path, files)
    with pytest.raises(DataError, match=match):
        data.read_cifar10(tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    files = cifar_files()
    files["test_batch"] = pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2)
    write_cifar_dir(tmp_path, files)
    with pytest.raises(DataError, match=r"test_batch: not a readable pickle .*refusing to load \w+\.print"):
        data.read_cifar10(tmp_path)


# --- downloads ---------------------------------------------------------------


class FakeNetwork:
    """Stands in for urllib.request.urlopen: serves bytes by URL and records requests."""

    def __init__(self, pages):
        self.pages, self.requested = pages, []

    def __call__(self, url, timeout=None):
        self.requested.append(url)
        if url not in self.pages:
            raise urllib.error.URLError("no route to host")
        return io.BytesIO(self.pages[url])


def sha256(payload):
    return hashlib.sha256(payload).hexdigest()


def test_mnist_download_verifies_then_places_files(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    arrays = write_mnist(source, gz=True)
    pages = {data.MNIST_URL + p.name: p.read_bytes() for p in source.iterdir()}
    for url, payload in pages.items():
        monkeypatch.setitem(data.MNIST_SHA256, url.rsplit("/", 1)[1], sha256(payload))
    network = FakeNetwork(pages)
    monkeypatch.setattr(urllib.request, "urlopen", network)

    target = tmp_path / "mnist"
    ds = data.load("mnist", target, download=True)
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    assert sorted(network.requested) == sorted(pages)
    assert sorted(p.name for p in target.iterdir()) == sorted(data.MNIST_SHA256)
    data.load("mnist", target, download=True)  # files in place: nothing fetched again
    assert len(network.requested) == 4


def test_download_bad_checksum_leaves_nothing(tmp_path, monkeypatch):
    url = data.MNIST_URL + "train-images-idx3-ubyte.gz"
    monkeypatch.setattr(urllib.request, "urlopen", FakeNetwork({url: b"a tampered file"}))
    with pytest.raises(
        DataError,
        match=rf"train-images-idx3-ubyte.gz: sha256 checksum mismatch: expected "
        rf"{data.MNIST_SHA256['train-images-idx3-ubyte.gz']}, "
        rf"got {sha256(b'a tampered file')}.*not kept",
    ):
        data.load("mnist", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_download_network_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", FakeNetwork({}))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: download from .*failed.*no route to host"):
        data.load("cifar10", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_cifar_download(tmp_path, monkeypatch):
    archive = cifar_tar_bytes(cifar_files())
    monkeypatch.setitem(data.CIFAR10_SHA256, data.CIFAR10_ARCHIVE, sha256(archive))
    network = FakeNetwork({data.CIFAR10_URL: archive})
    monkeypatch.setattr(urllib.request, "urlopen", network)
    check_cifar_pixels(*data.read_cifar10(tmp_path / "new", download=True))
    assert network.requested == [data.CIFAR10_URL]
    assert [p.name for p in (tmp_path / "new").iterdir()] == [data.CIFAR10_ARCHIVE]


def test_verify_is_generic_over_algorithms(tmp_path):
    path = write(tmp_path / "f", b"abc")
    data._verify(path, "md5", "900150983cd24fb0d6963f7d28e17f72")
    data._verify(path, "sha256", sha256(b"abc").upper())
    with pytest.raises(DataError, match="f: md5 checksum mismatch"):
        data._verify(path, "md5", "0" * 32)


def test_checksum_constants_are_well_formed():
    digests = {**data.MNIST_SHA256, **data.CIFAR10_SHA256}
    assert sorted(digests) == sorted([s + ".gz" for s in data.MNIST_FILES.values()] + [data.CIFAR10_ARCHIVE])
    for digest in digests.values():
        assert len(digest) == 64 and int(digest, 16) >= 0 and digest == digest.lower()


# --- batching ----------------------------------------------------------------


def batch_labels(n, batch_size, seed, **kwargs):
    x = np.arange(n, dtype=np.float32)[:, None]
    y = np.arange(n)
    out = []
    for xb, yb in data.batches(x, y, batch_size, key_or_seed=seed, **kwargs):
        np.testing.assert_array_equal(xb[:, 0], yb)  # x and y stay paired
        out.append(yb.tolist())
    return out


def test_batches_are_reproducible_by_seed():
    assert batch_labels(50, 8, (0, 1)) == batch_labels(50, 8, (0, 1))
    assert batch_labels(50, 8, (0, 1)) != batch_labels(50, 8, (0, 2))
    by_key = batch_labels(50, 8, jax.random.key(5))
    assert by_key == batch_labels(50, 8, jax.random.PRNGKey(5)) == batch_labels(50, 8, (0, 5))  # the key's two words


@pytest.mark.parametrize("n, batch_size", [(50, 8), (48, 8), (7, 7), (3, 1)])
def test_batches_cover_every_example(n, batch_size):
    full = batch_labels(n, batch_size, 0, drop_last=False)
    assert sorted(sum(full, [])) == list(range(n))
    assert len(full) == data.num_batches(n, batch_size, drop_last=False)
    dropped = batch_labels(n, batch_size, 0)
    assert len(dropped) == data.num_batches(n, batch_size) == n // batch_size
    assert all(len(b) == batch_size for b in dropped)
    assert len(set(sum(dropped, []))) == n // batch_size * batch_size


def test_batches_unshuffled_keep_order():
    assert batch_labels(5, 2, None, shuffle=False, drop_last=False) == [[0, 1], [2, 3], [4]]


def test_batches_errors_are_eager_and_clear():
    x = np.zeros((10, 1))
    with pytest.raises(ValueError, match="x has 10 examples but y has 9"):
        data.batches(x, np.zeros(9), 2, key_or_seed=0)
    with pytest.raises(ValueError, match="batch_size 16 exceeds the 10 examples"):
        data.batches(x, np.zeros(10), 16, key_or_seed=0)
    with pytest.raises(ValueError, match="needs key_or_seed"):
        data.batches(x, np.zeros(10), 2, key_or_seed=None)
    with pytest.raises(ValueError, match="non-negative integers"):
        data.batches(x, np.zeros(10), 2, key_or_seed=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.num_batches(10, 0)


def test_module_docstring_examples_run():
    result = doctest.testmod(data)
    assert result.attempted > 0 and result.failed == 0
