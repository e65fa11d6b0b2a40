"""HDF5 traces: round trip, commit marker, trimming on resume, corrupt and foreign files."""

import h5py
import numpy as np
import pytest

from mep_hw.errors import TraceError
from mep_hw.io.trace import TraceWriter, describe_trace, read_trace

ATTRS = {"config_toml": 'dataset = "digits"\nlayers = [4, 3, 2]\nepochs = 2\nseed = 0\n', "device_json": "null", "trace_every": "1"}


def _values(rng, k):
    return {"layers/W0/weight": (rng.standard_normal((3, 4)).astype(np.float32), "1"),
            "layers/W0/g_plus": (rng.uniform(0, 25, (3, 4)), "uS"),
            "layers/W0/pulses_up": (np.int64(10 * k), "pulses"),
            "metrics/train_loss": (1.0 / (k + 1), "1")}


def _write(path, n, seed=0):
    rng = np.random.default_rng(seed)
    written = []
    with TraceWriter.open(path, ATTRS) as w:
        for k in range(n):
            v = _values(rng, k)
            w.interval(step=5 * k, epoch=k // 2, values=v)
            written.append(v)
        w.epoch(1, {"test_accuracy": (0.5, "1")})
    return written


def test_round_trip_with_units_and_plain_h5py(tmp_path):
    p = tmp_path / "trace.h5"
    written = _write(p, 4)
    t = read_trace(p)
    assert list(t.intervals["step"]) == [0, 5, 10, 15]
    for k, v in enumerate(written):
        np.testing.assert_array_equal(t.intervals["layers/W0/weight"][k], v["layers/W0/weight"][0])
        np.testing.assert_array_equal(t.intervals["layers/W0/g_plus"][k], v["layers/W0/g_plus"][0])
    assert t.units["intervals/layers/W0/g_plus"] == "uS" and t.units["intervals/step"] == "steps"
    assert t.config["layers"] == [4, 3, 2] and t.epochs["test_accuracy"].tolist() == [0.5]
    with h5py.File(p, "r") as f:  # plain h5py, no mep_hw
        ds = f["intervals/layers/W0/weight"]
        # float arrays are stored raw (gzip: ~17 % smaller, ~25x slower to write; docs/traces.md)
        assert ds.shape == (4, 3, 4) and ds.maxshape[0] is None and ds.compression is None and ds.chunks == (1, 3, 4)
        assert ds.attrs["units"] == "1"
        every = []
        f.visititems(lambda name, obj: every.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
        assert len(every) == 8  # 4 interval records + step and epoch, epoch and test_accuracy
        for name, obj in every:  # as docs/traces.md says: integer arrays compressed, float arrays raw,
            # one record per chunk; scalar series uncompressed, written in place
            assert obj.maxshape[0] is None and obj.chunks is not None and "units" in obj.attrs, name
            if obj.ndim > 1:
                assert obj.chunks[0] == 1, name
                if obj.dtype.kind in "fc":
                    assert obj.compression is None, name
                else:
                    assert obj.compression == "gzip" and obj.shuffle, name
            else:
                assert obj.compression is None and obj.chunks == (256,), name
    text = describe_trace(p)
    assert "intervals: 4 (steps 0–15" in text and "g_plus" in text and "uS" in text


def test_an_interval_cut_mid_write_is_not_read_and_is_trimmed_on_resume(tmp_path):
    p = tmp_path / "trace.h5"
    _write(p, 3)
    with h5py.File(p, "r+") as f:  # what a kill between the datasets and the commit marker leaves
        ds = f["intervals/layers/W0/weight"]
        ds.resize(4, axis=0)
        ds[3] = 7.0
    t = read_trace(p)
    assert t.intervals["layers/W0/weight"].shape[0] == 3 and len(t.intervals["step"]) == 3
    assert "4 written, 3 committed" in describe_trace(p)
    with TraceWriter.open(p, ATTRS, keep_step=5, keep_epoch=0) as w:  # resume from the checkpoint at step 5
        assert w.count() == 2 and w.count("epochs") == 0
        w.interval(step=10, epoch=1, values=_values(np.random.default_rng(9), 2))
    t = read_trace(p)
    assert list(t.intervals["step"]) == [0, 5, 10]
    assert all(v.shape[0] == 3 for v in t.intervals.values())
    assert not (t.intervals["layers/W0/weight"][2] == 7.0).all()


def test_a_record_cut_by_a_kill_during_its_flush_is_dropped_and_the_trace_rebuilt_on_resume(tmp_path):
    """A flush is not atomic: a kill during one can leave the metadata of the last record (the
    commit marker's new length, the chunk index) on disk while the superblock's end-of-allocation
    still ends before that record's chunks, and HDF5 then refuses to read them ("addr overflow").
    Made here by writing the last record in a second session and restoring the first session's
    end-of-allocation in the superblock (version 0: the end-of-file address at byte 40)."""
    import struct

    p = tmp_path / "trace.h5"
    written = _write(p, 3)
    eoa = p.stat().st_size
    with TraceWriter.open(p, ATTRS, keep_step=100, keep_epoch=1) as w:
        w.interval(step=15, epoch=1, values=_values(np.random.default_rng(5), 3))
    raw = bytearray(p.read_bytes())
    assert raw[8] == 0 and struct.unpack_from("<Q", raw, 40)[0] == p.stat().st_size
    struct.pack_into("<Q", raw, 40, eoa)
    p.write_bytes(bytes(raw))
    with h5py.File(p, "r") as f, pytest.raises(OSError, match="addr overflow"):
        f["intervals/layers/W0/weight"][:4]  # what a plain read of the committed length meets
    with pytest.warns(UserWarning, match="last 1 of 4 intervals records were cut"):
        t = read_trace(p)
    assert list(t.intervals["step"]) == [0, 5, 10] and list(t.epochs["epoch"]) == [1]
    assert np.array_equal(t.intervals["layers/W0/weight"], np.stack([v["layers/W0/weight"][0] for v in written]))
    with pytest.warns(UserWarning, match="rebuilding the trace"):
        w = TraceWriter.open(p, ATTRS, keep_step=100, keep_epoch=1)
    with w:
        w.interval(step=15, epoch=1, values=_values(np.random.default_rng(6), 3))
    t = read_trace(p)
    assert list(t.intervals["step"]) == [0, 5, 10, 15] and all(v.shape[0] == 4 for v in t.intervals.values())
    with h5py.File(p, "r") as f:  # the rebuilt file keeps the layout: units, chunks, compression
        ds = f["intervals/layers/W0/pulses_up"]
        assert ds.attrs["units"] == "pulses" and f["intervals/layers/W0/weight"].chunks == (1, 3, 4)
        assert f["intervals/metrics/train_loss"].chunks == (256,) and f.attrs["format"] == "mep_hw.trace"


def test_a_record_with_other_datasets_is_refused(tmp_path):
    p = tmp_path / "trace.h5"
    _write(p, 1)
    with TraceWriter.open(p, ATTRS, keep_step=100) as w, pytest.raises(TraceError, match="same datasets"):
        w.interval(step=5, epoch=0, values={"metrics/train_loss": (0.1, "1")})


def test_corrupt_truncated_foreign_and_missing_files(tmp_path):
    p = tmp_path / "trace.h5"
    _write(p, 3)
    data = p.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1, 2]
    for name, msg in (("cut.h5", "not a readable HDF5 file"), ("text.h5", "not a readable HDF5 file"),
                      ("foreign.h5", "not an mep_hw trace"), ("absent.h5", "does not exist")):
        with pytest.raises(TraceError, match=msg):
            read_trace(tmp_path / name)
