"""The multiview model: specs and presets, cameras, row-wise MV attention, loading and saving."""
