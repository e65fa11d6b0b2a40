"""User-facing jobs above the training loop: sweeps over device and run settings, comparison reports."""
