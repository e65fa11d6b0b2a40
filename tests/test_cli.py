"""The mep-hw command line: help, a real run, and bad arguments."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest

from mep_hw.cli import main
from mep_hw.io.runs import load_checkpoint
from mep_hw.train import TrainConfig


def run_cli(capsys, *args):
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse exits on --help and on its own errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_explains_every_option(capsys):
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
    for flag in ("--out", "--resume", "--config"):
        assert flag in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "train" in out


@pytest.mark.slow
def test_train_writes_the_run_folder(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(
        capsys, "train", "--dataset", "digits", "--layers", "64,32,10", "--epochs", "2",
        "--limit-train", "150", "--limit-test", "60", "--out", str(out_dir),
    )
    assert code == 0, err
    m = json.loads((out_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and len(m["history"]) == 2
    assert "test accuracy" in out
    # --config reruns it exactly
    code, _, err = run_cli(capsys, "train", "--config", str(out_dir / "config.toml"), "--out", str(tmp_path / "again"), "--quiet")
    assert code == 0, err
    m2 = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert [h["test_accuracy"] for h in m2["history"]] == [h["test_accuracy"] for h in m["history"]]


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["--beta", "0"], 2, "beta=0.0 must be a finite number > 0"),
        (["--beta", "-0.5"], 2, "beta=-0.5"),
        (["--solver", "rk45"], 2, "invalid choice: 'rk45'"),
        (["--layers", "10,10"], 2, "do not fit dataset 'digits'"),
        (["--epochs", "two"], 2, "invalid int value"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], 2, "is not a folder"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, args, code, match):
    got, _, err = run_cli(capsys, "train", "--dataset", "digits", "--out", str(tmp_path / "r"), *args)
    assert got == code
    assert match in err
    assert "Traceback" not in err


def mep_hw_script() -> str:
    """The installed ``mep-hw`` console script of this environment."""
    path = Path(sys.executable).parent / "mep-hw"
    assert path.exists(), f"no mep-hw console script beside {sys.executable}: pip install -e ."
    return str(path)


def run_script(*args, cwd=None):
    r = subprocess.run([mep_hw_script(), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


@pytest.mark.slow
def test_the_console_script_is_installed():
    code, out, _ = run_script("train", "--help")
    assert code == 0 and "--estimator" in out and "--cosine-cycles" in out
    code, out, _ = run_script("--version")
    assert code == 0 and out.startswith("mep-hw ")


def test_devices_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "devices", "list")
    assert code == 0 and "pcm" in out and "crossbar" in out and "fpga_q16" in out and "mzi" in out
    code, out, _ = run_cli(capsys, "devices", "show", "pcm", "--set", "levels=16")
    assert code == 0 and "levels" in out and "16" in out and "µS" in out and "Nandakumar" in out
    # what 0 means for the fields where it is a mode, not a count
    code, out, _ = run_cli(capsys, "devices", "show", "pcm", "--set", "dac_bits=0")
    line = {ln.split("=")[0].strip(): ln for ln in out.splitlines() if "=" in ln}
    assert "0 = continuous conductance" in line["levels"] and "0 = ideal DAC" in line["dac_bits"]
    assert "adc_bits = 0: ideal ADC" in out
    code, _, err = run_cli(capsys, "devices", "show", "graphene")
    assert code == 2 and "unknown device 'graphene'" in err


def test_devices_plot_draws_the_pulse_response(tmp_path, capsys):
    out = tmp_path / "agsi.png"
    code, text, err = run_cli(capsys, "devices", "plot", "reram_agsi_measured", "--devices", "50", "--out", str(out))
    assert code == 0, err
    assert "97 potentiating and 101 depressing pulses, 50 devices" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, text, err = run_cli(capsys, "devices", "plot", "pcm", "--devices", "20", "--set", "dw_min_uS=1.0", "--out", str(tmp_path / "p.png"))
    assert code == 0 and "50 potentiating and 0 depressing pulses" in text  # SET only: 2·R/dw_min
    code, _, err = run_cli(capsys, "devices", "plot", "mzi", "--out", str(tmp_path / "m.png"))
    assert code == 2 and "has no pulse response to plot" in err


@pytest.mark.slow
def test_train_on_a_device_with_set(tmp_path, capsys):
    code, out, err = run_cli(
        capsys, "train", "--dataset", "digits", "--layers", "64,16,10", "--epochs", "1", "--limit-train", "100",
        "--limit-test", "50", "--device", "pcm", "--set", "levels=16", "--set", "read_noise=0.02",
        "--set", "dac_bits=8", "--set", "adc_bits=8", "--out", str(tmp_path / "r"), "--quiet",
    )
    assert code == 0, err
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["device"]["device"]["read_noise"] == 0.02 and m["device"]["periphery"]["adc_bits"] == 8
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--device", "pcm", "--set", "levels", "--out", str(tmp_path / "x"))
    assert code == 2 and "expected FIELD=VALUE" in err


# ------------------------------------------------------------------------------------------------
# Every failure is one line and an exit status, as a new user meets it: the installed console
# script, in a fresh process (the table of issue 11).
S = ["--dataset", "digits", "--layers", "64,16,10", "--limit-train", "200", "--limit-test", "100", "--batch-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished two-epoch run (copied by each test that changes it)."""
    run = tmp_path_factory.mktemp("done") / "run"
    assert main(["train", *S, "--epochs", "2", "--out", str(run)]) == 0
    return run


def _copy(run, to):
    shutil.copytree(run, to)
    return to


