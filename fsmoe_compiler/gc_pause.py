"""``gc_paused``: no cyclic garbage collection while a compile phase allocates many short-lived objects.

Chunking, task graphs and copies of FX graphs create tens of thousands of
nodes and dicts; the generational collector then runs over and over on a heap
that holds the whole traced model, for nothing, since these phases leave little
cyclic garbage. Reference counting still frees everything as usual.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector inside the block; restore its previous state on exit (also on error)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
