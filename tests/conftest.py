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


def make_idx_folder(folder, n_train=60, n_test=20, seed=0):
    """A tiny MNIST-shaped dataset: 28x28 images whose brightest quadrant encodes the label."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            r, c = divmod(int(y), 4)
            images[i, r * 7 : r * 7 + 7, c * 7 : c * 7 + 7] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
