"""The digital host: pure tensor math for updates (Muon, Dion, Adam, whitening) and spectral
norms. It sees tensors only: never a device, the settle or a model."""

from mep_hw.host.linalg import (
    NS5_COEFFICIENTS,
    SpectralEstimate,
    as_matrix,
    coupled_spectral_norm,
    newton_schulz5,
    ns5_max,
    ns5_scalar_map,
    spectral_norm,
)
from mep_hw.host.updates import adam_direction, dion_direction, dion_scale, muon_direction, muon_scale, whiten

__all__ = [
    "NS5_COEFFICIENTS", "SpectralEstimate", "adam_direction", "as_matrix", "coupled_spectral_norm",
    "dion_direction", "dion_scale", "muon_direction", "muon_scale", "newton_schulz5", "ns5_max", "ns5_scalar_map",
    "spectral_norm", "whiten",
]
