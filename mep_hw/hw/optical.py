"""Optical MZI meshes: W = U Σ V† with U and V rectangular meshes of Mach–Zehnder
interferometers (Clements et al., Optica 3, 1460 (2016)) and Σ a column of attenuators.

An MZI on modes (m, m+1) acts as T(θ, φ) = [[e^{iφ} cos θ, −sin θ], [e^{iφ} sin θ, cos θ]]. Any
N×N unitary is a product of N(N−1)/2 of them and a diagonal of phases D:
:func:`clements_decompose` nulls the lower triangle alternately from the right (columns) and
the left (rows), then moves the left MZIs through D with T(θ, φ)⁻¹ D = D' T(θ, φ') (φ' = π +
arg d_m − arg d_{m+1}, d'_m = −e^{−iφ} d_{m+1}); :func:`clements_reconstruct` multiplies them
back (float64 error < 1e-10).

The device (:class:`OpticalMZI`) maps a weight matrix by its spectral norm, w̃ = W / (headroom ·
σ_max), so every singular value of w̃ is ≤ 1 and Σ̃ is passive (attenuators: gains ≤ 1, σ_max(w̃)
≤ 1 holds by physics; the tile's scale is the global electronic gain). Matrices larger than
``mesh_size`` are cut into blocks, each with its own U Σ V† (a tiled accelerator; the passivity
bound then holds per block).

What the mesh realises. Every phase shifter holds a *physical* phase: the internal shifter of
an MZI 2θ ∈ [0, π], the external one φ wrapped to [0, 2π), the output phase screen D of each
mesh wrapped to [0, 2π), and the attenuator of Σ (an MZI) 2·arccos σ ∈ [0, π]. Phases are
rounded to ``phase_bits`` over [0, 2π), get static setting noise N(0, ``phase_noise_rad``) at
every program, and thermal crosstalk: a heater warms its neighbours in the same mesh column
(MZIs on modes m ± 2) by ``crosstalk`` × its own physical phase. Meshes are calibrated (the
crosstalk matrix is measured and the heater settings pre-compensated), so only the fraction
``crosstalk_residual`` of the coupling remains: Δφ_k = crosstalk · crosstalk_residual ·
Σ_neighbours φ_j (Milanizadeh et al., J. Lightwave Technol. 37, 1325 (2019) cancel thermal
crosstalk by such a calibration). Insertion loss ``insertion_loss_dB`` per MZI (a path crosses
≈ N MZIs of an N-mode rectangular mesh, field transmission T = 10^(−N·IL/20) per mesh) lowers
the signal against the detector noise; the global gain is calibrated for the nominal loss.

Detection is coherent (balanced homodyne against a local oscillator, reading the real part of
the field): the shot noise is that of the strong local oscillator, independent of the signal
(Hamerly et al., Phys. Rev. X 9, 021032 (2019)), and thermal (TIA) noise adds to it; both are
given as std referred to a full-scale output at the detector (``shot_noise``,
``det_thermal_noise``) and grow by 1/T² in std through the two meshes (:meth:`output_noise_var`).

Holding power: a thermo-optic shifter draws P = P_π · φ/π to hold phase φ (``p_pi_W``, the
power of a π shift), so a programmed mesh draws Σ P_π φ_k/π while it computes
(:meth:`static_power_W`); setting the shifters at a program costs the card's ``e_pulse_J`` per
phase setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from mep_hw.errors import ConfigError
from mep_hw.hw.base import Device, UpdateCounts

__all__ = ["OpticalMZI", "MZIState", "clements_decompose", "clements_reconstruct", "mesh_schedule", "physical_phases"]

DETECTIONS = ("coherent",)
TWO_PI = 2 * math.pi


def physical_phases(mesh: "Mesh") -> tuple[Tensor, Tensor, Tensor]:
    """The phases the heaters of a mesh hold: internal 2θ ∈ [0, π], external φ and the output
    phase screen arg(D) wrapped to [0, 2π)."""
    def wrap(v: Tensor) -> Tensor:
        w = torch.remainder(v, TWO_PI)
        return torch.where(w > TWO_PI - 1e-12, torch.zeros_like(w), w)  # −0 must not read as a full turn

    return 2 * mesh.theta, wrap(mesh.phi), wrap(torch.angle(mesh.diag))


class Mesh(NamedTuple):
    modes: Tensor  # (K,) int: the upper mode m of each MZI, in application order
    theta: Tensor  # (nb, K)
    phi: Tensor  # (nb, K)
    diag: Tensor  # (nb, N) complex output phases


def _rot_cols(U: Tensor, m: int, theta: Tensor, phi: Tensor) -> Tensor:
    """U ← U T(θ, φ)⁻¹ on columns (m, m+1), batched."""
    c, s = torch.cos(theta), torch.sin(theta)
    e = torch.exp(-1j * phi)
    a, b = U[:, :, m].clone(), U[:, :, m + 1].clone()
    U[:, :, m] = a * (e * c)[:, None] - b * s[:, None]
    U[:, :, m + 1] = a * (e * s)[:, None] + b * c[:, None]
    return U


def _rot_rows(U: Tensor, m: int, theta: Tensor, phi: Tensor) -> Tensor:
    """U ← T(θ, φ) U on rows (m, m+1), batched."""
    c, s = torch.cos(theta), torch.sin(theta)
    e = torch.exp(1j * phi)
    a, b = U[:, m, :].clone(), U[:, m + 1, :].clone()
    U[:, m, :] = (e * c)[:, None] * a - s[:, None] * b
    U[:, m + 1, :] = (e * s)[:, None] * a + c[:, None] * b
    return U


def clements_decompose(U: Tensor) -> Mesh:
    """Decompose a batch of unitaries (nb, N, N) into rectangular MZI meshes (Clements 2016)."""
    U = U.to(torch.complex128).clone()
    nb, N, _ = U.shape
    right, left = [], []
    for i in range(N - 1):
        if i % 2 == 0:
            for j in range(i + 1):
                x, m = N - 1 - j, i - j  # null U[x, m] with columns (m, m+1)
                a, b = U[:, x, m], U[:, x, m + 1]
                theta = torch.atan2(a.abs(), b.abs())
                phi = torch.angle(a) - torch.angle(b)
                U = _rot_cols(U, m, theta, phi)
                right.append((m, theta, phi))
        else:
            for j in range(1, i + 2):
                x, y = N + j - i - 2, j - 1  # null U[x, y] with rows (x−1, x)
                m = x - 1
                a, b = U[:, m, y], U[:, m + 1, y]
                theta = torch.atan2(b.abs(), a.abs())
                phi = torch.angle(b) - torch.angle(a) + math.pi
                U = _rot_rows(U, m, theta, phi)
                left.append((m, theta, phi))
    d = torch.diagonal(U, dim1=1, dim2=2).clone()
    moved = []
    for m, theta, phi in reversed(left):  # T(θ, φ)⁻¹ D = D' T(θ, φ')
        d1, d2 = d[:, m].clone(), d[:, m + 1].clone()
        phi_new = math.pi + torch.angle(d1) - torch.angle(d2)
        d[:, m] = -torch.exp(-1j * phi) * d2
        moved.append((m, theta, phi_new))
    seq = right + moved
    modes = torch.tensor([m for m, _, _ in seq], dtype=torch.int64)
    theta = torch.stack([t for _, t, _ in seq], dim=1) if seq else torch.zeros(nb, 0, dtype=torch.float64)
    phi = torch.stack([p for _, _, p in seq], dim=1) if seq else torch.zeros(nb, 0, dtype=torch.float64)
    return Mesh(modes, theta, phi, d)


def clements_reconstruct(mesh: Mesh, N: int) -> Tensor:
    """The unitary (nb, N, N) a mesh realises: D · T_K ⋯ T_1."""
    nb = mesh.theta.shape[0]
    M = torch.eye(N, dtype=torch.complex128).expand(nb, N, N).clone()
    for k, m in enumerate(mesh.modes.tolist()):
        M = _rot_rows(M, m, mesh.theta[:, k], mesh.phi[:, k])
    return mesh.diag[:, :, None] * M


@lru_cache(maxsize=32)
def mesh_schedule(N: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Columns of the N-mode rectangular mesh, and each MZI's neighbours in its column (MZIs on
    modes m ± 2), by as-soon-as-possible scheduling of the decomposition's order."""
    U = torch.eye(N, dtype=torch.complex128)[None]
    modes = clements_decompose(U).modes.tolist()
    last = [-1] * N
    cols = []
    for m in modes:
        c = max(last[m], last[m + 1]) + 1
        last[m] = last[m + 1] = c
        cols.append(c)
    where = {(c, m): k for k, (c, m) in enumerate(zip(cols, modes))}
    neigh = tuple(tuple(where[(c, mm)] for mm in (m - 2, m + 2) if (c, mm) in where) for c, m in zip(cols, modes))
    return tuple(cols), neigh


