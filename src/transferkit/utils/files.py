"""Safe file I/O shared by every writer: content hashes and atomic writes (a temporary name in the
same folder, then a rename), so that a killed process never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's content, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; renamed onto `target` when the block ends
    without an exception, removed otherwise."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> Path:
    """`target.write_text(text)`, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_bytes(target: str | Path, data: bytes) -> Path:
    """`target.write_bytes(data)`, atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def head(source, n: int) -> bytes:
    """The first `n` bytes of a path or a binary file object (whose position is left as it was);
    b"" when it cannot be read."""
    try:
        if hasattr(source, "read"):
            position = source.tell()
            data = source.read(n)
            source.seek(position)
            return data
        with open(source, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""
