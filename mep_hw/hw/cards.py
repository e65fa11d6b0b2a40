"""Device cards: TOML files of physical parameters, each with its source, loaded into devices.

A card::

    name = "pcm"
    kind = "crossbar"            # ideal | crossbar | optical_mzi | fixed_point
    description = "…"
    source = "paper, year, table or figure the values come from"
    [device]                     # fields of the device class, in the units their names carry
    g_max_uS = 25.0
    [periphery]                  # DAC, ADC, output noise, mapping headroom
    dac_bits = 8
    [cost]                       # optional: per-operation energies and time constant (mep_hw.hw.cost)
    e_mac_J = 2.0e-13
    [sources]                    # a citation per [device] and [cost] field ("assumed: …" where none)
    g_max_uS = "Joshi et al., Nat. Commun. 2020"

Cards ship inside the wheel (package ``mep_hw.cards``, the top-level ``devices/`` folder). An
unknown key, a missing ``source``, a ``[device]`` or ``[cost]`` field without a ``[sources]``
entry, or a value out of range raises ConfigError naming the field.

A crossbar card may give its pulse response as measured data: ``response = "table"`` and
``table_file = "name.csv"`` beside the card, a CSV with the columns ``curve`` (measured device),
``direction`` (``up``: potentiation from the bottom; ``down``: depression from the top),
``pulse`` (pulses since the start of that ramp) and ``g_uS`` (the conductance read after it);
``#`` lines are comments (the citation). Each curve is made strictly monotone by isotonic
regression (:func:`~mep_hw.hw.crossbar.monotone_curve`) and sampled at integer pulse numbers.
``overrides`` set device or periphery fields by name (``levels=16``, ``read_noise=0.02``,
``dac_bits=8``…), as ``mep-hw train --set`` does.
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

from mep_hw.errors import ConfigError
from mep_hw.hw.base import Device, IdealDevice
from mep_hw.hw.cost import COST_FIELDS, CostConstants
from mep_hw.hw.crossbar import CrossbarDevice, ResponseTable, monotone_curve
from mep_hw.hw.fixedpoint import FixedPointDevice
from mep_hw.hw.optical import OpticalMZI
from mep_hw.hw.periphery import Periphery

__all__ = ["Card", "KINDS", "load_card", "list_cards", "parse_value", "card_names", "read_table_csv", "load_table"]

KINDS: dict[str, type[Device]] = {"ideal": IdealDevice, "crossbar": CrossbarDevice, "fixed_point": FixedPointDevice, "optical_mzi": OpticalMZI}
_TOP = {"name", "kind", "description", "source", "device", "periphery", "cost", "sources"}


class Card(NamedTuple):
    name: str
    kind: str
    description: str
    source: str
    device: Device
    periphery: Periphery
    sources: dict[str, str]
    path: str
    cost: CostConstants = CostConstants()

    def to_dict(self) -> dict[str, Any]:
        """Everything the card resolved to (for metrics.json and traces; a measured table by its file)."""
        dev = {f.name: getattr(self.device, f.name) for f in dataclasses.fields(self.device) if f.name != "table"}
        per = {f.name: getattr(self.periphery, f.name) for f in dataclasses.fields(self.periphery)}
        return {"name": self.name, "kind": self.kind, "description": self.description, "source": self.source,
                "device": {k: list(v) if isinstance(v, tuple) else v for k, v in dev.items()},
                "periphery": per, "cost": {f.name: getattr(self.cost, f.name) for f in dataclasses.fields(self.cost)
                                           if getattr(self.cost, f.name) is not None},
                "sources": self.sources, "path": self.path}


def _cards_dir():
    try:
        return resources.files("mep_hw.cards")
    except ModuleNotFoundError:  # a source checkout on PYTHONPATH, not installed: the folder itself
        src = Path(__file__).resolve().parents[2] / "devices"
        if src.is_dir():
            return src
        raise


def card_names() -> list[str]:
    return sorted(p.name[:-5] for p in _cards_dir().iterdir() if p.name.endswith(".toml"))


def parse_value(text: str):
    """A ``--set`` value: TOML syntax (numbers, true/false, quoted strings, arrays), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_sets(items) -> dict:
    """``--set FIELD=VALUE`` items as a dict (values in TOML syntax: 16, 0.02, true, "str")."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set levels=16")
        out[key.strip()] = parse_value(value.strip())
    return out


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"table"}


def read_table_csv(text: str, where: str = "table") -> dict[tuple[int, str], tuple[list[float], list[float]]]:
    """Measured points of a response table CSV: {(curve, direction): (pulses, g_uS)}."""
    rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise ConfigError(f"{where}: the table has no rows")
    head = [h.strip() for h in rows[0].split(",")]
    need = ["curve", "direction", "pulse", "g_uS"]
    if head != need:
        raise ConfigError(f"{where}: the header is {','.join(head)}; expected {','.join(need)}")
    out: dict[tuple[int, str], tuple[list[float], list[float]]] = {}
    for i, ln in enumerate(rows[1:], start=2):
        parts = [x.strip() for x in ln.split(",")]
        try:
            c, d, x, g = int(parts[0]), parts[1], float(parts[2]), float(parts[3])
        except (ValueError, IndexError):
            raise ConfigError(f"{where}: data row {i} ({ln!r}) is not 'curve,direction,pulse,g_uS'") from None
        if d not in ("up", "down"):
            raise ConfigError(f"{where}: data row {i}: direction {d!r} is not 'up' or 'down'")
        xs, gs = out.setdefault((c, d), ([], []))
        xs.append(x)
        gs.append(g)
    return out


def load_table(text: str, where: str = "table") -> ResponseTable:
    """A :class:`ResponseTable` from the CSV text: each curve's up and down ramps made monotone."""
    pts = read_table_csv(text, where)
    curves = sorted({c for c, _ in pts})
    for c in curves:
        for d in ("up", "down"):
            if (c, d) not in pts:
                raise ConfigError(f"{where}: curve {c} has no '{d}' ramp; every measured device needs both")
    source = " ".join(ln.lstrip("# ").strip() for ln in text.splitlines() if ln.lstrip().startswith("#"))
    return ResponseTable(tuple(monotone_curve(*pts[(c, "up")], increasing=True) for c in curves),
                         tuple(monotone_curve(*pts[(c, "down")], increasing=False) for c in curves), source)


