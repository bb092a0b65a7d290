"""Beyond the known classes: out-of-distribution scores, conformal prediction sets and anomaly scores, fitted on the frozen features a run already has."""
