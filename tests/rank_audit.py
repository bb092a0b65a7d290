"""`python -m transferkit ARGS` as a torchrun rank, recording every path this process opens for
writing, creates, renames or removes (Python's audit events, which also see the files that C
libraries write through Python's `open`/`os` calls) in $AUDIT_DIR/rank-$RANK.txt when it exits."""

import atexit
import os
import runpy
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
written: set[str] = set()


def path_of(value) -> str | None:
    return None if isinstance(value, int) or value is None else os.path.abspath(os.fsdecode(value))


def hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            written.add(path_of(path))
    elif event == "os.rename":
        written.update({path_of(args[0]), path_of(args[1])})
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate", "os.symlink", "os.link"):
        if event in ("os.truncate", "os.symlink", "os.link") or args[-1] is None:  # not inside a tree (dir_fd)
            written.add(path_of(args[0]))


def dump() -> None:
    lines = sorted(p for p in written if p)
    with open(os.path.join(os.environ["AUDIT_DIR"], f"rank-{os.environ['RANK']}.txt"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


atexit.register(dump)
sys.addaudithook(hook)
sys.argv = ["transferkit", *sys.argv[1:]]
runpy.run_module("transferkit", run_name="__main__")