class MZIState(NamedTuple):
    u_mesh: Mesh  # left meshes, one per block
    v_mesh: Mesh  # right meshes (of V†)
    sigma: Tensor  # (nb, k) attenuator transmissions ≤ 1
    realized: Tensor  # (out, in) the normalised matrix the meshes realise (real part)


@dataclass(frozen=True, kw_only=True)
class OpticalMZI(Device):
    kind: ClassVar[str] = "optical_mzi"
    name: str = "optical_mzi"
    mesh_size: int = 16
    phase_bits: int = 0  # 0: continuous phase shifters
    phase_noise_rad: float = 0.0
    crosstalk: float = 0.0  # thermal coupling to the neighbouring shifters of a mesh column
    crosstalk_residual: float = 1.0  # fraction of the coupling left after calibration (1: uncalibrated)
    insertion_loss_dB: float = 0.0
    detection: str = "coherent"
    det_thermal_noise: float = 0.0  # detector (TIA) thermal noise std, full-scale output units
    shot_noise: float = 0.0  # local-oscillator shot noise std, full-scale output units
    p_pi_W: float = 0.0  # thermo-optic power for a π phase shift (holding power per shifter)
    t_step_s: float = 1e-3

    def __post_init__(self):
        if isinstance(self.mesh_size, bool) or not isinstance(self.mesh_size, int) or not 2 <= self.mesh_size <= 256:
            raise ConfigError(f"mesh_size={self.mesh_size!r} is out of range: expected an integer in [2, 256]")
        if isinstance(self.phase_bits, bool) or not isinstance(self.phase_bits, int) or not (self.phase_bits == 0 or 2 <= self.phase_bits <= 24):
            raise ConfigError(f"phase_bits={self.phase_bits!r} is out of range: expected 0 (continuous) or an integer in [2, 24]")
        for name, hi in (("phase_noise_rad", math.pi), ("crosstalk", 0.5), ("crosstalk_residual", 1.0), ("insertion_loss_dB", 3.0),
                         ("det_thermal_noise", 10.0), ("shot_noise", 10.0), ("p_pi_W", 10.0), ("t_step_s", 1e6)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
                raise ConfigError(f"{name}={v!r} is out of range: expected a number in [0, {hi}]")
        if self.detection not in DETECTIONS:
            raise ConfigError(f"detection={self.detection!r} is not valid; choose one of: {', '.join(DETECTIONS)} "
                              "(the mesh computes signed fields: direct detection would read |y|²)")

    def scale_of(self, W: Tensor) -> float:
        return float(torch.linalg.matrix_norm(W.double(), 2))

    # ------------------------------------------------------------------ blocks
    def _blocks(self, shape):
        out_n, in_n = shape
        k = self.mesh_size
        return math.ceil(out_n / k), math.ceil(in_n / k)

    def _split(self, w: Tensor) -> Tensor:
        k = self.mesh_size
        br, bc = self._blocks(w.shape)
        pad = torch.zeros(br * k, bc * k, dtype=torch.float64, device=w.device)
        pad[: w.shape[0], : w.shape[1]] = w.double()
        return pad.reshape(br, k, bc, k).permute(0, 2, 1, 3).reshape(br * bc, k, k)

    def _join(self, blocks: Tensor, shape) -> Tensor:
        k = self.mesh_size
        br, bc = self._blocks(shape)
        return blocks.reshape(br, bc, k, k).permute(0, 2, 1, 3).reshape(br * k, bc * k)[: shape[0], : shape[1]]

    # ------------------------------------------------------------------ realisation
    def _realise(self, mesh: Mesh, N: int, generator) -> Tensor:
        """The unitary the heaters realise: physical phases quantised, with setting noise and the
        calibrated residual of thermal crosstalk (module docstring)."""
        two_theta, phi, out = physical_phases(mesh)
        if self.phase_bits:
            q = TWO_PI / 2**self.phase_bits
            two_theta, phi, out = (torch.round(v / q) * q for v in (two_theta, phi, out))
        if self.phase_noise_rad:
            two_theta, phi, out = (v + self.phase_noise_rad * torch.randn(v.shape, generator=generator, dtype=torch.float64,
                                                                  device=generator.device).to(v.device)
                                   for v in (two_theta, phi, out))
        c = self.crosstalk * self.crosstalk_residual
        if c and two_theta.shape[1]:
            _, neigh = mesh_schedule(N)
            dt, dp = torch.zeros_like(two_theta), torch.zeros_like(phi)
            for kk, nb_ in enumerate(neigh):  # internal heaters warm internal ones, external external
                for j in nb_:
                    dt[:, kk] += c * two_theta[:, j]
                    dp[:, kk] += c * phi[:, j]
            two_theta, phi = two_theta + dt, phi + dp
        diag = mesh.diag.abs() * torch.exp(1j * out)
        return clements_reconstruct(Mesh(mesh.modes, 0.5 * two_theta, phi, diag), N)

    def _loss(self, N: int) -> float:
        return 10.0 ** (-N * self.insertion_loss_dB / 20.0)

    def init_state(self, shape, generator, dtype, device) -> MZIState:
        return self.program(None, torch.zeros(shape, dtype=dtype, device=device), generator)

    def program(self, state, w: Tensor, generator) -> MZIState:
        blocks = self._split(w)
        U, S, Vh = torch.linalg.svd(blocks)
        S = S.clamp(max=1.0)  # passive attenuators
        N = self.mesh_size
        um, vm = clements_decompose(U.to(torch.complex128)), clements_decompose(Vh.to(torch.complex128))
        Ur, Vr = self._realise(um, N, generator), self._realise(vm, N, generator)
        real = (Ur * S.to(torch.complex128)[:, None, :]) @ Vr
        realized = self._join(real.real, w.shape).to(w.dtype).to(w.device)
        return MZIState(um, vm, S, realized)

    def mean(self, state: MZIState) -> Tensor:
        return state.realized

    def phase_settings_per_block(self) -> int:
        """Heaters set when a block is programmed: θ and φ of the N(N−1)/2 MZIs of both meshes,
        the N output phases of both meshes, and the N attenuators."""
        N = self.mesh_size
        return 2 * N * (N - 1) + 2 * N + N

    def update(self, state: MZIState, dw: Tensor, generator):
        """Re-program the mesh to hold the new weights. Every block whose weights change has all its
        heaters set again (:meth:`phase_settings_per_block`), counted as ``pulses_up`` (one
        programming event per setting, the unit of the card's ``e_pulse_J``)."""
        target = self.mean(state) + dw
        new = self.program(state, target, generator)
        changed = int((dw != 0).any(dim=1).sum()) if dw.numel() else 0
        blocks = int((self._split(dw) != 0).flatten(1).any(dim=1).sum()) if dw.numel() else 0
        return new, UpdateCounts(blocks * self.phase_settings_per_block(), 0, 0, changed)

    def output_noise_var(self, y: Tensor) -> Tensor | None:
        """Coherent detection: local-oscillator shot noise and thermal noise, both independent of
        the signal, referred back through the two meshes' field transmission T² (T = 10^(−N·IL/20)
        per mesh): variance (shot² + thermal²)/T⁴ per output."""
        if self.det_thermal_noise == 0 and self.shot_noise == 0:
            return None
        t4 = self._loss(self.mesh_size) ** 4
        return torch.full_like(y, (self.shot_noise**2 + self.det_thermal_noise**2) / t4)

    def static_power_W(self, state: MZIState) -> float:
        """Holding power of every thermo-optic heater, P_π·φ/π summed over the physical phases of
        both meshes of every block and the attenuators (2·arccos σ)."""
        if not self.p_pi_W or state is None:
            return 0.0
        total = 0.0
        for mesh in (state.u_mesh, state.v_mesh):
            for ph in physical_phases(mesh):
                total += float(ph.sum())
        total += float((2 * torch.arccos(state.sigma.clamp(0.0, 1.0))).sum())
        return self.p_pi_W * total / math.pi

    def physical(self, state: MZIState) -> dict[str, tuple[Tensor, str]]:
        return {
            "theta_U": (state.u_mesh.theta, "rad"), "phi_U": (state.u_mesh.phi, "rad"),
            "theta_V": (state.v_mesh.theta, "rad"), "phi_V": (state.v_mesh.phi, "rad"),
            "attenuation": (state.sigma, "1"),
        }
