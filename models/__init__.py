"""DFlash model layer: target and draft models, the speculative decode loop, loading, training."""
