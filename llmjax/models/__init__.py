"""Models: one Transformer (decoder or encoder by config) and its presets."""
