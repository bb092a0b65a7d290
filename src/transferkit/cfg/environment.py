"""Environment variables that transferkit itself sets and reads."""

LAUNCHED = "TRANSFERKIT_LAUNCHED"  # set for the ranks that `train --nproc` starts: the launcher reports their errors
