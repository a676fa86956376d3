"""What every command line of the package shares: one-line errors with exit status 2, defaults in --help, checked
option values."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2) and whose --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, error_line(self.prog, message))


def error_line(prog: str, message: str) -> str:
    """Every command's one error format: `<prog> <command>: error: <option>: <what> (see ... --help)`, for argparse's
    own errors ("argument --steps: ...") and for the checks that run after parsing alike."""
    return f"{prog}: error: {message.removeprefix('argument ')} (see {prog} --help)\n"


def positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative_float(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not f >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return f


def int_list(v: str) -> list[int]:
    try:
        return [int(p) for p in v.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None


def writable_file(v: str) -> Path | None:
    """A file path whose directory exists and is writable ('' for none), checked before any work is done."""
    if v == "":
        return None
    p = Path(v).expanduser()
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"directory {str(parent)!r} is not writable")
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{v!r} is a directory, expected a file name")
    return p


def cache_dir(*parts: str) -> Path:
    """~/.cache/dpm_kernels/<parts> (XDG_CACHE_HOME respected): where outputs go unless asked elsewhere, so that
    running a command in a checkout leaves it clean."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "dpm_kernels", *parts)
