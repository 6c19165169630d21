import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from cdlib.core import data, readers
from cdlib.core.data import DataError, DeviceData, load_dataset


# ----------------------------------------------------------------------------- CIFAR pickle layout

def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_split(n, num_classes, rng, label_key, coarse=False):
    d = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         label_key: rng.integers(0, num_classes, n).tolist()}
    if coarse:
        d["coarse_labels"] = [label // 5 for label in d[label_key]]
    return d


@pytest.fixture
def small_counts(monkeypatch):
    monkeypatch.setattr(readers, "CIFAR_COUNTS", {"train": 500, "test": 100})


def make_cifar100(root, rng):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = _cifar_split(500, 100, rng, "fine_labels", coarse=True)
    train["fine_labels"][:100] = list(range(100))  # every class present, so the super-class map is complete
    train["coarse_labels"][:100] = [c // 5 for c in range(100)]
    _write_pickle(folder / "train", train)
    _write_pickle(folder / "test", _cifar_split(100, 100, rng, "fine_labels", coarse=True))
    _write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                    "coarse_label_names": [f"c{i}" for i in range(20)]})
    return folder


def test_cifar100_original_layout(tmp_path, small_counts):
    rng = np.random.default_rng(0)
    folder = make_cifar100(tmp_path, rng)
    ds = load_dataset("cifar100", root=tmp_path)
    raw = pickle.loads((folder / "train").read_bytes())
    assert ds.train_images.shape == (500, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (100, 32, 32, 3)
    # The pickle stores planes R, G, B of 1024 pixels each, row-major.
    assert ds.train_images[3, 0, 1, 2] == raw["data"][3][2 * 1024 + 1]
    assert (ds.train_labels == np.array(raw["fine_labels"])).all()
    assert ds.num_classes == 100 and len(ds.superclasses) == 20
    assert (ds.superclass_of == np.arange(100) // 5).all()
    # The folder itself also works as root.
    assert load_dataset("cifar100", root=folder).train_images.shape[0] == 500


def test_cifar10_original_layout(tmp_path, small_counts):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", _cifar_split(100, 10, rng, "labels"))
    _write_pickle(folder / "test_batch", _cifar_split(100, 10, rng, "labels"))
    _write_pickle(folder / "batches.meta", {"label_names": [f"k{i}" for i in range(10)]})
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.train_images.shape == (500, 32, 32, 3) and ds.num_classes == 10
    assert ds.superclass_of is None


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("CDLIB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        load_dataset("cifar100")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "CDLIB_DATA" in message and "download=True" in message


@pytest.mark.parametrize("fault, expected", [
    ("truncated", "truncated"),
    ("shape", "shape"),
    ("labels", "labels outside"),
    ("count", "expected 500 images"),
    ("missing_meta", "missing"),
])
def test_malformed_cifar_is_refused(tmp_path, small_counts, fault, expected):
    rng = np.random.default_rng(2)
    folder = make_cifar100(tmp_path, rng)
    train = pickle.loads((folder / "train").read_bytes())
    if fault == "truncated":
        blob = (folder / "train").read_bytes()
        (folder / "train").write_bytes(blob[: len(blob) // 2])
    elif fault == "shape":
        train["data"] = train["data"][:, :3000]
        _write_pickle(folder / "train", train)
    elif fault == "labels":
        train["fine_labels"][7] = 100
        _write_pickle(folder / "train", train)
    elif fault == "count":
        train["data"], train["fine_labels"] = train["data"][:400], train["fine_labels"][:400]
        _write_pickle(folder / "train", train)
    elif fault == "missing_meta":
        (folder / "meta").unlink()
    with pytest.raises(DataError, match=expected):
        load_dataset("cifar100", root=tmp_path)


class _WritesMarker:
    """Unpickling this calls exec, which creates the marker file: what a crafted pickle could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_pickle_that_would_run_code_is_refused(tmp_path, small_counts):
    folder = make_cifar100(tmp_path, np.random.default_rng(4))
    marker = tmp_path / "marker"
    _write_pickle(folder / "train", {"data": _WritesMarker(marker), "fine_labels": []})
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", root=tmp_path)
    message = str(err.value)
    assert str(folder / "train") in message and "builtins.exec" in message
    assert "arbitrary code" in message and "fresh copy" in message
    assert not marker.exists()
    pickle.loads((folder / "train").read_bytes())  # the payload is real: plain pickle runs it
    assert marker.exists()


@pytest.mark.parametrize("protocol, numpy_core", [(2, "numpy.core"), (2, "numpy._core"), (4, None), (5, None)])
def test_numpy_pickles_of_numpy_1_and_2_load(tmp_path, protocol, numpy_core):
    """numpy 1.x names its reconstruction functions numpy.core.*, numpy 2.x numpy._core.*."""
    arrays = {"data": np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072), "labels": np.array([3, 1]),
              "big_endian": np.arange(3, dtype=">f4"), "fortran": np.asfortranarray(np.ones((2, 3)))}
    blob = pickle.dumps({**arrays, "scalar": np.int64(7), "names": ["a", "b"]}, protocol=protocol)
    if numpy_core:  # protocol 2 names globals in text lines, so the module path can be swapped in place
        blob = blob.replace(b"numpy._core.", b"numpy.core.").replace(b"numpy.core.", f"{numpy_core}.".encode())
        assert f"{numpy_core}.multiarray".encode() in blob
    (tmp_path / "file").write_bytes(blob)
    loaded = readers._unpickle(tmp_path / "file")
    for key, array in arrays.items():
        assert loaded[key].dtype.type == array.dtype.type and np.array_equal(loaded[key], array)
    assert loaded["scalar"] == 7 and loaded["names"] == ["a", "b"]


def test_damaged_dtype_is_a_data_error_not_a_crash(tmp_path):
    """One damaged byte (a NONE turned into BUILD) hands numpy's dtype a state that crashes it."""
    blob = pickle.dumps({"data": np.zeros((5, 3072), np.uint8)}, protocol=4)
    assert blob.count(b"NNNJ") == 1
    (tmp_path / "file").write_bytes(blob.replace(b"NNNJ", b"NNbJ"))
    with pytest.raises(DataError, match="dtype state"):
        readers._unpickle(tmp_path / "file")


def test_pickle_that_is_not_a_dict_is_refused(tmp_path):
    _write_pickle(tmp_path / "file", [1, 2, 3])
    with pytest.raises(DataError, match="holds a list"):
        readers._unpickle(tmp_path / "file")


def test_real_cifar100_sample(cifar100_sample):
    """The shared sample: real test images (first 20) and real class names, no train file."""
    folder = cifar100_sample / "cifar-100-python"
    images, labels, coarse = readers.read_cifar_split(folder / "test", "fine_labels", 100, expected=20)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() < 100 and coarse.max() < 20
    meta = pickle.loads((folder / "meta").read_bytes(), encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and meta["fine_label_names"][0] == "apple"
    assert len(meta["coarse_label_names"]) == 20
    fine, coarse_train = (np.load(cifar100_sample / f"train_{k}_labels.npy") for k in ("fine", "coarse"))
    assert len(fine) == 50000 and np.bincount(fine).tolist() == [500] * 100
    # Each fine class belongs to exactly one super-class, five classes per super-class.
    pairs = set(zip(fine.tolist(), coarse_train.tolist()))
    assert len(pairs) == 100 and np.bincount([c for _, c in pairs]).tolist() == [5] * 20
    # Without a train file, the loader says what is missing.
    with pytest.raises(DataError, match="missing"):
        load_dataset("cifar100", root=cifar100_sample)


def test_real_cifar10_jpeg_folder(cifar10_jpeg):
    ds = load_dataset(f"imagefolder:{cifar10_jpeg}")
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert ds.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    # Real photographs: per-channel train means near CIFAR-10's known (0.49, 0.48, 0.45).
    means = ds.train_images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(means, [0.491, 0.482, 0.447], atol=0.01)


def test_imagefolder_resizes_and_checks_classes(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "f" / split / cls / f"{i}.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}")
    assert ds.train_images.shape == (6, 32, 32, 3) and ds.classes == ["a", "b"]
    (tmp_path / "f" / "test" / "c").mkdir()
    with pytest.raises(DataError, match="differ"):
        readers.load_imagefolder(tmp_path / "f", size=16)  # another size: not the cached read


def _write_image(path, rng, size=32):
    """A random RGB PNG; returns its pixels."""
    from PIL import Image
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def _image_folder(root, rng, per_class=2):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(per_class):
                _write_image(root / split / cls / f"{i}.png", rng)
    return root


def test_imagefolder_cache_follows_the_files(tmp_path, isolated_outputs, monkeypatch, record_fault):
    rng = np.random.default_rng(5)
    folder = _image_folder(tmp_path / "f", rng)
    first = readers.load_imagefolder(folder)
    cached = list((isolated_outputs / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"  # no temporary file left behind
    with monkeypatch.context() as m:  # unchanged files: served from the cache, nothing decoded
        m.setattr(readers, "_read_image", lambda *args: pytest.fail("decoded an image despite the cache"))
        again = readers.load_imagefolder(folder)
    assert np.array_equal(again.train_images, first.train_images) and again.classes == ["a", "b"]
    # Rewritten with other pixels (and a new mtime, as a copy would give): the new pixels are served.
    image = folder / "train" / "b" / "1.png"
    stat = image.stat()
    pixels = _write_image(image, rng)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rewritten = readers.load_imagefolder(folder)
    assert np.array_equal(rewritten.train_images[3], pixels)
    assert np.array_equal(rewritten.train_images[:3], first.train_images[:3])
    # One image more: it is read, with its label.
    added = _write_image(folder / "train" / "a" / "9.png", rng)
    grown = readers.load_imagefolder(folder)
    assert grown.train_labels.tolist() == [0, 0, 0, 1, 1] and np.array_equal(grown.train_images[2], added)
    record_fault("data: image folder changed after caching", "fresh arrays (cache keyed by names, sizes, mtimes)", None)


def _damage(cache, how):
    if how == "truncated":
        blob = cache.read_bytes()
        cache.write_bytes(blob[: len(blob) // 2])
    elif how == "not an npz":
        cache.write_bytes(b"not an npz file")
    elif how == "missing keys":
        np.savez(cache, xtr=np.zeros((4, 32, 32, 3), np.uint8))
    elif how == "inconsistent shapes":
        with np.load(cache) as z:
            arrays = dict(z)
        np.savez(cache, **{**arrays, "xtr": arrays["xtr"][:3]})


@pytest.mark.parametrize("how", ["truncated", "not an npz", "missing keys", "inconsistent shapes"])
def test_damaged_imagefolder_cache_is_rebuilt(tmp_path, isolated_outputs, how, record_fault):
    folder = _image_folder(tmp_path / "f", np.random.default_rng(6))
    fresh = readers.load_imagefolder(folder)
    (cache,) = (isolated_outputs / "cache").iterdir()
    _damage(cache, how)
    with pytest.warns(UserWarning, match="damaged") as record:
        rebuilt = readers.load_imagefolder(folder)
    assert str(cache) in str(record[0].message) and f"rebuilding it from {folder}" in str(record[0].message)
    assert np.array_equal(rebuilt.train_images, fresh.train_images)
    assert np.array_equal(rebuilt.test_labels, fresh.test_labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(readers.load_imagefolder(folder).train_images, fresh.train_images)
    record_fault(f"data: image-folder cache {how}", f"rebuilt, with a warning: {record[0].message}", None)


def test_imagefolder_skips_what_is_not_an_image(tmp_path, record_fault):
    rng = np.random.default_rng(7)
    folder = _image_folder(tmp_path / "f", rng)
    train = folder / "train"
    for junk in ("a/.DS_Store", "a/notes.txt", "b/Thumbs.db", "README.md"):
        (train / junk).write_bytes(b"not an image")
    _write_image(train / "a" / "subfolder" / "0.png", rng)  # ImageFolder-by-class reads no deeper
    _write_image(train / ".hidden_class" / "0.png", rng)
    _write_image(train / "a" / "._0.png", rng)  # macOS's resource-fork copy: hidden
    upper = _write_image(train / "b" / "UPPER.PNG", rng)  # extensions match in any case
    with pytest.warns(UserWarning) as record:
        ds = readers.load_imagefolder(folder)
    messages = [str(w.message) for w in record]
    assert messages == [f"skipped 7 entries in {train} that are hidden, subfolders of a class folder or "
                        f"not images by extension (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp)."]
    assert ds.classes == ["a", "b"] and ds.train_labels.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(ds.train_images[4], upper)
    record_fault("data: non-image files in an image folder", messages[0], None)


@pytest.mark.parametrize("content", ["not an image", "truncated"])
def test_undecodable_image_is_named(tmp_path, content):
    folder = _image_folder(tmp_path / "f", np.random.default_rng(8))
    bad = folder / "test" / "b" / "bad.png"
    blob = (folder / "test" / "b" / "0.png").read_bytes()
    bad.write_bytes(b"not an image" if content == "not an image" else blob[: len(blob) // 2])
    with pytest.raises(DataError, match="Delete it or replace it") as err:
        readers.load_imagefolder(folder)
    assert str(bad) in str(err.value)


def test_empty_class_folder_is_named(tmp_path):
    folder = _image_folder(tmp_path / "f", np.random.default_rng(9))
    for split in ("train", "test"):
        (folder / split / "c").mkdir()
    with pytest.raises(DataError, match="holds no images") as err:
        readers.load_imagefolder(folder)
    assert str(folder / "train" / "c") in str(err.value)


def test_synthetic_is_deterministic_and_structured():
    a, b, c = data.synthetic(seed=0), data.synthetic(seed=0), data.synthetic(seed=1)
    assert (a.train_images == b.train_images).all() and not (a.train_images == c.train_images).all()
    assert a.num_classes == 20 and (np.bincount(a.train_labels) == 100).all()
    # Classes of one super-class look more alike than classes of different super-classes.
    means = np.stack([a.train_images[a.train_labels == k].astype(float).mean(0).ravel() for k in range(20)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = a.superclass_of[:, None] == a.superclass_of[None]
    off = ~np.eye(20, dtype=bool)
    assert dist[same & off].mean() < 0.8 * dist[~same].mean()


# ----------------------------------------------------------------------------- augmentation on the device

def _views(image, pad=4):
    """All 162 crop+flip views of one (3,H,W) float image, written plainly."""
    _, H, W = image.shape
    padded = torch.zeros(3, H + 2 * pad, W + 2 * pad)
    padded[:, pad:pad + H, pad:pad + W] = image
    views = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + H, dx:dx + W]
            views += [crop, crop.flip(2)]
    return views


def test_crop_and_flip_match_a_plain_reference():
    ds = data.synthetic(train_per_class=2, test_per_class=1)
    dd = DeviceData(ds, "cpu", rotation=0)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(16)
    out = dd.augment(idx, g) * dd.std + dd.mean  # undo normalisation
    assert out.shape == (16, 3, 16, 16)
    flips = 0
    for k in range(16):
        raw = dd.train_images[k].float() / 255
        matches = [i for i, v in enumerate(_views(raw)) if torch.allclose(out[k], v, atol=1e-5)]
        assert matches, "augmented image is not a padded crop (optionally flipped) of its source"
        flips += matches[0] % 2
    assert 0 < flips < 16


def test_augmentation_is_reproducible_and_normalised():
    ds = data.synthetic()
    dd = DeviceData(ds, "cpu", rotation=15)
    idx = torch.arange(256)
    x1 = dd.augment(idx, torch.Generator().manual_seed(5))
    x2 = dd.augment(idx, torch.Generator().manual_seed(5))
    x3 = dd.augment(idx, torch.Generator().manual_seed(6))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    # Normalisation uses the train set's own statistics.
    clean = dd.normalise(dd.train_images)
    assert torch.allclose(clean.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(clean.std((0, 2, 3)), torch.ones(3), atol=1e-3)
    # Rotation by up to 15 degrees pushes zeros (black, before normalisation) into some corners.
    raw = x1 * dd.std + dd.mean
    assert (raw[:, :, 0, 0].abs() < 1e-6).all(1).float().mean() > 0.3


def test_epoch_batches_cover_the_train_set_once():
    ds = data.synthetic()
    dd = DeviceData(ds, "cpu", rotation=0)
    batches = list(dd.train_batches(128, torch.Generator().manual_seed(0)))
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(dd.num_train))
    assert [len(b.labels) for b in batches][-1] == dd.num_train % 128  # last, smaller batch is kept
    assert all(torch.equal(b.labels, dd.train_labels[b.indices]) for b in batches)
