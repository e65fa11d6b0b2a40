"""Device physics and periphery: ideal, resistive crossbars, optical MZI meshes, fixed-point
datapaths; device cards; tiles that hold a weight matrix and read it through a device; the weight
store, the one place a network's weights live, are read and are written."""

from mep_hw.hw.base import Device, IdealDevice, Tile, UpdateCounts
from mep_hw.hw.cards import KINDS, Card, card_names, list_cards, load_card, parse_sets, parse_value
from mep_hw.hw.crossbar import CrossbarDevice, neurosim_a
from mep_hw.hw.fixedpoint import FixedPointDevice
from mep_hw.hw.optical import OpticalMZI, clements_decompose, clements_reconstruct
from mep_hw.hw.noise import NoiseBank
from mep_hw.hw.periphery import Periphery, quantize
from mep_hw.hw.store import ExactOp, IdealStore, OpCounts, TileStore, WeightStore, build_store

__all__ = [
    "Card", "CrossbarDevice", "Device", "ExactOp", "FixedPointDevice", "IdealDevice", "IdealStore", "KINDS", "NoiseBank",
    "OpCounts", "OpticalMZI", "Periphery", "Tile", "TileStore", "WeightStore", "build_store", "clements_decompose",
    "clements_reconstruct",
    "UpdateCounts", "card_names", "list_cards", "load_card", "neurosim_a", "parse_sets", "parse_value", "quantize",
]
