"""Datasets: MNIST and Fashion-MNIST from the standard IDX gz files, CIFAR-10 from its binary
version, and scikit-learn's digits.

IDX files are looked for in the folder given by ``data_dir`` (the ``--data-dir`` option) or the
``MEP_HW_DATA`` environment variable, either directly or in a sub-folder named after the dataset.
When neither is given, they are taken from the user cache (``MEP_HW_CACHE``, else
``$XDG_CACHE_HOME/mep_hw``, else ``~/.cache/mep_hw``) and downloaded there from the standard
mirrors if absent. Every ``.gz`` file is checked against its published MD5, so a truncated file
or the Fashion-MNIST file in place of the MNIST one is caught; a failing file raises
:class:`~mep_hw.errors.DataError` that names the file and the fix.

CIFAR-10 (Krizhevsky 2009) is read from the *binary version* only (``data_batch_1.bin`` …
``data_batch_5.bin``, ``test_batch.bin``: records of 1 label byte and 3072 pixel bytes, the
1024 red, then green, then blue values of a 32×32 image in row-major order), never from the
pickled Python version (unpickling a file runs code from it). They are looked for in the same
folders, also inside ``cifar-10-batches-bin/`` (the folder the official archive unpacks to);
absent from the cache, the archive is downloaded, checked against its published MD5, and only
the six ``.bin`` files are extracted. A file whose size is not a whole number of records, or a
label byte above 9, raises DataError.

Images are returned as float32 in [0, 1], flattened (CIFAR-10 in channel, row, column order);
labels as int64; ``Dataset.image_shape`` gives the (channels, height, width) of an image.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from mep_hw.errors import ConfigError, DataError

__all__ = ["DATASETS", "Dataset", "IdxSpec", "CIFAR10", "load_dataset", "read_idx", "read_cifar_bin", "download_idx",
           "download_cifar10", "cache_dir"]


class IdxSpec(NamedTuple):
    files: dict[str, tuple[str, str]]  # role -> (file name, md5 of the .gz file)
    mirrors: tuple[str, ...]


_IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

IDX_DATASETS: dict[str, IdxSpec] = {
    "mnist": IdxSpec(
        {
            "train_images": (_IDX_NAMES["train_images"], "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": (_IDX_NAMES["train_labels"], "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": (_IDX_NAMES["test_images"], "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": (_IDX_NAMES["test_labels"], "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": IdxSpec(
        {
            "train_images": (_IDX_NAMES["train_images"], "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train_labels": (_IDX_NAMES["train_labels"], "25c81989df183df01b3e8a0aad5dffbe"),
            "test_images": (_IDX_NAMES["test_images"], "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": (_IDX_NAMES["test_labels"], "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
    ),
}


class CifarSpec(NamedTuple):
    train_files: tuple[str, ...]
    test_file: str
    folder: str  # what the archive unpacks to
    archive: str
    md5: str  # of the archive, as published on the CIFAR page
    mirrors: tuple[str, ...]


CIFAR10 = CifarSpec(
    tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test_batch.bin",
    "cifar-10-batches-bin",
    "cifar-10-binary.tar.gz",
    "c32a1d4ab5d03f1284b67883e8d87530",
    ("https://www.cs.toronto.edu/~kriz/",),
)
CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then 1024 R, 1024 G, 1024 B
CIFAR_CLASSES = 10

DATASETS = ("digits", *IDX_DATASETS, "cifar10")


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # (n, d) float32 in [0, 1]
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    image_shape: tuple[int, ...] | None = None  # (channels, height, width); None: flat vectors

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images, else (input_dim,)."""
        return tuple(self.image_shape) if self.image_shape else (self.input_dim,)