def _files(run):
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _one_line(err):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("case,code,match", [
    ("resume-without-checkpoint", 2, r"checkpoint.pt is missing but .* records 2 finished epoch\(s\)"),
    ("resume-fewer-epochs", 2, "has already finished 2 epochs and a resume cannot undo them"),
    ("resume-complete", 0, "is complete \\(2 of 2 epochs\\); nothing to do"),
    ("resume-set-without-device", 2, r"set=\{'levels': 64\} \(run has none\)"),
    ("resume-random-checkpoint", 2, r"is not an mep_hw checkpoint \(not a torch archive\)"),
    ("train-out-is-a-file", 2, "--out .* is a file, not a folder"),
    ("compare-out-is-a-file", 2, "--out .* is a file, not a folder"),
    ("train-lr-1e6", 3, r"run stopped: diverged at step 4 \(epoch 1\): W0 is exploding"),
    ("train-sgd-lr-1e30", 3, r"run stopped: diverged at step 4 \(epoch 1\): W0 is exploding"),
    ("train-beta-1e8", 2, "beta=1e\\+08 ≥ 1 with the MSE cost"),
    ("train-dt-50", 3, r"run stopped: not settling at step 4 \(epoch 1\): 100 % of this epoch's 200 free-phase settles"),
])
@pytest.mark.slow
def test_each_failure_is_one_line_and_an_exit_status(tmp_path, done_run, case, code, match):
    run = tmp_path / "run"
    before = None
    if case.startswith("resume"):
        _copy(done_run, run)
        args = ["train", "--out", run, "--resume", "--quiet"]
        if case == "resume-without-checkpoint":
            (run / "checkpoint.pt").unlink()
        elif case == "resume-fewer-epochs":
            args += ["--epochs", "1"]
        elif case == "resume-set-without-device":
            args += ["--set", "levels=64"]
        elif case == "resume-random-checkpoint":
            (run / "checkpoint.pt").write_bytes(os.urandom(2000))
        before = _files(run)
    elif case.endswith("out-is-a-file"):
        (tmp_path / "file").write_text("x")
        args = ["train", *S, "--out", tmp_path / "file"] if case.startswith("train") else ["compare", done_run, "--out", tmp_path / "file"]
    else:
        extra = {"train-lr-1e6": ["--lr", "1e6"], "train-sgd-lr-1e30": ["--optimizer", "sgd", "--lr", "1e30"],
                 "train-beta-1e8": ["--beta", "1e8", "--estimator", "symmetric"], "train-dt-50": ["--dt", "50"]}[case]
        args = ["train", *S, "--epochs", "2", *extra, "--out", run]
    got, _, err = run_script(*args)
    assert got == code, err
    line = _one_line(err)
    assert re.search(match, line), line
    assert "weights_only" not in line  # never advise loading an untrusted pickle
    if before is not None:
        assert _files(run) == before  # a refused (or empty) resume changes nothing
    if code == 3:
        m = json.loads((run / "metrics.json").read_text())
        assert m["status"] in ("diverged", "not_settling") and m["status"] in line.replace(" ", "_")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["train", "compare", "sweep", "resume"])
def test_a_read_only_output_folder_is_one_line(tmp_path, done_run, lock_folder, what):
    spec = tmp_path / "s.toml"
    spec.write_text('[base]\ndataset = "digits"\nlayers = "64,8,10"\nepochs = 1\nlimit_train = 100\nlimit_test = 50\n[axes]\nseed = [0, 1]\n')
    if what == "resume":
        run = lock_folder(_copy(done_run, tmp_path / "run"))
        args = ["train", "--out", run, "--resume", "--epochs", "3", "--quiet"]
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        lock_folder(ro)
        args = {"train": ["train", *S, "--epochs", "1", "--out", ro / "run"], "compare": ["compare", done_run, "--out", ro / "rep"],
                "sweep": ["sweep", spec, "--out", ro / "sweep", "--workers", "1", "--quiet"]}[what]
    code, _, err = run_script(*args)
    assert code == 2
    line = _one_line(err)
    assert "read-only (permission denied); choose a writable folder" in line and str(tmp_path) in line


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_last_one_and_records_failed(tmp_path, capsys, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*a, **kw):  # the second checkpoint goes to /dev/full: the kernel answers ENOSPC
        fd, path = real(*a, **kw)
        if str(kw.get("prefix", "")).startswith(".checkpoint.pt."):
            calls["n"] += 1
            if calls["n"] == 2:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *S, "--epochs", "3", "--out", str(run))
    assert code == 2
    line = _one_line(err)
    assert f"cannot write {run / 'checkpoint.pt'}: the disk is full" in line and "previous version" in line
    m = json.loads((run / "metrics.json").read_text())
    ck = load_checkpoint(run / "checkpoint.pt")
    assert m["status"] == "failed" and "disk is full" in m["error"]
    assert m["epochs_completed"] == ck["epoch"] == 1 and len(ck["history"]) == 1
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    monkeypatch.setattr(tempfile, "mkstemp", real)
    # space freed: the resume continues exactly
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert main(["train", *S, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    strip = lambda h: [{k: v for k, v in e.items() if not k.endswith("seconds")} for e in h]  # noqa: E731
    assert strip(json.loads((run / "metrics.json").read_text())["history"]) == strip(json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"])


@pytest.mark.slow
def test_an_extension_on_the_command_line_is_recorded(tmp_path, done_run, capsys):
    run = _copy(done_run, tmp_path / "run")
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3", "--quiet")
    assert code == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs_completed"] == 3 and m["resumes"] == [{"at_epoch": 2, "changes": {"epochs": [2, 3]}}]
    assert "epochs = 3" in (run / "config.toml").read_text()
