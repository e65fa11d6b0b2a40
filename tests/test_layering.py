"""DESIGN §1: imports go downward only (import-linter contracts in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    code = "import sys, importlinter.cli as c; sys.exit(c.lint_imports(config_filename='pyproject.toml'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.slow
def test_public_names_are_the_functions_not_the_subpackages():
    code = (
        "import mep_hw, mep_hw.settle.engine, mep_hw.train.loop, mep_hw.benchmarks.foundation\n"
        "assert callable(mep_hw.settle) and callable(mep_hw.train), (mep_hw.settle, mep_hw.train)\n"
        "import importlib, inspect\n"
        "assert len(set(mep_hw.__all__)) == len(mep_hw.__all__), 'a name is listed twice'\n"
        "ns = {}\n"
        "exec('from mep_hw import *', ns)\n"
        "assert set(mep_hw.__all__) <= set(ns), sorted(set(mep_hw.__all__) - set(ns))\n"
        "for n in mep_hw.__all__:\n"
        "    o = getattr(mep_hw, n)\n"
        "    if inspect.isclass(o) or inspect.isfunction(o):  # the object of that name in its home module\n"
        "        assert o.__module__.startswith('mep_hw.'), (n, o.__module__)\n"
        "        assert getattr(importlib.import_module(o.__module__), o.__name__) is o, n\n"
        "from mep_hw.settle import SOLVERS\n"
        "assert mep_hw.SOLVERS is SOLVERS and mep_hw.train.__module__ == 'mep_hw.train.loop'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
