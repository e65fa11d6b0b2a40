"""Hardware-faithful EP: the weights of a layered Hopfield network held by device tiles.

The settle reads every weight matrix through its tile at every step (read noise resampled, DAC
and ADC applied); the biases live on the digital host. The host optimizer computes the intended
change of each weight from the EP estimate; the tile applies it as the device does (pulses,
quantised, asymmetric, noisy) and the host keeps target − achieved (error feedback) for the next
step. The model's weight tensors always mirror what the devices hold (their noise-free mean), so
the host, the spectral constraint and checkpoints see the truth.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mep_hw.host import coupled_spectral_norm
from mep_hw.hw import Card, NoiseBank, Tile
from mep_hw.model import LayeredHopfield

__all__ = ["HardwareNetwork"]


class HardwareNetwork:
    def __init__(self, model: LayeredHopfield, card: Card, seed: int):
        self.card = card
        dtype = model.weights[0].dtype
        self.noise = NoiseBank(seed * 7919 + 17, dtype=dtype, device=model.weights[0].device)
        self.tiles = [
            Tile(card.device, card.periphery, w.detach(), seed=seed * 1000 + k + 1, noise=self.noise, name=f"W{k}")
            for k, w in enumerate(model.weights)
        ]
        self.residual = [torch.zeros_like(w) for w in model.weights]
        self.t_step_s = float(getattr(card.device, "t_step_s", 0.0))
        self.sync(model)

    @torch.no_grad()
    def sync(self, model: LayeredHopfield) -> None:
        """Model weights ← what the tiles hold."""
        for w, t in zip(model.weights, self.tiles):
            w.copy_(t.held())

    def dynamics_kw(self) -> dict:
        return {"ops": self.tiles, "noise_floor": self.noise_floor()}

    def noise_floor(self) -> float:
        """rms (per state component) of the noise of one field evaluation: the read, output and
        ADC noise of the arrays feeding each layer, for inputs of rms 0.5 (states in [0, 1])."""
        tiles = self.tiles
        n_states = len(tiles)  # mse: a state per weight; ce: one fewer (the readout also feeds the last state)
        var, count = 0.0, 0
        for l, t in enumerate(tiles):
            out_l = t.shape[0]
            v = t.noise_rms_out(0.5, t.shape[1]) ** 2
            if l + 1 < n_states:  # the transpose read from the layer above
                up = tiles[l + 1]
                v += up.noise_rms_out(0.5, up.shape[0]) ** 2
            var += v * out_l
            count += out_l
        return math.sqrt(var / max(count, 1))

    @torch.no_grad()
    def write(self, model: LayeredHopfield, before: list[Tensor]) -> None:
        """The host optimizer moved the weights from ``before``; write that change (plus the
        carried residual) through the devices and put what they hold back into the model."""
        for k, (w, t) in enumerate(zip(model.weights, self.tiles)):
            intended = (w - before[k]) + self.residual[k]
            achieved = t.write(intended, seconds=self.t_step_s)
            self.residual[k] = intended - achieved
            w.copy_(t.held())

    @torch.no_grad()
    def constrain(self, model: LayeredHopfield, gamma: float, state: dict) -> float:
        """Bound the coupling operator of what the devices hold by γ (DESIGN §3): measure σ on
        the held state-to-state weights; if above γ, write the scaled weights through the
        devices. Returns σ measured before."""
        chain = list(range(1, model.n_states))
        if not chain:
            return 0.0
        est = coupled_spectral_norm([self.tiles[k].held() for k in chain], state.get("coupled_v"))
        state["coupled_v"] = est.vectors
        if est.sigma > gamma:
            for k in chain:
                t = self.tiles[k]
                t.write(t.held() * (gamma / est.sigma - 1.0))
            self.sync(model)
        return est.sigma

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tiles:
            for k, v in (*t.totals.items(), *t.energy_totals().items()):  # energies: one sync per call
                out[k] = out.get(k, 0) + v
        return out

    def per_layer(self) -> list[dict]:
        return [{"layer": t.name, "shape": list(t.shape), "w_scale": t.w_scale, **t.totals} for t in self.tiles]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "tiles": [
                {"state": {k: v for k, v in t.state._asdict().items()}, "gen": t.gen.get_state(),
                 "totals": dict(t.totals), "energy": dict(t.energy), "w_scale": t.w_scale}
                for t in self.tiles
            ],
            "noise_rng": self.noise.get_state(),
            "residual": self.residual,
        }

    def load_state_dict(self, d: dict, model: LayeredHopfield) -> None:
        for t, s in zip(self.tiles, d["tiles"]):
            t.state = type(t.state)(**s["state"])
            t.gen.set_state(s["gen"])
            t.totals = {**dict.fromkeys(t.totals, 0), **s["totals"]}
            t.energy = {**dict.fromkeys(t.energy, 0.0), **s.get("energy", {})}
            t.w_scale = float(s["w_scale"])
            t._changed()
        self.noise.set_state(d["noise_rng"])
        self.residual = list(d["residual"])
        self.sync(model)
