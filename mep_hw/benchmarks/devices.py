"""Benchmarks of the device layer: settle-step overhead, and hardware-faithful MNIST accuracy.

    python -m mep_hw.benchmarks.devices overhead --out benchmarks/results/device_overhead.json
    python -m mep_hw.benchmarks.devices accuracy --data-dir ../shared/data --epochs 10 \\
        --cards ideal pcm:levels=16 --out benchmarks/results/device_accuracy.json

``overhead``: settling the 784-500-10 layered Hopfield network at a training batch through its
weight store, timed in interleaved rounds for three stores: no device (exact float weights, the
cheapest correct alternative), the Ideal card's tiles and the PCM card at 16 levels (read noise,
8-bit DAC and ADC, output noise). A *phase* is what a settle costs: making the phase's dynamics
(the input array read once, with its DAC, noise and ADC) and ``k`` Euler steps (dt = 1: a field
evaluation reads every array once, the hidden ones forward and transposed). The figures are
medians over rounds of the per-round ratio to the no-device phase, per step (k = 40) and per
short phase (k = 2, the typical EP phase length on MNIST).

``accuracy``: ``mep-hw train`` on MNIST 784-500-10 (symmetric EP, defaults) for each card, the
same number of epochs, one run folder per card; the JSON lists test accuracy, wall time, pulses,
refreshes and the energy per sample (training and inference, split by where it is spent, from the
cost accounting: read energy from the held conductances, pulse energies, holding power).
``--cards all`` runs every shipped card and the float baseline.

``update``: for each crossbar card, one host update at w̃ = 0 (weights programmed to w̃ = 0: a
bidirectional pair's devices at the nominal symmetry point G*, a unidirectional pair's at g_min)
of an intended change of k nominal pulses (k·dw_pulse, up and down) on 10⁵ weights: the mean and
spread of achieved/intended (device-to-device and cycle-to-cycle spread, nonlinearity,
asymmetry). Cheap; no data needed.

``figures``: the pulse-response figure of every crossbar card (docs/img/device_<card>.png).

``pulses``: one ``apply_pulses`` call on a 784×500 array of each card whose response is affine
(ECRAM, PCM, and NeuroSim's exponential curves: TaOx ReRAM, FeFET), pulses one at a time
(``per_pulse``, the reference) against the whole sequence by
its moments (``moments``), interleaved call by call in one process: the median time of each and
their ratio, and the mean and spread of the weight change of both, for weight-up and weight-down
counts drawn Poisson with means λ (1, 10, 100: an in-array step's counts at low and high rates).

    python -m mep_hw.benchmarks.devices update --out benchmarks/results/device_update_ratio.json
    python -m mep_hw.benchmarks.devices figures --out-dir docs/img
    python -m mep_hw.benchmarks.devices pulses --out benchmarks/results/pulse_application.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mep_hw.hw import CrossbarDevice, build_store, card_names, list_cards, load_card, parse_sets
from mep_hw.io import load_dataset
from mep_hw.io.runs import read_json, write_json
from mep_hw.model import LayeredHopfield
from mep_hw.train import TrainConfig, train


def _phase(model, x, s0, k: int):
    dyn = model.dynamics(x, check=False)
    s = s0.clone()
    for _ in range(k):
        s.add_(dyn.field(s))  # Euler, dt = 1
    return s


def _stores(base: LayeredHopfield, pcm_set):
    out = {}
    for name, card in (("none", None), ("ideal", load_card("ideal")), ("pcm", load_card("pcm", pcm_set or {"levels": 16}))):
        m = copy.deepcopy(base)
        out[name] = m.use_store(build_store(card, list(m.weights), seed=0))
    return out


def overhead(out: Path, batch: int = 100, rounds: int = 15, pcm_set=None) -> dict:
    torch.manual_seed(0)
    base = LayeredHopfield((784, 500, 10), generator=torch.Generator().manual_seed(0))
    x = torch.rand(batch, 784, generator=torch.Generator().manual_seed(1))
    models = _stores(base, pcm_set)
    s0 = torch.cat(base.forward_init(base.dynamics(x)), 1)
    report = {"benchmark": "device_overhead", "network": "784-500-10", "batch": batch, "rounds": rounds,
              "baseline": "no device (exact float weights)", "phases": {}}
    for k in (40, 2):
        times = {n: [] for n in models}
        for _ in range(3):  # warm up
            for m in models.values():
                _phase(m, x, s0, k)
        for _ in range(rounds):
            for n, m in models.items():
                t0 = time.perf_counter()
                _phase(m, x, s0, k)
                times[n].append((time.perf_counter() - t0) / k)
        paired = {n: statistics.median(a / b for a, b in zip(times[n], times["none"])) for n in models if n != "none"}
        report["phases"][f"k{k}"] = {
            "steps_per_phase": k,
            "step_us_median": {n: 1e6 * statistics.median(t) for n, t in times.items()},
            "ratio_over_no_device": paired,
            "ratio_quartiles": {n: statistics.quantiles([a / b for a, b in zip(times[n], times["none"])], n=4) for n in paired},
        }
    card = load_card("pcm", pcm_set or {"levels": 16})
    report["crossbar"] = {"card": "pcm", "levels": card.device.levels, "read_noise": card.device.read_noise,
                          "dac_bits": card.periphery.dac_bits, "adc_bits": card.periphery.adc_bits, "out_noise": card.periphery.out_noise}
    report["torch"], report["threads"] = torch.__version__, torch.get_num_threads()
    write_json(out, report)
    return report


def update_ratio(out: Path, n: int = 100_000, pulses=(1, 4, 16), seed: int = 0) -> dict:
    """Achieved/intended of one host update at w̃ = 0, per crossbar card (module docstring)."""
    report = {"benchmark": "device_update_ratio", "weights": n, "start": "programmed to w̃ = 0 (bidirectional: both devices at the nominal symmetry point G*)",
              "intended": "k · dw_pulse, k in pulses", "cards": {}}
    for card in list_cards():
        dev = card.device
        if not isinstance(dev, CrossbarDevice):
            continue
        gen = torch.Generator().manual_seed(seed)
        st = dev.program(dev.init_state((n,), gen, torch.float64, "cpu"), torch.zeros(n, dtype=torch.float64), gen)
        w0 = dev.mean(st)
        rows = {}
        for k in pulses:
            for sign, label in ((1.0, "up"), (-1.0, "down")):
                intended = sign * k * dev.dw_pulse
                new, _ = dev.update(st, torch.full((n,), intended, dtype=torch.float64), gen)
                ratio = (dev.mean(new) - w0) / intended
                rows[f"{label}_{k}"] = {"pulses": k, "intended": intended, "ratio_mean": float(ratio.mean()),
                                        "ratio_std": float(ratio.std()), "ratio_p10": float(ratio.quantile(0.1)),
                                        "ratio_p90": float(ratio.quantile(0.9))}
        sym = dev.symmetry_point(st)
        report["cards"][card.name] = {"response": dev.response, "update_mode": dev.update_mode, "dw_pulse": dev.dw_pulse,
                                      "symmetry_point_mean": float(sym.mean()), "symmetry_point_std": float(sym.std()),
                                      "updates": rows}
        r1 = rows[f"up_{pulses[0]}"]
        print(f"{card.name:<20} dw_pulse {dev.dw_pulse:.4g}: achieved/intended (1 pulse up) {r1['ratio_mean']:.3f} ± {r1['ratio_std']:.3f}; "
              + ", ".join(f"{k}: {v['ratio_mean']:.3f} ± {v['ratio_std']:.3f}" for k, v in rows.items() if k != f"up_{pulses[0]}"), flush=True)
    write_json(out, report)
    return report


def figures(out_dir: Path, n_devices: int = 1000) -> dict:
    """The pulse-response figure of every crossbar card (see mep_hw.hw.plots)."""
    from importlib import resources

    from mep_hw.hw.plots import plot_pulse_response

    done = {}
    for card in list_cards():
        if not isinstance(card.device, CrossbarDevice):
            continue
        csv = (resources.files("mep_hw.cards") / card.device.table_file).read_text() if card.device.table_file else None
        r = plot_pulse_response(card, out_dir / f"device_{card.name}.png", n_devices=n_devices, measured_csv=csv)
        done[card.name] = r["png"]
        print(f"{card.name}: {r['png']}", flush=True)
    return done


def accuracy(data_dir, cards: list[str], epochs: int, out: Path, runs_dir: Path | None, limit_train=None, limit_test=None) -> dict:
    if cards == ["all"]:
        cards = ["ideal_float", *card_names()]
    ds = load_dataset("mnist", data_dir, limit_train=limit_train, limit_test=limit_test)
    report = read_json(out) if out.exists() else {"benchmark": "device_accuracy", "network": "784-500-10", "runs": {}}
    for spec in cards:
        name, _, over = spec.partition(":")
        sets = parse_sets(over.split(",")) if over else {}
        label = spec
        cfg = TrainConfig(dataset="mnist", data_dir=data_dir, layers=(784, 500, 10), epochs=epochs,
                          device=None if name == "ideal_float" else name, set=sets,
                          limit_train=limit_train, limit_test=limit_test, estimator="symmetric")  # one estimator for every card, as measured
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = (runs_dir / label.replace(":", "_").replace("=", "").replace(",", "_")) if runs_dir else Path(tmp) / "run"
            t0 = time.perf_counter()
            res = train(cfg, run_dir, dataset=ds, progress=False)
            wall = time.perf_counter() - t0
            m = read_json(run_dir / "metrics.json")
        report["runs"][label] = {
            "card": name, "set": sets, "epochs": epochs, "test_accuracy": res.test_accuracy,
            "test_accuracy_history": [h.test_accuracy for h in res.history],
            "wall_seconds": wall, "epoch_seconds": [h.epoch_seconds for h in res.history],
            "pulses_up": sum(h.pulses_up for h in res.history), "pulses_down": sum(h.pulses_down for h in res.history),
            "refreshes": sum(h.refreshes for h in res.history),
            "nudged_steps_mean": [h.nudged_steps_mean for h in res.history],
            "limit_train": limit_train, "limit_test": limit_test,
            "energy_train_J_per_sample": (m.get("cost") or {}).get("train", {}).get("energy_J_per_sample"),
            "energy_inference_J_per_sample": (m.get("cost") or {}).get("inference", {}).get("energy_J_per_sample"),
            "latency_train_s_per_sample": (m.get("cost") or {}).get("train", {}).get("latency_s_per_sample"),
            "cost_missing": (m.get("cost") or {}).get("missing"),
            "device": m.get("device"),
        }
        write_json(out, report)
        print(f"{label}: test accuracy {res.test_accuracy:.4f} after {epochs} epochs ({wall:.0f} s)", flush=True)
    return report


def pulse_application(out: Path, shape=(500, 784), lams=(1.0, 10.0, 100.0), rounds: int = 5,
                      cards=("ecram", "pcm", "reram_taox", "fefet"), seed: int = 0) -> dict:
    """Per-pulse vs moments pulse application: time and weight-change statistics (module docstring)."""
    report = {"benchmark": "pulse_application", "shape": list(shape), "rounds": rounds, "threads": torch.get_num_threads(),
              "counts": "n_up, n_down ~ Poisson(lambda) per weight, independent", "cards": {}}
    for name in cards:
        ref = load_card(name).device
        mom = dataclasses.replace(ref, pulse_application="moments")
        gen = torch.Generator().manual_seed(seed)
        st = ref.program(ref.init_state(shape, gen, torch.float64, "cpu"), torch.zeros(shape, dtype=torch.float64), gen)
        w0 = ref.mean(st)
        rows = {}
        for lam in lams:
            rate = torch.full(shape, lam, dtype=torch.float64)
            n_up, n_dn = torch.poisson(rate, generator=gen), torch.poisson(rate, generator=gen)
            times = {"per_pulse": [], "moments": []}
            dw = {}
            for r in range(rounds):
                for label, dev in (("per_pulse", ref), ("moments", mom)):
                    g = torch.Generator().manual_seed(seed + 1 + r)
                    t0 = time.perf_counter()
                    new, _ = dev.apply_pulses(st, n_up, n_dn, g)
                    times[label].append(time.perf_counter() - t0)
                    dw[label] = dev.mean(new) - w0
            med = {k: statistics.median(v) for k, v in times.items()}
            rows[f"lambda_{lam:g}"] = {
                "lambda": lam, "seconds_median": med, "speedup": med["per_pulse"] / med["moments"],
                "dw_mean": {k: float(v.mean()) for k, v in dw.items()}, "dw_std": {k: float(v.std()) for k, v in dw.items()},
            }
            print(f"{name:<10} lambda {lam:>5g}: per pulse {med['per_pulse'] * 1e3:8.1f} ms, moments {med['moments'] * 1e3:6.1f} ms "
                  f"({med['per_pulse'] / med['moments']:.1f}x); dw mean {float(dw['per_pulse'].mean()):+.3e} / "
                  f"{float(dw['moments'].mean()):+.3e}, std {float(dw['per_pulse'].std()):.3e} / {float(dw['moments'].std()):.3e}",
                  flush=True)
        report["cards"][name] = {"response": ref.response, "update_mode": ref.update_mode, "rows": rows}
    write_json(out, report)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--batch", type=int, default=100)
    o.add_argument("--rounds", type=int, default=15)
    o.add_argument("--out", default="benchmarks/results/device_overhead.json")
    a = sub.add_parser("accuracy")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--epochs", type=int, default=10)
    a.add_argument("--cards", nargs="+", default=["ideal", "pcm:levels=16"],
                   help="card names, optionally with overrides: pcm:levels=16,read_noise=0.02 (ideal_float: no device; "
                   "all: the float baseline and every shipped card)")
    a.add_argument("--limit-train", type=int, default=None)
    a.add_argument("--limit-test", type=int, default=None)
    a.add_argument("--runs-dir", default=None, help="keep the run folders here")
    a.add_argument("--out", default="benchmarks/results/device_accuracy.json")
    u = sub.add_parser("update")
    u.add_argument("--weights", type=int, default=100_000)
    u.add_argument("--out", default="benchmarks/results/device_update_ratio.json")
    f = sub.add_parser("figures")
    f.add_argument("--out-dir", default="docs/img")
    f.add_argument("--devices", type=int, default=1000)
    q = sub.add_parser("pulses")
    q.add_argument("--rounds", type=int, default=5)
    q.add_argument("--cards", nargs="+", default=["ecram", "pcm", "reram_taox", "fefet"])
    q.add_argument("--out", default="benchmarks/results/pulse_application.json")
    args = p.parse_args(argv)
    if args.what == "pulses":
        pulse_application(Path(args.out), rounds=args.rounds, cards=tuple(args.cards))
        return 0
    if args.what == "update":
        update_ratio(Path(args.out), n=args.weights)
        return 0
    if args.what == "figures":
        figures(Path(args.out_dir), n_devices=args.devices)
        return 0
    if args.what == "overhead":
        r = overhead(Path(args.out), batch=args.batch, rounds=args.rounds)
        for k, ph in r["phases"].items():
            us = ph["step_us_median"]
            print(f"{ph['steps_per_phase']} steps per phase: per step no device {us['none']:.0f} us, ideal tiles {us['ideal']:.0f} us, "
                  f"pcm {us['pcm']:.0f} us; pcm / no device {ph['ratio_over_no_device']['pcm']:.2f}, "
                  f"ideal tiles / no device {ph['ratio_over_no_device']['ideal']:.2f}")
    else:
        accuracy(args.data_dir, args.cards, args.epochs, Path(args.out), Path(args.runs_dir) if args.runs_dir else None,
                 args.limit_train, args.limit_test)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
