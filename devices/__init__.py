"""Device cards shipped inside the wheel as package ``mep_hw.cards`` (see mep_hw.hw.cards)."""