# ----------------------------------------------------------------------------- IDX format
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed if its name ends in .gz) into a NumPy array.

    IDX (LeCun et al.): two zero bytes, a type code, the number of dimensions n, n big-endian
    uint32 sizes, then the data. A file that does not follow it raises DataError.
    """
    path = Path(path)
    fix = f"delete {path} and download it again (or point --data-dir at a folder with intact files)"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or not gzip at all
        raise DataError(f"{path} is not a readable gzip file ({e}); {fix}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path} has no IDX magic number (got {raw[:4].hex() or 'an empty file'}); {fix}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its IDX header; {fix}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its IDX header {dims} promises {expected}; "
            f"the file is truncated or corrupt; {fix}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_md5(path: Path, md5: str, dataset: str) -> None:
    got = _md5(path)
    if got != md5:
        raise DataError(
            f"{path} fails its checksum for {dataset} (md5 {got}, expected {md5}): the file is "
            f"corrupt, truncated, or belongs to another dataset (MNIST and Fashion-MNIST use the "
            f"same file names); delete it and download it again, or give --data-dir a folder with "
            f"the right files"
        )


def cache_dir() -> Path:
    """The user cache: MEP_HW_CACHE, else $XDG_CACHE_HOME/mep_hw, else ~/.cache/mep_hw."""
    if os.environ.get("MEP_HW_CACHE"):
        return Path(os.environ["MEP_HW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mep_hw"


def download_idx(name: str, dest: Path, mirrors: Sequence[str] | None = None, timeout: float = 60.0) -> Path:
    """Download the four IDX files of ``name`` into ``dest``, verifying each MD5.

    Mirrors are tried in turn; a file is written under a temporary name and renamed only once
    its checksum matches, so an interrupted download never leaves a bad file behind.
    """
    spec = _idx_spec(name)
    mirrors = tuple(mirrors or spec.mirrors)
    dest.mkdir(parents=True, exist_ok=True)
    for fname, md5 in spec.files.values():
        target = dest / fname
        if target.exists() and _md5(target) == md5:
            continue
        errors = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + fname
            part = target.with_name(target.name + ".part")
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, part.open("wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {e}")
                part.unlink(missing_ok=True)
                continue
            got = _md5(part)
            if got != md5:
                errors.append(f"{url}: md5 {got} ≠ {md5}")
                part.unlink(missing_ok=True)
                continue
            os.replace(part, target)
            break
        else:
            raise DataError(
                f"could not download {fname} of {name}: " + "; ".join(errors)
                + f". Download the four IDX files by hand into a folder and pass it with --data-dir "
                f"(or set MEP_HW_DATA)"
            )
    return dest


def _idx_spec(name: str) -> IdxSpec:
    try:
        return IDX_DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}") from None


def _locate(name: str, folder: Path) -> Path | None:
    """The folder holding the IDX files of ``name``: ``folder/name`` or ``folder`` itself."""
    for cand in (folder / name, folder):
        if any((cand / f).exists() or (cand / f[:-3]).exists() for f, _ in IDX_DATASETS[name].files.values()):
            return cand
    return None


def _read_split(name: str, folder: Path) -> Dataset:
    spec = IDX_DATASETS[name]
    arrays = {}
    for role, (fname, md5) in spec.files.items():
        path = folder / fname
        if path.exists():
            _check_md5(path, md5, name)
        elif (folder / fname[:-3]).exists():  # uncompressed copy: structure is checked
            path = folder / fname[:-3]
        else:
            raise DataError(
                f"{path} is missing: {folder} must hold the four IDX files of {name} "
                f"({', '.join(f for f, _ in spec.files.values())}); add it, or omit --data-dir "
                f"to download them into the cache"
            )
        arrays[role] = read_idx(path)
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or xi.shape[0] != yi.shape[0]:
            raise DataError(
                f"{name} {split} images {xi.shape} and labels {yi.shape} do not match in {folder}; "
                "replace the files"
            )
    to_x = lambda a: (a.reshape(a.shape[0], -1).astype(np.float32) / 255.0)  # noqa: E731
    return Dataset(
        name,
        to_x(arrays["train_images"]),
        arrays["train_labels"].astype(np.int64),
        to_x(arrays["test_images"]),
        arrays["test_labels"].astype(np.int64),
        10,
        (1, *arrays["train_images"].shape[1:]),
    )


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return Dataset("digits", xtr, ytr, xte, yte, 10, (1, 8, 8))


# ----------------------------------------------------------------------------- CIFAR-10 binary
def read_cifar_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3072) uint8 in channel, row, column order; labels (n,) uint8) of one CIFAR-10
    binary batch file. A size that is not a whole number of 3073-byte records (truncated), an
    empty file or a label byte above 9 (corrupt, or not a CIFAR-10 file) raises DataError."""
    path = Path(path)
    fix = f"delete {path} and download the binary version again (or point --data-dir at intact files)"
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); {fix}") from None
    if raw.size == 0:
        raise DataError(f"{path} is empty; {fix}")
    if raw.size % CIFAR_RECORD:
        raise DataError(
            f"{path} holds {raw.size} bytes, not a whole number of {CIFAR_RECORD}-byte records "
            f"(1 label + 3072 pixels): {raw.size // CIFAR_RECORD} records and {raw.size % CIFAR_RECORD} bytes "
            f"over; the file is truncated or not a CIFAR-10 binary batch; {fix}"
        )
    rec = raw.reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0]
    bad = np.flatnonzero(labels >= CIFAR_CLASSES)
    if bad.size:
        raise DataError(
            f"{path}: record {int(bad[0])} has label byte {int(labels[bad[0]])} (CIFAR-10 labels are 0–9; "
            f"{bad.size} such records): the file is corrupt, or CIFAR-100 or the pickled version; {fix}"
        )
    return rec[:, 1:], labels


