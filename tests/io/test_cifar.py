"""The CIFAR-10 binary reader on tiny files written here: layout, folders, errors, download."""

import hashlib
import http.server
import io
import tarfile
import threading
from functools import partial

import numpy as np
import pytest

from mep_hw.errors import DataError
from mep_hw.io import datasets as D
from mep_hw.io import load_dataset, read_cifar_bin

NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def records(n, seed):
    """n CIFAR-10 records: a label byte, then the R, G, B planes (32×32 each, row-major)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    img = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    return labels, img, np.concatenate([labels[:, None], img.reshape(n, -1)], axis=1).tobytes()


def write_cifar(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, name in enumerate(NAMES):
        labels, img, raw = records(n, i)
        (folder / name).write_bytes(raw)
        truth[name] = (labels, img)
    return truth


def test_records_are_read_in_channel_row_column_order(tmp_path):
    truth = write_cifar(tmp_path / "c")
    x, y = read_cifar_bin(tmp_path / "c" / "data_batch_2.bin")
    labels, img = truth["data_batch_2.bin"]
    assert np.array_equal(y, labels) and np.array_equal(x.reshape(-1, 3, 32, 32), img)
    # a hand-made record: red plane all 7, pixel (row 1, col 2) of the blue plane 200
    rec = np.zeros(3073, np.uint8)
    rec[0] = 3
    rec[1:1025] = 7
    rec[1 + 2048 + 32 + 2] = 200
    (tmp_path / "one.bin").write_bytes(rec.tobytes())
    x, y = read_cifar_bin(tmp_path / "one.bin")
    im = x.reshape(3, 32, 32)
    assert y.tolist() == [3] and (im[0] == 7).all() and im[2, 1, 2] == 200 and im[2].sum() == 200 and (im[1] == 0).all()


@pytest.mark.parametrize("where", ["", "cifar10", "cifar-10-batches-bin", "cifar10/cifar-10-batches-bin"])
def test_load_from_the_folder_or_the_archive_folder(tmp_path, where):
    truth = write_cifar(tmp_path / "data" / where if where else tmp_path / "data")
    ds = load_dataset("cifar10", tmp_path / "data", limit_test=3)
    assert ds.x_train.shape == (20, 3072) and ds.x_train.dtype == np.float32 and ds.image_shape == (3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.n_classes == 10
    assert ds.x_test.shape == (3, 3072) and ds.y_test.dtype == np.int64
    assert np.array_equal(ds.y_train[4:8], truth["data_batch_2.bin"][0])
    np.testing.assert_allclose(ds.x_test[0], truth["test_batch.bin"][1][0].reshape(-1) / 255.0, rtol=1e-6)


def test_truncated_corrupt_missing_and_pickled_files_are_data_errors(tmp_path):
    c = tmp_path / "c"
    write_cifar(c)
    f = c / "data_batch_3.bin"
    raw = f.read_bytes()
    f.write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"data_batch_3.bin holds 12192 bytes, not a whole number of 3073-byte records.*3 records and 2973 bytes over.*truncated"):
        load_dataset("cifar10", c)
    bad = bytearray(raw)
    bad[3073 * 2] = 42  # the third record's label byte
    f.write_bytes(bytes(bad))
    with pytest.raises(DataError, match="data_batch_3.bin: record 2 has label byte 42 .*labels are 0–9"):
        load_dataset("cifar10", c)
    f.write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_3.bin is empty"):
        read_cifar_bin(f)
    f.unlink()
    with pytest.raises(DataError, match="lacks data_batch_3.bin"):
        load_dataset("cifar10", c)
    py = tmp_path / "p" / "cifar-10-batches-py"
    py.mkdir(parents=True)
    (py / "data_batch_1").write_bytes(b"\x80\x04")  # a pickle: never opened
    with pytest.raises(DataError, match="pickled Python version, which is never read"):
        load_dataset("cifar10", tmp_path / "p")
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("cifar10", tmp_path / "nowhere")


@pytest.fixture
def cifar_mirror(tmp_path, monkeypatch):
    """A tiny archive laid out like the official one, served over HTTP and registered by its MD5."""
    src = tmp_path / "src"
    truth = write_cifar(src)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in NAMES + ["readme.html"]:
            data = (src / name).read_bytes() if name != "readme.html" else b"<html/>"
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    monkeypatch.setattr(D, "CIFAR10", D.CIFAR10._replace(md5=hashlib.md5(buf.getvalue()).hexdigest()))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", truth
    server.shutdown()


def test_download_checks_the_archive_and_extracts_only_the_batches(cifar_mirror, tmp_path, monkeypatch):
    url, truth = cifar_mirror
    ds = load_dataset("cifar10", mirrors=["http://127.0.0.1:9/", url])
    cached = tmp_path / "cache" / "datasets" / "cifar10"
    assert sorted(p.name for p in cached.iterdir()) == sorted(NAMES)  # no readme, no archive kept
    assert np.array_equal(ds.y_test, truth["test_batch.bin"][0])
    assert load_dataset("cifar10", mirrors=["http://127.0.0.1:9/"]).x_train.shape == (20, 3072)  # no network needed
    monkeypatch.setattr(D, "CIFAR10", D.CIFAR10._replace(md5="0" * 32))
    with pytest.raises(DataError, match="could not download cifar-10-binary.tar.gz of cifar10: .*md5.*--data-dir"):
        D.download_cifar10(tmp_path / "other", [url])
    assert not any((tmp_path / "other").iterdir())
