"""A dependency-free progress bar for the torch-free tools (synth, cache, predictor)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "", min_total: int = 50) -> Iterator[T]:
    """Yield ``items`` while drawing a one-line bar on stderr (only on a terminal, only for long work)."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    show = sys.stderr.isatty() and (total is None or total >= min_total)
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if show and (now - last > 0.1 or done == total):
            last = now
            rate = done / max(now - start, 1e-9)
            if total:
                filled = int(30 * done / total)
                eta = (total - done) / rate if rate else 0.0
                line = f"\r{desc} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {rate:.0f}/s eta {eta:.0f}s"
            else:
                line = f"\r{desc} {done} {rate:.0f}/s"
            sys.stderr.write(line)
            sys.stderr.flush()
    if show and done:
        sys.stderr.write("\n")
