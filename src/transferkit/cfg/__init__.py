"""The settings: every training setting declared once (TrainConfig), with its rule, default and help."""
