"""Quieting a library's logger for the duration of a call."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_logger(name: str | None = None) -> Iterator[None]:
    """Only errors from one logger (the root logger for None) for the duration of a call; its level
    is the caller's again afterwards."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
