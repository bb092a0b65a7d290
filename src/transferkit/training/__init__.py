"""Training: the entry point, the two-phase recipe and its trainer, presets and the search, the frozen-prefix cache, calibration, torchrun, experiment logs."""
