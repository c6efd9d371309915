"""Progress reporting: a callable ``progress(items, label)`` that yields ``items``.

The library calls it around each long loop with a label that names the stage ("capturing
activations", "measuring treatments", ...); :func:`no_progress` is the silent default and the
CLI gives a tqdm bar (elapsed time and rate, and a remaining time only once it can be
estimated from finished items).
"""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

__all__ = ["no_progress", "bar"]


def no_progress(items: Iterable, label: str | None = None) -> Iterable:
    return items


def bar(items: Iterable, label: str | None = None) -> Iterator:
    """A progress bar on stderr (only on a terminal, and only for more than one item)."""
    items = list(items)
    if len(items) < 2 or not sys.stderr.isatty():
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=label or "working", file=sys.stderr, leave=False, unit="step", mininterval=0.5,
                    dynamic_ncols=True)
