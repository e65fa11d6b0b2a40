"""Quickstart: train an ordinary PyTorch MLP with equilibrium propagation, no .backward().

    python examples/quickstart.py [--epochs N]

The model's forward pass in training mode is EP's free phase; ``optimizer.step(target=y)`` runs
the nudged phases, writes the EP gradient into ``.grad`` and applies Muon updates. Runs on
scikit-learn's bundled digits in a few seconds.
"""

import argparse

import torch
from torch import nn

from mep_hw import load_dataset, smep


def main(epochs: int = 10) -> float:
    torch.manual_seed(0)
    ds = load_dataset("digits")
    x_train, y_train = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    x_test, y_test = torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test)

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = smep(model.parameters(), model=model, lr=0.05)

    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            model(x_train[idx])  # free phase: the forward pass
            loss = optimizer.step(target=y_train[idx])  # nudged phases, EP gradient, Muon step
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        steps = optimizer.last_result.nudged[0].steps.float().mean().item()
        print(f"epoch {epoch:2d}: loss {float(loss):.4f}  test accuracy {acc:.4f}  nudged settle steps {steps:.1f}")
    return acc


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    main(p.parse_args().epochs)
