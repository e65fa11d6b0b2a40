"""IDX reading, checksums, the download path (local HTTP server), and the digits default."""

import gzip
import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest

from mep_hw.errors import ConfigError, DataError
from mep_hw.io import datasets as D
from mep_hw.io import load_dataset, read_idx
from tests.conftest import make_idx_folder, write_idx


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A tiny MNIST-shaped IDX folder, registered with its own checksums."""
    folder = make_idx_folder(tmp_path / "data" / "mnist")
    spec = D.IDX_DATASETS["mnist"]
    files = {role: (name, md5(folder / name)) for role, (name, _) in spec.files.items()}
    monkeypatch.setitem(D.IDX_DATASETS, "mnist", D.IdxSpec(files, spec.mirrors))
    return folder


def test_read_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "a"), a)


def test_load_from_data_dir_parent_or_folder(tiny_mnist):
    for where in (tiny_mnist, tiny_mnist.parent):
        ds = load_dataset("mnist", where)
        assert ds.x_train.shape == (60, 784) and ds.x_train.dtype == np.float32
        assert ds.x_train.max() == 1.0 and ds.x_train.min() >= 0.0
        assert ds.y_test.shape == (20,) and ds.y_test.dtype == np.int64


def test_data_dir_from_the_environment(tiny_mnist, monkeypatch):
    monkeypatch.setenv("MEP_HW_DATA", str(tiny_mnist.parent))
    assert load_dataset("mnist").x_train.shape == (60, 784)


def test_limits_keep_the_first_samples(tiny_mnist):
    full = load_dataset("mnist", tiny_mnist)
    part = load_dataset("mnist", tiny_mnist, limit_train=7, limit_test=3)
    assert np.array_equal(part.x_train, full.x_train[:7]) and part.y_test.shape == (3,)
    with pytest.raises(ConfigError, match="limit_train=0 must be a positive integer"):
        load_dataset("mnist", tiny_mnist, limit_train=0)


def test_truncated_file_names_the_file_and_the_fix(tiny_mnist, monkeypatch):
    f = tiny_mnist / "train-images-idx3-ubyte.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz fails its checksum.*download it again"):
        load_dataset("mnist", tiny_mnist)
    # the reader itself also catches it, checksum or not
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is not a readable gzip file"):
        read_idx(f)


def test_truncated_payload_and_wrong_magic(tmp_path):
    a = np.zeros((5, 4), dtype=np.uint8)
    write_idx(tmp_path / "t", a, gz=False)
    raw = (tmp_path / "t").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(DataError, match=r"short holds 29 bytes but its IDX header \[5, 4\] promises 32"):
        read_idx(tmp_path / "short")
    with gzip.open(tmp_path / "magic.gz", "wb") as f:
        f.write(b"\x1f\x8b\x08\x00" + raw[4:])
    with pytest.raises(DataError, match="magic.gz has no IDX magic number"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="an empty file"):
        read_idx(tmp_path / "empty")


def test_checksum_mismatch_is_caught(tiny_mnist):
    # a valid IDX file with other contents: only the checksum can tell
    write_idx(tiny_mnist / "t10k-labels-idx1-ubyte.gz", np.zeros(20, dtype=np.uint8))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz fails its checksum for mnist"):
        load_dataset("mnist", tiny_mnist)


def test_missing_file_and_missing_folder(tiny_mnist, tmp_path):
    (tiny_mnist / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is missing.*omit --data-dir"):
        load_dataset("mnist", tiny_mnist)
    with pytest.raises(DataError, match="no fashion-mnist IDX files"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("mnist", tmp_path / "nowhere")


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar'; valid datasets: digits, mnist, fashion-mnist"):
        load_dataset("cifar")


@pytest.fixture
def http_mirror(tiny_mnist, tmp_path):
    """Serve the tiny files over HTTP on localhost, like a dataset mirror."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_mnist))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_download_into_the_cache_verifies_and_reuses(http_mirror, tmp_path, monkeypatch):
    dead = "http://127.0.0.1:9/"  # nothing listens on the discard port: the next mirror is tried
    ds = load_dataset("mnist", mirrors=[dead, http_mirror])
    cached = tmp_path / "cache" / "datasets" / "mnist"
    assert ds.x_train.shape == (60, 784)
    assert sorted(p.name for p in cached.iterdir()) == sorted(n for n, _ in D.IDX_DATASETS["mnist"].files.values())
    # second load: no network needed
    assert load_dataset("mnist", mirrors=["http://127.0.0.1:9/"]).x_train.shape == (60, 784)


def test_download_with_a_bad_checksum_leaves_nothing_behind(http_mirror, tmp_path, monkeypatch):
    spec = D.IDX_DATASETS["mnist"]
    files = dict(spec.files)
    files["train_labels"] = (files["train_labels"][0], "0" * 32)
    monkeypatch.setitem(D.IDX_DATASETS, "mnist", D.IdxSpec(files, spec.mirrors))
    with pytest.raises(DataError, match="could not download train-labels-idx1-ubyte.gz.*md5.*--data-dir"):
        load_dataset("mnist", mirrors=[http_mirror])
    cached = tmp_path / "cache" / "datasets" / "mnist"
    assert not (cached / "train-labels-idx1-ubyte.gz").exists()
    assert not list(cached.glob("*.part"))


def test_file_url_mirror(tiny_mnist, tmp_path):
    ds = load_dataset("mnist", mirrors=[tiny_mnist.as_uri() + "/"])
    assert ds.x_test.shape == (20, 784)


def test_digits_is_offline_and_split_deterministically():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.x_train.shape == (1437, 64) and a.x_test.shape == (360, 64)
    assert np.array_equal(a.y_test, b.y_test) and a.x_train.max() == 1.0
    assert sorted(np.bincount(a.y_test)) [0] >= 35  # stratified
