"""Shared utilities every wing may use: the error family, atomic file writes, progress, threads and signals."""
