import gzip
import struct

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path, monkeypatch):
    torch.manual_seed(0)
    # never touch the user's cache or data folder from a test
    monkeypatch.setenv("MEP_HW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEP_HW_DATA", raising=False)


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """Write ``array`` (uint8) as an IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_folder(folder, n_train=60, n_test=20, seed=0, gz=True):
    """A tiny MNIST-shaped dataset: 28x28 images whose brightest quadrant encodes the label.
    ``gz=False`` writes uncompressed files, which load without the MNIST checksums."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 4)
            images[i, r * 7 : r * 7 + 7, c * 7 : c * 7 + 7] = 255
        ext = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)
    return folder


@pytest.fixture
def lock_folder():
    """``lock_folder(path)`` makes the folder ``path`` read-only — nothing can be created, renamed or
    removed in it: mode 0555, or for root (whom modes do not stop) the immutable attribute; the
    test is skipped where neither works. Undone after the test."""
    import os
    import shutil
    import subprocess

    locked = []

    def writable(d) -> bool:
        probe = d / ".probe"
        try:
            probe.write_text("x")
        except OSError:
            return False
        probe.unlink()
        return True

    def lock(d):
        d.chmod(0o555)
        locked.append((d, False))
        if writable(d) and os.geteuid() == 0 and shutil.which("chattr"):
            if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
                locked[-1] = (d, True)
        if writable(d):
            pytest.skip("cannot make a read-only folder here")
        return d

    yield lock
    for d, immutable in locked:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], capture_output=True)
        d.chmod(0o755)
