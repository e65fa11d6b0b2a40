"""Every Python example in README.md and docs/ runs (those needing the MNIST folder excepted)."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = []
for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", md.read_text(), re.S)):
        BLOCKS.append(pytest.param(code, id=f"{md.name}-{i}"))


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS)
def test_example_runs(code, tmp_path, monkeypatch):
    if "shared/data" in code:
        pytest.skip("needs the MNIST folder")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def _command_lines():
    """Every ``mep-hw …`` command in the bash blocks of README.md, docs/ and experiments/, with
    synopsis brackets opened ([--workers N] → --workers N) and "…" dropped."""
    out = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md"]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", md.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;", line.split("#")[0]):
                    part = part.strip()
                    if part.startswith("mep-hw "):
                        out.append(pytest.param(part, id=f"{md.name}:{part[:60]}"))
    return out


COMMANDS = _command_lines()


def test_the_docs_show_commands():
    assert {c.values[0].split()[1] for c in COMMANDS} >= {"train", "sweep", "compare", "devices", "trace"}


@pytest.mark.parametrize("line", COMMANDS)
def test_every_documented_command_line_parses(line, capsys):
    """Options that do not exist (or were renamed) and invalid choices fail; a placeholder in
    capitals where a number goes (--workers N) is accepted."""
    from mep_hw.cli import build_parser

    args = [a for a in shlex.split(line.replace("[", " ").replace("]", " "))[1:] if a != "…"]
    try:
        build_parser().parse_args(args)
    except SystemExit:
        err = capsys.readouterr().err
        placeholder = re.search(r"invalid (int|float) value: '([A-Z_]+)'", err)
        assert placeholder, f"{line}: {err.strip().splitlines()[-1]}"
