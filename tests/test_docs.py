"""Every Python example in README.md and docs/ runs (those needing the MNIST folder excepted)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = []
for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
        BLOCKS.append(pytest.param(code, id=f"{md.name}-{i}"))


@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, tmp_path, monkeypatch):
    if "shared/data" in code:
        pytest.skip("needs the MNIST folder")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def test_there_are_examples():
    assert len(BLOCKS) >= 5