def _cifar_folder(folder: Path) -> Path | None:
    """The folder holding the CIFAR-10 binary files under ``folder`` (itself, cifar10/,
    cifar-10-batches-bin/ or cifar10/cifar-10-batches-bin/), or None."""
    spec = CIFAR10
    for cand in (folder, folder / "cifar10", folder / spec.folder, folder / "cifar10" / spec.folder):
        if any((cand / f).exists() for f in (*spec.train_files, spec.test_file)):
            return cand
    return None


def _read_cifar(folder: Path) -> Dataset:
    spec = CIFAR10
    missing = [f for f in (*spec.train_files, spec.test_file) if not (folder / f).exists()]
    if missing:
        pickled = " (it holds the pickled version, which is never read: use the binary one)" if (folder / "data_batch_1").exists() else ""
        raise DataError(
            f"{folder} lacks {', '.join(missing)}{pickled}: a CIFAR-10 folder holds the binary version's "
            f"{', '.join(spec.train_files)} and {spec.test_file}; add them, or omit --data-dir to download"
        )
    parts = [read_cifar_bin(folder / f) for f in spec.train_files]
    xte, yte = read_cifar_bin(folder / spec.test_file)
    to_x = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
    return Dataset(
        "cifar10",
        to_x(np.concatenate([p[0] for p in parts])), np.concatenate([p[1] for p in parts]).astype(np.int64),
        to_x(xte), yte.astype(np.int64), CIFAR_CLASSES, (3, 32, 32),
    )


def download_cifar10(dest: Path, mirrors: Sequence[str] | None = None, timeout: float = 60.0) -> Path:
    """Download the CIFAR-10 binary archive into ``dest``, verify its MD5 and extract the six
    ``.bin`` files (nothing else) into ``dest``; returns ``dest``."""
    spec = CIFAR10
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / spec.archive
    if not (archive.exists() and _md5(archive) == spec.md5):
        errors = []
        for base in tuple(mirrors or spec.mirrors):
            url = base.rstrip("/") + "/" + spec.archive
            part = archive.with_name(archive.name + ".part")
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, part.open("wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{url}: {e}")
                part.unlink(missing_ok=True)
                continue
            got = _md5(part)
            if got != spec.md5:
                errors.append(f"{url}: md5 {got} ≠ {spec.md5}")
                part.unlink(missing_ok=True)
                continue
            os.replace(part, archive)
            break
        else:
            raise DataError(
                f"could not download {spec.archive} of cifar10: " + "; ".join(errors)
                + ". Download the binary version by hand, unpack it and pass its folder with --data-dir (or set MEP_HW_DATA)"
            )
    wanted = {f"{spec.folder}/{f}": f for f in (*spec.train_files, spec.test_file)}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = wanted.get(member.name)
                if name is None or not member.isfile():
                    continue
                src = tar.extractfile(member)
                tmp = dest / (name + ".part")
                with tmp.open("wb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                os.replace(tmp, dest / name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive} cannot be unpacked ({e}); delete it and download it again") from None
    missing = [f for f in wanted.values() if not (dest / f).exists()]
    if missing:
        raise DataError(f"{archive} passed its checksum but lacks {', '.join(missing)}; report this (the mirror changed?)")
    archive.unlink()  # the six .bin files are what is read; the archive (≈ 170 MB) is not kept
    return dest


