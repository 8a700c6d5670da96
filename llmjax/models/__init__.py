"""Models: the Transformer (decoder or encoder by config), the encoder-decoder, ResNets and a
small CNN, and their presets."""
