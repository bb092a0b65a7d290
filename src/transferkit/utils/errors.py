"""The one family of user errors. Each is a `ValueError` (as scikit-learn's `NotFittedError`):
a mistake in the data, the settings, a file or a run folder, with a one-line message that names
the thing and the problem. The CLI prints exactly these as one-line errors; anything else is a bug
and keeps its traceback."""

from __future__ import annotations


class TransferkitError(ValueError):
    """A user error: the message names the input and what is wrong with it."""


class ConfigError(TransferkitError):
    """A setting has a value it cannot take: the message names the setting, what it must be and
    what it got."""


class DataError(TransferkitError):
    """The data cannot be used; raised before any training starts where that is possible."""


class ImageError(TransferkitError):
    """One file cannot be read as an image; the message is the reason (the caller names the file).
    `kind`: "format" (not an image, or a format not allowed), "size" (too many pixels) or
    "unreadable"."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


class BackboneError(TransferkitError):
    """A backbone or its weights cannot be used; the message says why and what is available."""


class RunError(TransferkitError):
    """A run folder (or exported file) is missing or does not hold a usable model."""


class ExportError(TransferkitError):
    """An export cannot be written as asked."""


class ApiError(TransferkitError):
    """A request to one of the web apps that cannot be answered: an HTTP status and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM at a step boundary; its folder is left `interrupted` and
    resumable. A KeyboardInterrupt, so that Python code sees what Ctrl-C always gives."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them
