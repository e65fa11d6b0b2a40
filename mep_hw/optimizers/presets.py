"""Preset optimizers: configurations (data), not subclasses (DESIGN §4.10). Every keyword of
:class:`SMEPOptimizer` / :class:`SDMEPOptimizer` can override a preset's choice, e.g.
``smep(params, model=m, settle='local')`` for the local settle. ``local_ep`` is the only preset
whose settle is local; the others use the backprop-equivalent Newton settle."""

from __future__ import annotations

from mep_hw.optimizers.smep import SDMEPOptimizer, SMEPOptimizer

__all__ = ["PRESETS", "smep", "sdmep", "local_ep", "natural_ep", "muon_backprop"]

PRESETS = {
    "smep": dict(mode="ep", use_spectral_constraint=True, gamma="auto"),
    "sdmep": dict(mode="ep", use_spectral_constraint=True, gamma="auto"),
    "local_ep": dict(mode="ep", gradient="local", settle="local", use_spectral_constraint=True, gamma="auto"),
    "natural_ep": dict(mode="ep", use_natural_gradient=True, matrix_update="momentum", momentum=0.9, lr=0.02, natural_damping=1.0),
    "muon_backprop": dict(mode="backprop"),
}


def smep(params, model=None, **kw) -> SMEPOptimizer:
    """Spectral Muon EP: EP gradients, Muon updates, and each layer's σ_max held at the largest
    bound that guarantees the nudged settle converges (``gamma='auto'``)."""
    return SMEPOptimizer(params, model=model, **{**PRESETS["smep"], **kw})


def sdmep(params, model=None, **kw) -> SDMEPOptimizer:
    """Spectral Dion-Muon EP: as :func:`smep` with Dion low-rank updates for large matrices."""
    return SDMEPOptimizer(params, model=model, **{**PRESETS["sdmep"], **kw})


def local_ep(params, model=None, **kw) -> SMEPOptimizer:
    """Truly local EP: the nudged phases relax along the local flow (``settle='local'``: each
    layer driven by its own error and its upper neighbour's, no backward sweep) and each layer's
    update comes from its own pre- and post-synaptic states (``gradient='local'``); Muon and
    the spectral constraint as :func:`smep`. ``settle='newton'`` restores the fast
    backprop-equivalent settle."""
    return SMEPOptimizer(params, model=model, **{**PRESETS["local_ep"], **kw})


def natural_ep(params, model=None, **kw) -> SMEPOptimizer:
    """EP with input-side Fisher whitening and heavy-ball momentum."""
    return SMEPOptimizer(params, model=model, **{**PRESETS["natural_ep"], **kw})


def muon_backprop(params, **kw) -> SMEPOptimizer:
    """Backprop gradients (``loss.backward()``) with Muon updates: a drop-in for SGD/Adam."""
    return SMEPOptimizer(params, **{**PRESETS["muon_backprop"], **kw})
