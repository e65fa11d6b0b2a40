"""The figure every device paper shows: conductance vs pulse number, potentiation then depression,
for a few devices of an array and the cycle-to-cycle spread, from a card's pulse model (and its
measured points, for a table card). Matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mep_hw.errors import ConfigError
from mep_hw.hw.cards import Card, read_table_csv
from mep_hw.hw.crossbar import CrossbarDevice

__all__ = ["plot_pulse_response"]


def plot_pulse_response(card: Card, out: str | Path, *, n_devices: int = 1000, shown: int = 4, seed: int = 0,
                        measured_csv: str | None = None) -> dict:
    """Write a PNG of the card's pulse response to ``out``; returns the numbers drawn (mean and
    std of G after each pulse over ``n_devices`` devices, in µS)."""
    dev = card.device
    if not isinstance(dev, CrossbarDevice):
        raise ConfigError(f"card {card.name!r} is a {card.kind} device: it has no pulse response to plot "
                          "(crossbar cards have one; see `mep-hw devices list`)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = dev.pulse_response(n_devices=n_devices, seed=seed)
    g = r.g.double()
    k = torch.arange(g.shape[0])
    mean, std = g.mean(1), g.std(1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.fill_between(k.numpy(), (mean - std).numpy(), (mean + std).numpy(), color="tab:blue", alpha=0.2,
                    label=f"mean ± 1 std over {n_devices} devices")
    ax.plot(k.numpy(), mean.numpy(), color="tab:blue", lw=2, label="mean")
    quiet = dataclasses.replace(dev, dw_ctoc=0.0, dw_dtod=0.0, g_dtod=0.0, up_down_dtod=0.0, stuck_on_rate=0.0, stuck_off_rate=0.0)
    nominal = quiet.pulse_response(n_devices=1, n_up=r.n_up, n_down=r.n_down).g[:, 0].double()
    ax.plot(k.numpy(), nominal.numpy(), color="k", lw=1.2, ls="--", label="nominal device, no noise")
    for d in range(min(shown, g.shape[1])):
        ax.plot(k.numpy(), g[:, d].numpy(), lw=0.8, alpha=0.8, label="single devices" if d == 0 else None)
    if measured_csv is not None:
        pts = read_table_csv(measured_csv)
        for (c, direction), (xs, gs) in sorted(pts.items()):
            x = torch.tensor(xs) + (r.n_up if direction == "down" else 0)
            ax.scatter(x.numpy(), gs, s=9, color="k", zorder=5, label="measured" if (c, direction) == min(pts) else None)
    if r.n_down:
        ax.axvline(r.n_up, color="0.5", lw=0.8, ls="--")
    c2c = f"c2c {dev.dw_ctoc:g} ({dev.c2c_model})" if dev.dw_ctoc else "no c2c noise"
    ax.set_title(f"{card.name}: {dev.response} response, {c2c}", fontsize=10)
    ax.set_xlabel("pulse number (potentiation" + (", then depression)" if r.n_down else ")"))
    ax.set_ylabel("conductance (µS)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return {"card": card.name, "n_up": r.n_up, "n_down": r.n_down, "n_devices": n_devices,
            "mean_uS": mean.tolist(), "std_uS": std.tolist(), "nominal_uS": nominal.tolist(), "png": str(out)}
