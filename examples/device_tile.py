"""A weight matrix on a PCM crossbar: program, read, MVM, pulsed update, drift.

    python examples/device_tile.py

Loads the PCM card at 16 conductance levels (a 16-state programming grid; 15 nominal SET steps
across the range), programs a random 64×128 matrix, and prints what the
device holds against what was asked for, the noise of one MVM against the periphery's formula,
the pulses an update took and the drift after a day.
"""

import torch

from mep_hw.hw import NoiseBank, Tile, load_card

card = load_card("pcm", {"levels": 16})  # the same overrides as `mep-hw train --set levels=16`
W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 0.05
tile = Tile(card.device, card.periphery, W, seed=1, noise=NoiseBank(2))

held = tile.held()
print(f"programmed: rms error {float((held - W).pow(2).mean().sqrt()):.2e} (weights rms {float(W.pow(2).mean().sqrt()):.2e}), "
      f"w_scale {tile.w_scale:.3f} per unit of normalised weight")
g = tile.device.physical(tile.state)
print(f"conductances: G+ in [{float(g['g_plus'][0].min()):.2f}, {float(g['g_plus'][0].max()):.2f}] {g['g_plus'][1]}")

x = torch.rand(1000, 128, generator=torch.Generator().manual_seed(3))
y = tile.mvm(x)  # DAC → read (noise resampled) → ADC
exact = x @ held.T
err = float((y - exact).pow(2).mean().sqrt())
pred = tile.noise_rms_out(float(x.pow(2).mean().sqrt()), 128)
print(f"MVM error rms {err:.2e}; read + output + ADC noise predicted {pred:.2e}")

dW = torch.full_like(W, 0.03)  # about one conductance level (25 µS / 15 steps × w_scale / 25 µS)
achieved = tile.write(dW)  # whole SET pulses (soft bounds, cycle-to-cycle noise); the conductance stays continuous
print(f"update: asked +0.03 everywhere, achieved mean {float(achieved.mean()):+.4f}; totals {tile.totals}")

before = tile.held().clone()
tile.advance(86400.0)  # one day of drift
print(f"drift after 1 day: mean |W| falls by {100 * (1 - float(tile.held().abs().mean() / before.abs().mean())):.1f} %")
