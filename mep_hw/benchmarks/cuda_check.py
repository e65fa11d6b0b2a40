"""CUDA check of the settle loop: time and host synchronisations per settle step and per EP step.

    python -m mep_hw.benchmarks.cuda_check --out benchmarks/results/cuda_check.json
    python -m mep_hw.benchmarks.cuda_check --data-dir ../shared/data/mnist   # MNIST batches instead

For 784-500-10 and 784-500-500-10, at batch 100 and 1000, with the ``euler`` and ``block``
solvers and host checks every 1, 4 and 16 steps, each read synchronously (``--poll sync``: the
host waits for the count) and asynchronously (``async``, the CUDA default: the count is copied
without waiting and read once its copy has completed; see ``mep_hw.settle.engine._CountPoll``):
a network is first trained for ``--warmup``
EP steps (so the settles take the steps a training run's do), then

* *settle*: the free phase and the symmetric nudged phase of ``--batches`` batches are settled
  again, timed (CUDA synchronised before and after) and their host synchronisations counted;
  per settle step = per loop iteration (field evaluations, ``SettleResult.nfev``);
* *EP step*: ``ep_gradients`` (with ``check=False``: no per-batch host reads; its settles read
  the count as the settle's default does, asynchronously on CUDA) plus the Adam step, timed and
  counted per step;
* *device step* (``--card``, default ``pcm`` with 16 levels; ``none`` skips it): the training
  step of :class:`mep_hw.train.loop.EPTrainer` on the weights held by device tiles of that card
  (reads with DAC, read noise and ADC; the host Adam writing through the device), timed and
  counted per step. A failure (e.g. an operation the device model runs on the CPU only) is
  recorded in the row as ``device_error`` instead of stopping the script.

Host synchronisations are counted with ``torch.cuda.set_sync_debug_mode("warn")`` (every
operation that makes the host wait for the device warns once; the warnings are recorded) and,
as a cross-check, by a profiler count of ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` /
device-to-host copies. Without CUDA the script prints that it skipped and exits 0 (``--device
cpu`` runs the same measurement on the CPU, without the counts, to check the script itself).
Data: MNIST from ``--data-dir`` if given, else synthetic 784-pixel images whose class is the
brightest of ten stripes (no download: the device machine may have no network).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
import warnings
from pathlib import Path

import torch

from mep_hw.ep import assign_grads, ep_gradients
from mep_hw.hw import build_store, load_card
from mep_hw.io.runs import write_json
from mep_hw.model import one_hot
from mep_hw.settle import settle
from mep_hw.train import TrainConfig
from mep_hw.train.fit import epoch_generator
from mep_hw.train.loop import EPTrainer, build_model
from mep_hw.train.regimes import build_regime

__all__ = ["measure", "main"]

NETS = ("784,500,10", "784,500,500,10")


def _data(data_dir: str | None, n: int, device):
    """(x, y): MNIST training images, or synthetic ones whose label is the brightest stripe."""
    if data_dir:
        from mep_hw.io import load_dataset

        ds = load_dataset("mnist", data_dir, limit_train=n, limit_test=1)
        return torch.as_tensor(ds.x_train).to(device), torch.as_tensor(ds.y_train).to(device)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.rand(n, 784, generator=g) * 0.3
    stripe = torch.arange(784) * 10 // 784  # ten horizontal stripes of the 28 × 28 image
    x += (stripe.unsqueeze(0) == y.unsqueeze(1)).float() * 0.7
    return x.to(device), y.to(device)


class SyncCounter:
    """Counts host synchronisations inside ``with``: warnings of torch's sync debug mode."""

    def __init__(self, device):
        self.on = torch.device(device).type == "cuda"
        self.count = 0
        self.sites: dict[str, int] = {}

    def __enter__(self):
        if self.on:
            torch.cuda.synchronize()
            self._w = warnings.catch_warnings(record=True)
            self._log = self._w.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.set_sync_debug_mode("default")
            self._w.__exit__(*exc)
            hits = [w for w in self._log if "synchroniz" in str(w.message).lower()]
            self.count = len(hits)
            # where: the Python line that made the host wait (file:line, the package's files only)
            for w in hits:
                site = f"{Path(w.filename).as_posix().split('mep_hw/')[-1]}:{w.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1
            torch.cuda.synchronize()
        return False