def _load_cifar(data_dir, download: bool, mirrors) -> Dataset:
    given = data_dir if data_dir is not None else os.environ.get("MEP_HW_DATA") or None
    if given is not None:
        folder = Path(given).expanduser()
        if not folder.is_dir():
            src = "--data-dir" if data_dir is not None else "MEP_HW_DATA"
            raise DataError(f"{src}={folder} is not a folder; give the folder holding the CIFAR-10 binary files")
        found = _cifar_folder(folder)
        if found is None:
            pickled = any((c / "data_batch_1").exists() for c in (folder, folder / "cifar-10-batches-py"))
            raise DataError(
                f"no CIFAR-10 binary files in {folder} (looked in it, cifar10/ and {CIFAR10.folder}/ for "
                f"data_batch_1.bin …)"
                + ("; it holds the pickled Python version, which is never read (unpickling runs code from the "
                   "file): get the binary version" if pickled else "")
                + "; put them there, or omit --data-dir to download them into the cache"
            )
        return _read_cifar(found)
    folder = cache_dir() / "datasets" / "cifar10"
    if not all((folder / f).exists() for f in (*CIFAR10.train_files, CIFAR10.test_file)):
        if not download:
            raise DataError(f"cifar10 is not in the cache {folder} and downloading is off; pass --data-dir")
        download_cifar10(folder, mirrors)
    return _read_cifar(folder)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Dataset:
    """Load ``name`` (digits, mnist, fashion-mnist or cifar10); see the module docstring for where from.

    ``limit_train``/``limit_test`` keep the first N samples of each split.
    """
    if name == "digits":
        ds = _load_digits()
    elif name == "cifar10":
        ds = _load_cifar(data_dir, download, mirrors)
    else:
        _idx_spec(name)
        given = data_dir if data_dir is not None else os.environ.get("MEP_HW_DATA") or None
        if given is not None:
            folder = Path(given).expanduser()
            if not folder.is_dir():
                src = "--data-dir" if data_dir is not None else "MEP_HW_DATA"
                raise DataError(f"{src}={folder} is not a folder; give the folder holding the {name} IDX files")
            found = _locate(name, folder)
            if found is None:
                files = ", ".join(f for f, _ in IDX_DATASETS[name].files.values())
                raise DataError(
                    f"no {name} IDX files in {folder} or {folder / name} (expected {files}); "
                    f"put them there, or omit --data-dir to download them into the cache"
                )
            ds = _read_split(name, found)
        else:
            folder = cache_dir() / "datasets" / name
            if _locate(name, folder) is None or not all((folder / f).exists() for f, _ in IDX_DATASETS[name].files.values()):
                if not download:
                    raise DataError(f"{name} is not in the cache {folder} and downloading is off; pass --data-dir")
                download_idx(name, folder, mirrors)
            ds = _read_split(name, folder)
    for lim, label in ((limit_train, "limit_train"), (limit_test, "limit_test")):
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
            raise ConfigError(f"{label}={lim!r} must be a positive integer")
    return ds._replace(
        x_train=ds.x_train[:limit_train], y_train=ds.y_train[:limit_train],
        x_test=ds.x_test[:limit_test], y_test=ds.y_test[:limit_test],
    )
