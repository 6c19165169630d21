"""Reading data sets from disk into a ``Dataset``.

- ``cifar100`` / ``cifar10``: the original python-pickle layout (``cifar-100-python/``,
  ``cifar-10-batches-py/``), read without torchvision's md5 check (re-packed copies never match
  it) but with checks of shapes, dtypes, label ranges and counts, through an unpickler that
  builds only dicts, lists, strings, numbers and numpy arrays; downloaded on request;
- image folders: ``train/<class>/*`` and ``test/<class>/*`` images of any size (resized to
  32x32), by torchvision's ImageFolder conventions (image files by extension; other files,
  subfolders of a class folder and hidden entries are skipped with a warning). The decoded arrays
  are cached under outputs/cache, keyed by the names, sizes and mtimes of the images.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdlib import paths
from cdlib.errors import DataError


@dataclass
class Dataset:
    name: str
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    superclass_of: np.ndarray | None = None  # (C,) super-class index of each class
    superclasses: list[str] | None = None
    validation_images: np.ndarray | None = None  # held out of the training set by ``hold_out``
    validation_labels: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# --------------------------------------------------------------------------- CIFAR pickles

CIFAR = {
    "cifar100": dict(folder="cifar-100-python", classes=100, train=["train"], test="test",
                     label="fine_labels", meta="meta", names="fine_label_names"),
    "cifar10": dict(folder="cifar-10-batches-py", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test="test_batch",
                    label="labels", meta="batches.meta", names="label_names"),
}
CIFAR_COUNTS = {"train": 50000, "test": 10000}  # images in a complete copy


# The globals a CIFAR python pickle names: numpy's array, dtype and scalar reconstruction, under
# numpy 1.x's (numpy.core) and 2.x's (numpy._core) module paths; _frombuffer is how protocol 5
# stores arrays, _codecs.encode how Python 3 stores bytes at protocol 2. Dicts, lists, strings and
# numbers need no globals.
_CIFAR_PICKLE_GLOBALS = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
    + [(f"{core}.multiarray", name) for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")]
    + [(f"{core}.numeric", "_frombuffer") for core in ("numpy.core", "numpy._core")])


def _is_plain_dtype_state(state) -> bool:
    """Whether ``state`` is what numpy pickles for a dtype of plain numbers: version 3, a byte order,
    no sub-array, fields or metadata, and no flags (object dtypes have some)."""
    return (type(state) is tuple and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
            and state[2:] == (None, None, None, -1, -1, 0))


class _CifarUnpickler(pickle._Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays of plain numbers, nothing else.

    A pickle may name any importable function to call while loading, so a crafted file could run
    arbitrary code: every global outside ``_CIFAR_PICKLE_GLOBALS`` is refused. This is Python's own
    (pure-Python) unpickler because it lets ``_checked_build`` see a dtype's state before numpy does:
    numpy's ``dtype.__setstate__`` crashes the interpreter on some malformed states (one damaged byte
    of a real CIFAR file can make one), which would hide which file was bad.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the original files are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_PICKLE_GLOBALS:
            raise DataError(f"{self.path} asks to load {module}.{name}, which no CIFAR pickle holds; loading it "
                            f"could run arbitrary code, so it was refused. Replace the file with a fresh copy "
                            f"of the original archive.")
        return super().find_class(module, name)

    def _checked_build(self):
        obj, state = self.stack[-2], self.stack[-1]
        if isinstance(obj, np.dtype) and not _is_plain_dtype_state(state):
            raise DataError(f"{self.path} holds a numpy dtype state {repr(state)[:100]} that no CIFAR pickle "
                            f"holds; the file is damaged or crafted. Replace it with a fresh copy of the "
                            f"original archive.")
        self.load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _checked_build}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as err:  # a damaged pickle fails in many ways (EOFError, KeyError, TypeError, ...)
        raise DataError(f"cannot read {path} ({type(err).__name__}: {err}). The file is truncated or not a "
                        f"CIFAR pickle; replace it with a fresh copy of the original archive.") from err
    if not isinstance(d, dict):
        raise DataError(f"{path} holds a {type(d).__name__}, not the dict of a CIFAR pickle; replace it with "
                        f"a fresh copy of the original archive.")
    return d


def read_cifar_split(path: Path, label_key: str, num_classes: int, expected: int | None = None):
    """Read one CIFAR pickle file; return (images (N,32,32,3) uint8, labels, coarse labels or None)."""
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the keys 'data'/'{label_key}'; it is not a CIFAR file of this data set.")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected uint8 images of shape (N, 3072), got {data.dtype} {data.shape}.")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1} (min {labels.min()}, max {labels.max()}).")
    if expected is not None and len(data) != expected:
        raise DataError(f"{path}: expected {expected} images, found {len(data)}; the copy is incomplete.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    coarse = np.asarray(d["coarse_labels"], dtype=np.int64) if "coarse_labels" in d else None
    return images, labels, coarse


def _find_folder(name: str, root: Path | None) -> tuple[Path | None, list[Path]]:
    sub = CIFAR[name]["folder"]
    base = Path(root) if root is not None else paths.data_root()
    candidates = [base / sub, base]
    for c in candidates:
        if (c / CIFAR[name]["test"]).is_file():
            return c, candidates
    return None, candidates


def download_cifar(name: str, base: Path) -> None:
    """Fetch ``name`` into ``base`` with torchvision (its progress bar; it checks the archive's md5)."""
    import torchvision  # only when a download is asked for
    cls = torchvision.datasets.CIFAR100 if name == "cifar100" else torchvision.datasets.CIFAR10
    cls(str(base), train=True, download=True)
    cls(str(base), train=False, download=True)


def _not_found(name: str, looked: list[Path], why: str = "") -> DataError:
    spec = CIFAR[name]
    return DataError(
        f"{name} not found{why}. Looked for '{spec['test']}' in: {', '.join(map(str, looked))}. "
        f"Put the original '{spec['folder']}' folder (python pickle version) there, set "
        f"CDLIB_DATA=/folder/holding/it, or on a machine with internet access pass --download to the pipeline "
        f"(make reproduce does) or call load_dataset('{name}', download=True).")


def ensure_downloaded(name: str, root: Path | None = None) -> bool:
    """Download the CIFAR data set ``name`` into the data root unless it is there already; True if it
    downloaded. Other data sets (image folders, synthetic) are left alone. A failed download (offline,
    a full disk) raises the "not found" ``DataError`` with the reason."""
    if name not in CIFAR or _find_folder(name, root)[0] is not None:
        return False
    base = Path(root) if root is not None else paths.data_root()
    print(f"{name} not found under {base}: downloading it there (once) with torchvision", flush=True)
    try:
        base.mkdir(parents=True, exist_ok=True)
        download_cifar(name, base)
    except Exception as err:  # URLError offline, OSError on a full disk, RuntimeError on a bad archive
        raise _not_found(name, _find_folder(name, root)[1],
                         f", and downloading it failed ({type(err).__name__}: {str(err)[:200]})") from err
    if _find_folder(name, root)[0] is None:
        raise _not_found(name, _find_folder(name, root)[1], ", and the download did not produce it")
    return True


def load_cifar(name: str, root: Path | None = None, download: bool = False) -> Dataset:
    spec = CIFAR[name]
    if download:
        ensure_downloaded(name, root)
    folder, looked = _find_folder(name, root)
    if folder is None:
        raise _not_found(name, looked)
    missing = [f for f in spec["train"] + [spec["meta"]] if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {missing}. Restore the full '{spec['folder']}' folder.")
    C = spec["classes"]
    parts = [read_cifar_split(folder / f, spec["label"], C, expected=CIFAR_COUNTS["train"] // len(spec["train"]))
             for f in spec["train"]]
    test_images, test_labels, test_coarse = read_cifar_split(folder / spec["test"], spec["label"], C,
                                                             expected=CIFAR_COUNTS["test"])
    train_images = np.concatenate([p[0] for p in parts])
    train_labels = np.concatenate([p[1] for p in parts])
    meta = _unpickle(folder / spec["meta"])
    classes = list(meta[spec["names"]])
    superclass_of, superclasses = None, None
    if name == "cifar100":
        superclasses = list(meta["coarse_label_names"])
        superclass_of = np.zeros(C, dtype=np.int64)
        superclass_of[test_labels] = test_coarse
        superclass_of[train_labels] = parts[0][2]
    return Dataset(name, train_images, train_labels, test_images, test_labels, classes,
                   superclass_of, superclasses)


def load_cifar_test(name: str, root: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The test split of ``name`` alone, (N, 32, 32, 3) uint8 images and labels, checked as ``load_cifar``
    checks it: for evaluating released checkpoints, which need no training images."""
    spec = CIFAR[name]
    folder, looked = _find_folder(name, Path(root) if root else None)
    if folder is None:
        raise _not_found(name, looked)
    images, labels, _ = read_cifar_split(folder / spec["test"], spec["label"], spec["classes"],
                                         expected=CIFAR_COUNTS["test"])
    return images, labels


# --------------------------------------------------------------------------- image folders

# The extensions torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS),
# written out so that importing this module does not import torchvision.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGEFOLDER_CACHE_VERSION = 2  # part of the cache key: bump it when decoding or the cached layout changes


@dataclass
class _SplitListing:
    """What one split folder holds: its class folders and, in each, the image files to read."""
    folder: Path
    classes: list[str]
    images: list[list[tuple[str, int, int]]]  # per class, sorted: (file name, size in bytes, mtime_ns)


def _is_image_file(entry: os.DirEntry) -> bool:
    return (not entry.name.startswith(".") and entry.name.lower().endswith(IMG_EXTENSIONS)
            and entry.is_file())


def _list_class_folder(folder: Path) -> tuple[list[tuple[str, int, int]], int]:
    """The image files in ``folder`` as sorted (name, size, mtime_ns), and how many other entries it holds."""
    images, skipped = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if _is_image_file(entry):
                stat = entry.stat()
                images.append((entry.name, stat.st_size, stat.st_mtime_ns))
            else:
                skipped += 1
    return sorted(images), skipped


def _list_split(split: Path) -> _SplitListing:
    """List ``split/<class>/<image>``, skipping (and warning about) whatever is not read.

    Hidden entries (.DS_Store, .ipynb_checkpoints, macOS's ._* copies), files that are not images
    by extension (Thumbs.db, notes.txt) and subfolders of a class folder are left by tools and
    copies, not meant as data: they are skipped, with one warning per split that counts them.
    """
    if not split.is_dir():
        raise DataError(f"image folder split {split} does not exist; expected <root>/train/<class>/* "
                        f"and <root>/test/<class>/*.")
    with os.scandir(split) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    listing, skipped = _SplitListing(split, [], []), 0
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            skipped += 1
            continue
        images, skipped_inside = _list_class_folder(split / entry.name)
        listing.classes.append(entry.name)
        listing.images.append(images)
        skipped += skipped_inside
    if not listing.classes:
        raise DataError(f"{split} holds no class folders; expected {split}/<class>/<image>.")
    if skipped:
        noun = "entry" if skipped == 1 else "entries"
        warnings.warn(f"skipped {skipped} {noun} in {split} that are hidden, subfolders of a class folder "
                      f"or not images by extension ({', '.join(IMG_EXTENSIONS)}).")
    return listing


def _cache_key(folder: Path, size: int, splits: list[_SplitListing]) -> str:
    """A hash of everything the decoded arrays depend on, so a changed image gives a new cache file."""
    h = hashlib.sha256(repr((IMAGEFOLDER_CACHE_VERSION, str(folder.resolve()), size)).encode())
    for split in splits:
        for cls, files in zip(split.classes, split.images):
            h.update(repr(f"{split.folder.name}/{cls}/").encode())  # a class folder counts even when empty
            for name, nbytes, mtime_ns in files:
                h.update(repr((f"{split.folder.name}/{cls}/{name}", nbytes, mtime_ns)).encode())
    return h.hexdigest()[:16]


def _read_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL's decoders fail in many ways (OSError, ValueError, SyntaxError, ...)
        raise DataError(f"cannot decode image {path} ({type(err).__name__}: {err}); it is truncated or not "
                        f"an image. Delete it or replace it with an intact copy.") from err


def _labels(split: _SplitListing) -> np.ndarray:
    """The label of each listed image, in listing order."""
    return np.repeat(np.arange(len(split.classes), dtype=np.int64), [len(files) for files in split.images])


def _read_folder_split(split: _SplitListing, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a listed split into (images (N, size, size, 3) uint8, labels (N,) int64)."""
    images = []
    for cls, files in zip(split.classes, split.images):
        if not files:
            raise DataError(f"class folder {split.folder / cls} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"add its images or remove the folder.")
        images += [_read_image(split.folder / cls / name, size) for name, _, _ in files]
    return np.stack(images), _labels(split)


def _read_cache(cache: Path, train: _SplitListing, test: _SplitListing, size: int) -> tuple[np.ndarray, ...]:
    """(xtr, ytr, xte, yte) from the cache file; ValueError unless they are what the listings describe."""
    with np.load(cache) as z:
        xtr, ytr, xte, yte, classes = (z[k] for k in ("xtr", "ytr", "xte", "yte", "classes"))
    if classes.tolist() != train.classes:
        raise ValueError(f"classes {classes.tolist()} instead of {train.classes}")
    for images, labels, split in ((xtr, ytr, train), (xte, yte, test)):
        expected = _labels(split)
        if (images.dtype != np.uint8 or images.shape != (len(expected), size, size, 3)
                or labels.dtype != np.int64 or not np.array_equal(labels, expected)):
            raise ValueError(f"{split.folder.name} arrays {images.dtype} {images.shape} and labels {labels.dtype} "
                             f"{labels.shape} do not match the {len(expected)} listed images")
    return xtr, ytr, xte, yte


def _write_cache(cache: Path, **arrays: np.ndarray) -> None:
    """Write an npz under a unique temporary name, then rename it: readers, and runs started at the
    same time, see the old file or the complete new one, never a partial one."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f"{cache.stem}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cache)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_imagefolder(folder: Path, size: int = 32) -> Dataset:
    """Read ``train/<class>/*`` and ``test/<class>/*``; cache the decoded arrays under outputs/cache."""
    folder = Path(folder)
    if not folder.is_absolute():
        folder = paths.data_root() / folder
    if not folder.is_dir():
        raise DataError(f"image folder {folder} not found. Give an absolute path or one relative to the "
                        f"data root {paths.data_root()} (set CDLIB_DATA to change it).")
    train, test = _list_split(folder / "train"), _list_split(folder / "test")
    if test.classes != train.classes:
        raise DataError(f"{test.folder}: class folders {test.classes} differ from the train split's "
                        f"{train.classes}; make both splits hold the same class folders.")
    cache = paths.outputs() / "cache" / f"imagefolder-{_cache_key(folder, size, [train, test])}.npz"
    if cache.is_file():
        try:
            return Dataset(folder.name, *_read_cache(cache, train, test, size), train.classes)
        except Exception as err:  # the cache is derived data: whatever is wrong with it, rebuild it
            warnings.warn(f"image-folder cache {cache} is damaged ({type(err).__name__}: {err}); "
                          f"rebuilding it from {folder}.")
    xtr, ytr = _read_folder_split(train, size)
    xte, yte = _read_folder_split(test, size)
    try:
        _write_cache(cache, xtr=xtr, ytr=ytr, xte=xte, yte=yte, classes=np.array(train.classes))
    except OSError as err:  # the cache only saves time: a full disk must not stop the run
        warnings.warn(f"could not write the image-folder cache {cache} ({err.strerror or err}); {folder} will "
                      f"be decoded again next time.")
    return Dataset(folder.name, xtr, ytr, xte, yte, train.classes)