def _profiled_syncs(fn, device) -> int | None:
    """Synchronising CUDA runtime calls made by ``fn()`` (profiler cross-check)."""
    if torch.device(device).type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
    n = 0
    for e in prof.events():
        if e.name in names or ("Memcpy" in e.name and "DtoH" in e.name) or e.name == "cudaMemcpy":
            n += 1
    return n


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_device_step(cfg: TrainConfig, card_name: str, xs, ys, *, device: str) -> dict:
    """Time and host synchronisations per training step on device tiles of ``card_name``."""
    try:
        card = load_card(card_name, {"levels": 16} if card_name == "pcm" else None)
        model = build_model(cfg, 784, 10)
        model.use_store(build_store(card, list(model.weights), cfg.seed))
        trainer = EPTrainer(model, cfg, build_regime(model, cfg, 10 * len(xs)), xs[0][:1], ys[0][:1])
        gen = epoch_generator(cfg.seed, 1)
        trainer.step(xs[0], ys[0], gen)  # warm up
        _sync(device)
        with SyncCounter(device) as sc:
            t0 = time.perf_counter()
            for x, y in zip(xs[1:], ys[1:]):
                trainer.step(x, y, gen)
            _sync(device)
            t = time.perf_counter() - t0
        n = len(xs) - 1
        on_cuda = torch.device(device).type == "cuda"
        return {"device_card": card_name, "device_step_ms": 1e3 * t / n,
                "device_step_syncs": sc.count / n if on_cuda else None, "device_error": None,
                "device_step_sync_sites": {k: v / n for k, v in sorted(sc.sites.items(), key=lambda kv: -kv[1])} if on_cuda else None}
    except Exception as e:  # recorded: this is what the check is for
        return {"device_card": card_name, "device_step_ms": None, "device_step_syncs": None,
                "device_error": f"{type(e).__name__}: {e}"}


