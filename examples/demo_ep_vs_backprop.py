"""EP vs backprop on the same MLP and data: gradients, accuracy and time.

    python examples/demo_ep_vs_backprop.py [--epochs N] [--plot FILE.png]

1. On one batch, the EP gradient (symmetric nudging, β → 0) against autograd's gradient of the
   same loss: their cosine similarity and relative difference.
2. The same MLP trained from the same initial weights with SMEP (EP + Muon), with Muon on
   backprop gradients, and with Adam: test accuracy and seconds per epoch.
Runs on scikit-learn's bundled digits in well under a minute.
"""

import argparse
import copy
import time

import torch
from torch import nn

from mep_hw import EPGradient, FeedforwardEnergy, load_dataset, muon_backprop, smep


def gradient_agreement(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    bp = torch.cat([p.grad.flatten() for p in model.parameters()])
    rows = []
    for beta in (0.5, 0.1, 0.01):
        EPGradient(beta=beta, settle_tol=1e-7, settle_steps=100).compute(FeedforwardEnergy(model), x, y)
        ep = torch.cat([p.grad.flatten() for p in model.parameters()])
        rows.append((beta, float(ep @ bp / (ep.norm() * bp.norm())), float((ep - bp).norm() / bp.norm())))
    return rows


def train(name, model, data, epochs):
    x_train, y_train, x_test, y_test = data
    if name == "smep":
        opt = smep(model.parameters(), model=model, lr=0.05)
    elif name == "muon_backprop":
        opt = muon_backprop(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    curve, t0 = [], time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=torch.Generator().manual_seed(len(curve))).split(64):
            opt.zero_grad()
            if name == "smep":
                model(x_train[idx])
                opt.step(target=y_train[idx])
            else:
                nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            curve.append((model(x_test).argmax(1) == y_test).float().mean().item())
    return curve, (time.perf_counter() - t0) / epochs


def main(epochs: int = 15, plot: str | None = None):
    torch.manual_seed(0)
    ds = load_dataset("digits")
    data = tuple(torch.as_tensor(a) for a in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))
    model0 = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    print("EP gradient vs autograd on one batch of 128:")
    for beta, cos, rel in gradient_agreement(copy.deepcopy(model0), data[0][:128], data[1][:128]):
        print(f"  beta={beta:<5g} cosine {cos:.6f}  relative difference {rel:.2e}")

    curves = {}
    for name in ("smep", "muon_backprop", "adam"):
        curve, sec = train(name, copy.deepcopy(model0), data, epochs)
        curves[name] = curve
        print(f"{name:14s} final test accuracy {curve[-1]:.4f}  best {max(curve):.4f}  {sec:.2f} s/epoch")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for name, c in curves.items():
            plt.plot(range(1, len(c) + 1), [100 * a for a in c], marker="o", label=name)
        plt.xlabel("epoch")
        plt.ylabel("test accuracy on digits (%)")
        plt.legend()
        plt.grid(alpha=0.3)
        plt.title("Same MLP, same start: EP (smep) vs backprop")
        plt.savefig(plot, dpi=110)
        print(f"wrote {plot}")
    return curves


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    main(a.epochs, a.plot)
