"""How close is an EP estimate to the exact gradient? Per layer, per estimator, β and settle.

    python experiments/ep_alignment.py --layers 784,500,500,10 --data-dir /work/shared/data/mnist \
        --n 100 --out benchmarks/results/ep_alignment_784-500-500-10.json [--checkpoint RUN/checkpoint.pt]

For one batch of ``--n`` training images and the network at initialisation (seed ``--seed``, the
training initialisation) or loaded from a run's ``checkpoint.pt``:

1. the exact free fixed point in float64 (Euler at dt = 0.5 from the bottom-up pass to
   rms(ds/dt) ≤ 1e-11) and the exact gradient of the batch-mean cost by the implicit function
   theorem (:func:`mep_hw.ep.reference.implicit_gradient`, conjugate gradients on autograd
   Hessian–vector products);
2. for every variant (estimator, β, free and nudged tolerances and step limits, dtype) the EP
   estimate, its cosine and relative error against (1) over all parameters and per weight
   matrix, the settle steps, the share of nudged samples at their step limit, the free residual;
3. the displacement of the output in the −β and +β phases (median ratio of ‖s^{∓β} − s⁰‖).

Variants named ``…-exact`` settle in float64 to 1e-10 with no practical step limit: their error
is the estimator's own bias at that β; the others are what training uses (float32).
Writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mep_hw.ep import EPConfig, ep_gradients
from mep_hw.ep.reference import exact_fixed_point, grad_alignment, implicit_gradient
from mep_hw.io import load_dataset
from mep_hw.io.runs import write_json
from mep_hw.model import LayeredHopfield, one_hot
from mep_hw.settle import SettleConfig, SettleStatus
from mep_hw.train import TrainConfig

EXACT = SettleConfig(solver="euler", dt=0.5, atol=1e-10, rtol=0.0, max_steps=200_000)


def variant(name: str, estimator: str, beta: float, free=None, nudged=None, exact=False, init="forward") -> dict:
    return {"name": name, "estimator": estimator, "beta": beta, "free": free, "nudged": nudged, "exact": exact,
            "init": init}


def default_variants(betas=(0.05, 0.1, 0.2, 0.5, 1.0)) -> list[dict]:
    """Defaults of TrainConfig at several β for both estimators, their exact counterparts, and
    the settle knobs one at a time (free tolerance tight, nudged step limit raised)."""
    d = TrainConfig()
    free_d = (d.atol, d.rtol, d.max_steps)
    tight_free = (1e-6, 0.0, 2000)
    out = []
    for est in ("symmetric", "one-sided"):
        for b in betas:
            tag = f"{est[:3]}-b{b:g}"
            nud_d = (TrainConfig(estimator=est, beta=b).nudged_tolerance(), d.nudged_rtol, d.nudged_max_steps)
            out.append(variant(f"{tag}-exact", est, b, exact=True))
            out.append(variant(f"{tag}-today", est, b, free_d, nud_d))
            out.append(variant(f"{tag}-free_tight", est, b, tight_free, nud_d))
            out.append(variant(f"{tag}-nudged_cap200", est, b, free_d, (nud_d[0], nud_d[1], 200)))
            out.append(variant(f"{tag}-both_tight", est, b, tight_free, (1e-6, 0.0, 2000)))
    return out


FREE = {"loose": (1e-4, 1e-2, 100), "mid": (1e-5, 0.0, 500), "tight": (1e-6, 0.0, 2000)}


def grid_variants(spec: str) -> list[dict]:
    """A product grid ``estimator=symmetric,one-sided;beta=0.2,0.5;free=loose,1;nudged_c=2e-5;cap=20,100``.

    ``estimator`` may also be ``holomorphic`` (needs ``--activation sigmoid``).
    ``free`` is a name of FREE (loose: the symmetric estimator's 1e-4 + 1e-2·rms(s); mid; tight) or a number k:
    free atol = k·nudged_c·β, rtol 0 (k = 1: the free phase is as tight as the nudged ones).
    Nudged phases: atol = nudged_c·β, rtol 0, step limit ``cap`` (the free limit is 10·cap).
    Each (estimator, β) also gets its exact counterpart (``…-exact``) once.
    """
    import itertools

    axes = dict(kv.split("=") for kv in spec.split(";"))
    vals = {k: v.split(",") for k, v in axes.items()}
    out, seen = [], set()
    for est, b, fr, c, cap in itertools.product(vals["estimator"], vals["beta"], vals.get("free", ["loose"]),
                                                 vals.get("nudged_c", ["2e-5"]), vals.get("cap", ["20"])):
        b, c, cap = float(b), float(c), int(cap)
        if (est, b) not in seen:
            seen.add((est, b))
            out.append(variant(f"{est[:3]}-b{b:g}-exact", est, b, exact=True))
        if fr == "default":  # what TrainConfig gives this estimator and β (its own tolerances)
            ep = TrainConfig(estimator=est, beta=b, activation="sigmoid" if est == "holomorphic" else "hard_sigmoid").ep_config()
            out.append(variant(f"{est[:3]}-b{b:g}-default", est, b, (ep.free.atol, ep.free.rtol, ep.free.max_steps),
                               (ep.nudged.atol, ep.nudged.rtol, ep.nudged.max_steps)))
            continue
        free = FREE[fr] if fr in FREE else (float(fr) * c * b, 0.0, 10 * cap)
        out.append(variant(f"{est[:3]}-b{b:g}-free_{fr}-c{c:g}-cap{cap}", est, b, free, (c * b, 0.0, cap)))
    return out


def settle_cfg(spec, dt: float) -> SettleConfig:
    atol, rtol, steps = spec
    return SettleConfig(solver="euler", dt=dt, atol=atol, rtol=rtol, max_steps=steps)


def _rms_diff(a, b) -> float:
    """rms over samples of the per-sample L2 distance between two layered states."""
    d = sum((u.double() - v).pow(2).sum(1) for u, v in zip(a, b))
    return float(d.mean().sqrt())


def run_variant(m32, m64, x, y, v: dict, ref: list, dt: float, s0_64) -> dict:
    if v["exact"]:
        cfg = EPConfig(beta=v["beta"], estimator=v["estimator"], init=v["init"], free=EXACT, nudged=EXACT)
        model, xx, yy = m64, x.double(), y.double()
    else:
        cfg = EPConfig(beta=v["beta"], estimator=v["estimator"], init=v["init"], free=settle_cfg(v["free"], dt),
                       nudged=settle_cfg(v["nudged"], dt))
        model, xx, yy = m32, x.float(), y.float()
    t0 = time.perf_counter()
    r = ep_gradients(model, xx, yy, cfg)
    sec = time.perf_counter() - t0
    al = grad_alignment(r.grads, ref)
    nud_limit = [float((n.status == SettleStatus.STEP_LIMIT).float().mean()) for n in r.nudged]
    out = {**v, "seconds": sec, **al,
           "free_steps_mean": float(r.free.steps.float().mean()),
           "free_step_limit_frac": float((r.free.status == SettleStatus.STEP_LIMIT).float().mean()),
           "free_residual_max": float(r.free.residual.max()),
           "nudged_steps_mean": [float(n.steps.float().mean()) for n in r.nudged],
           "nudged_step_limit_frac": nud_limit,
           "steps_total_mean": float(r.free.steps.float().mean()) + sum(float(n.steps.float().mean()) for n in r.nudged),
           "free_state_err_rms": _rms_diff(r.free.states, s0_64)}
    if v["estimator"] == "symmetric":
        s0 = [t.double() for t in r.free.states]
        dp = (r.nudged[0].states[-1].double() - s0[-1]).norm(dim=1)
        dm = (r.nudged[1].states[-1].double() - s0[-1]).norm(dim=1)
        ok = dp > 1e-9
        out["out_disp_minus_over_plus_median"] = float((dm[ok] / dp[ok]).median()) if ok.any() else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="784,500,500,10")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cost", default="mse", choices=("mse", "ce"))
    p.add_argument("--activation", default="hard_sigmoid", help="sigmoid for the holomorphic estimator")
    p.add_argument("--n", type=int, default=100, help="samples in the batch")
    p.add_argument("--offset", type=int, default=0, help="first training sample of the batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="a run's checkpoint.pt (default: the initialisation)")
    p.add_argument("--betas", default="0.05,0.1,0.2,0.5,1.0")
    p.add_argument("--grid", default=None, help="a product grid of variants instead of the default set (see grid_variants)")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only variants whose name has one")
    p.add_argument("--dt", type=float, default=1.0, help="Euler step of the non-exact variants")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    layers = tuple(int(v) for v in a.layers.split(","))
    ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False) if a.checkpoint else None
    if ck is not None and "config" in ck:  # a deep_train checkpoint names its network
        layers, a.cost = tuple(ck["config"]["layers"]), ck["config"]["cost"]
    ds = load_dataset(a.dataset, a.data_dir, limit_train=a.offset + a.n, limit_test=1)
    x = torch.as_tensor(ds.x_train[a.offset:a.offset + a.n], dtype=torch.float64)
    y = one_hot(torch.as_tensor(ds.y_train[a.offset:a.offset + a.n]), layers[-1], torch.float64)
    m32 = LayeredHopfield(layers, activation=a.activation, cost=a.cost, generator=torch.Generator().manual_seed(a.seed))
    if ck is not None:
        m32.load_state_dict(ck["model"])
    m64 = LayeredHopfield(layers, activation=a.activation, cost=a.cost, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    t0 = time.perf_counter()
    fp = exact_fixed_point(m64, x)
    ig = implicit_gradient(m64, x, y, fp.states)
    ref_sec = time.perf_counter() - t0
    ref_norms = [float(g.norm()) for g in ig.grads]
    print(f"exact gradient: {ref_sec:.1f}s, fixed point {int(fp.steps.max())} steps, CG {ig.cg_iters} it, "
          f"res {ig.cg_residual:.1e}, min curvature {ig.min_curvature:.3g}, free units {ig.free_frac:.3f}", flush=True)
    betas = tuple(float(b) for b in a.betas.split(","))
    vs = [v for g in a.grid.split("|") for v in grid_variants(g)] if a.grid else default_variants(betas)
    if a.only:
        keys = a.only.split(",")
        vs = [v for v in vs if any(k in v["name"] for k in keys)]
    rows = []
    for v in vs:
        r = run_variant(m32, m64, x, y, v, ig.grads, a.dt, fp.states)
        rows.append(r)
        print(f"{v['name']:32s} cos {r['cos']:.4f} rel {r['rel_err']:.3f} | W cos "
              + " ".join(f"{c:.3f}" for c in r["cos_each"][0::2])
              + f" | steps free {r['free_steps_mean']:.1f} nudged {[round(s, 1) for s in r['nudged_steps_mean']]}"
              f" cap {[round(f, 2) for f in r['nudged_step_limit_frac']]} | {r['seconds']:.1f}s", flush=True)
    report = {
        "benchmark": "ep_alignment",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": a.threads},
        "args": vars(a),
        "reference": {"seconds": ref_sec, "fixed_point_steps_max": int(fp.steps.max()),
                      "cg_iters": ig.cg_iters, "cg_residual": ig.cg_residual, "min_curvature": ig.min_curvature,
                      "free_frac": ig.free_frac, "grad_norms": ref_norms,
                      "loss": float(m64.cost_fn(fp.states, y).mean())},
        "variants": rows,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), report)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
