"""Networks: weight sources, backbones, layer adapters, Keras import, the transfer model, BatchNorm folding, forward helpers."""