def _build(cls, values: dict, where: str):
    valid = _fields(cls)
    if isinstance(values.get("table"), ResponseTable):  # loaded from table_file, not written in the card
        valid = valid | {"table"}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(valid))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_card(name_or_path: str, overrides: dict[str, Any] | None = None) -> Card:
    """Load a shipped card by name (``pcm``) or a card file by path, applying ``overrides``."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise ConfigError(f"device card {p} does not exist; shipped cards: {', '.join(card_names())}")
        text, where, folder = p.read_text(), str(p), p.parent
    else:
        f = _cards_dir() / f"{name_or_path}.toml"
        if not f.is_file():
            raise ConfigError(f"unknown device {name_or_path!r}; shipped cards: {', '.join(card_names())} (or give a path to a .toml card)")
        text, where, folder = f.read_text(), f"card {name_or_path!r}", _cards_dir()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; a card has: {', '.join(sorted(_TOP))}")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: the card has no 'source' (paper, year, table or figure of its values); add one")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind={kind!r} is not valid; choose one of: {', '.join(KINDS)}")
    cls = KINDS[kind]
    dev_vals = dict(raw.get("device", {}))
    per_vals = dict(raw.get("periphery", {}))
    cost_vals = dict(raw.get("cost", {}))
    sources = dict(raw.get("sources", {}))
    bad_src = sorted(set(sources) - _fields(cls) - _fields(Periphery) - COST_FIELDS)
    if bad_src:
        raise ConfigError(f"{where}: [sources] names unknown field(s) {', '.join(bad_src)}")
    unsourced = sorted(k for k in cost_vals if k in COST_FIELDS and k not in sources)
    if unsourced:  # cost constants are estimates: each must say where it comes from
        raise ConfigError(f"{where}: [cost] field(s) {', '.join(unsourced)} have no [sources] entry; cite or derive each")

    for key, value in (overrides or {}).items():
        if key in _fields(cls) and key not in ("kind",):
            dev_vals[key] = value
        elif key in _fields(Periphery):
            per_vals[key] = value
        elif key in COST_FIELDS:
            cost_vals[key] = value
        else:
            valid = sorted((_fields(cls) - {"name"}) | _fields(Periphery) | COST_FIELDS)
            raise ConfigError(f"--set {key}: no such field on a {kind} card; valid fields: {', '.join(valid)}")
    dev_vals.setdefault("name", raw.get("name", Path(where).stem))
    if dev_vals.get("table_file"):
        tf = folder / dev_vals["table_file"]
        if not tf.is_file():
            raise ConfigError(f"{where}: table_file {dev_vals['table_file']!r} is not a file beside the card")
        dev_vals["table"] = load_table(tf.read_text(), f"{where} table {dev_vals['table_file']!r}")
    device = _build(cls, dev_vals, f"{where} [device]")
    periphery = _build(Periphery, per_vals, f"{where} [periphery]")
    cost = _build(CostConstants, cost_vals, f"{where} [cost]")
    unsourced = sorted(k for k in raw.get("device", {}) if k != "name" and k not in sources)
    if unsourced:  # every physical value says where it comes from ("assumed: …" where nothing backs it)
        raise ConfigError(f"{where}: [device] field(s) {', '.join(unsourced)} have no [sources] entry; "
                          "cite the paper, table or figure of each, or write \"assumed: <why>\"")
    return Card(raw.get("name", device.name), kind, raw.get("description", ""), source, device, periphery, sources, where, cost)


def list_cards() -> list[Card]:
    return [load_card(n) for n in card_names()]