def measure(layers: str, batch: int, solver: str, check_every: int, *, device: str, data_dir: str | None,
            warmup: int, batches: int, card: str | None = None, poll: str = "async") -> dict:
    """Settle and EP-step figures for one configuration (see the module docstring)."""
    cfg = TrainConfig(layers=layers, batch_size=batch, solver=solver, torch_device=device)
    n = batch * (warmup + batches)
    x, y = _data(data_dir, n, device)
    model = build_model(cfg, 784, 10)
    params = model.param_list()
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=True)  # the training run's host optimizer
    ep = cfg.ep_config()
    kw = dict(throw=False, check_every=check_every, poll=poll == "async")
    xs = [x[i * batch : (i + 1) * batch] for i in range(warmup + batches)]
    ys = [one_hot(y[i * batch : (i + 1) * batch], 10, x.dtype) for i in range(warmup + batches)]
    for i in range(warmup):
        res = ep_gradients(model, xs[i], ys[i], ep, check=False)
        assign_grads(params, res.grads)
        opt.step()
    # the problems of the measured batches: the free phase and the stacked ±β nudged phase
    probs = []
    for i in range(warmup, warmup + batches):
        dyn = model.dynamics(xs[i], check=False)
        init = model.forward_init(dyn)
        free = settle(dyn, init, ep.free, **kw)
        col = torch.cat([xs[i].new_full((batch, 1), ep.beta), xs[i].new_full((batch, 1), -ep.beta)])
        probs.append((dyn, init, dyn.nudge(col, torch.cat([ys[i], ys[i]])), [torch.cat([s, s]) for s in free.states]))

    def settle_all():
        evals = 0
        for dyn, init, ndyn, ninit in probs:
            evals += settle(dyn, init, ep.free, **kw).nfev + settle(ndyn, ninit, ep.nudged, **kw).nfev
        return evals

    settle_all()  # warm caches (and kernels)
    _sync(device)
    with SyncCounter(device) as sc:
        t0 = time.perf_counter()
        evals = settle_all()
        _sync(device)
        t_settle = time.perf_counter() - t0
    prof_settle = _profiled_syncs(settle_all, device)

    def ep_steps():
        for i in range(warmup, warmup + batches):
            res = ep_gradients(model, xs[i], ys[i], ep, check=False)
            assign_grads(params, res.grads)
            opt.step()

    _sync(device)
    with SyncCounter(device) as se:
        t0 = time.perf_counter()
        ep_steps()
        _sync(device)
        t_ep = time.perf_counter() - t0
    prof_ep = _profiled_syncs(ep_steps, device)
    on_cuda = torch.device(device).type == "cuda"
    dev_row = {}
    if card:
        dev_row = measure_device_step(cfg, card, xs[warmup:], [y[i * batch : (i + 1) * batch]
                                                             for i in range(warmup, warmup + batches)], device=device)
    return {
        **dev_row,
        "layers": layers, "batch": batch, "solver": solver, "check_every": check_every, "poll": poll,
        "settle_loop_iterations": evals,
        "settle_ms_per_iteration": 1e3 * t_settle / evals,
        "settle_syncs_per_iteration": sc.count / evals if on_cuda else None,
        "settle_syncs_profiler": prof_settle,
        "ep_step_ms": 1e3 * t_ep / batches,
        "ep_step_syncs": se.count / batches if on_cuda else None,
        "ep_step_sync_sites": {k: v / batches for k, v in sorted(se.sites.items(), key=lambda kv: -kv[1])} if on_cuda else None,
        "settle_sync_sites": dict(sorted(sc.sites.items(), key=lambda kv: -kv[1])) if on_cuda else None,
        "ep_step_syncs_profiler": None if prof_ep is None else prof_ep / batches,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default; skipped without CUDA) or cpu (to check the script)")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files (default: synthetic images)")
    p.add_argument("--layers", nargs="+", default=list(NETS))
    p.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--solver", nargs="+", default=["euler", "block"])
    p.add_argument("--check-every", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--poll", nargs="+", default=["sync", "async"], choices=["sync", "async"],
                   help="how the settle reads its running count: waiting for it, or not")
    p.add_argument("--warmup", type=int, default=20, help="EP training steps before measuring")
    p.add_argument("--batches", type=int, default=10, help="batches measured")
    p.add_argument("--card", default="pcm", help="device card of the device step (pcm: 16 levels), or none")
    p.add_argument("--out", default="benchmarks/results/cuda_check.json")
    a = p.parse_args(argv)
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: the CUDA check was skipped (nothing written)")
        return 0
    rows = []
    for layers in a.layers:
        for batch in a.batch:
            for solver in a.solver:
                for i, (k, poll) in enumerate(itertools.product(a.check_every, a.poll)):
                    card = a.card if (a.card != "none" and i == 0) else None  # once per net, batch, solver
                    r = measure(layers, batch, solver, k, device=a.device, data_dir=a.data_dir,
                                warmup=a.warmup, batches=a.batches, card=card, poll=poll)
                    rows.append(r)
                    print(f"{layers} batch {batch} {solver} check_every {k} {poll}: settle {r['settle_ms_per_iteration']:.3f} ms "
                          f"and {r['settle_syncs_per_iteration']} syncs per iteration; EP step {r['ep_step_ms']:.2f} ms, "
                          f"{r['ep_step_syncs']} syncs"
                          + (f"; device step {r['device_step_ms']} ms, {r['device_step_syncs']} syncs, error {r['device_error']}"
                             if "device_card" in r else ""), flush=True)
    dev = {"device": a.device}
    if torch.device(a.device).type == "cuda":
        dev["name"] = torch.cuda.get_device_name()
    write_json(Path(a.out), {"benchmark": "cuda_check", "machine": {"platform": platform.platform(),
                                                                    "torch": torch.__version__, **dev},
                             "data": "mnist" if a.data_dir else "synthetic", "rows": rows})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
