"""The mep-hw command line: help, a real run, and bad arguments."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from mep_hw.cli import main
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


def test_the_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "mep_hw.cli", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--estimator" in r.stdout


def test_devices_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "devices", "list")
    assert code == 0 and "pcm" in out and "crossbar" in out and "fpga_q16" in out and "mzi" in out
    code, out, _ = run_cli(capsys, "devices", "show", "pcm", "--set", "levels=16")
    assert code == 0 and "levels" in out and "16" in out and "µS" in out and "Nandakumar" in out
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
