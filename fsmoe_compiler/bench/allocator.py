"""Which malloc the bench's ranks run with, and the environment that selects it.

Every method of a run shares one process per rank, so how that process's
malloc reuses freed memory decides which method pays page faults. On CUDA the
caching allocator keeps freed blocks for reuse; on CPU the ranks get the same
from jemalloc with its purging turned off (``"jemalloc"``, preloaded). glibc
told to keep freed memory (``"glibc-keep"``: no trimming, blocks up to 32 MiB
from the heap) comes close, but its heap fragments when dropless layers change
their tensor sizes every step: the heap then grows at its top, and whichever
method's step lands there faults in fresh pages (measured: 2,000-6,000 minor
faults, +30-60 ms per step, on one rank, for a different model instance from
run to run, among instances running the same graph). ``"glibc"`` leaves glibc
at its defaults (activations of a few MiB are unmapped when they die).
``"auto"`` is jemalloc where it is installed, else glibc-keep.
"""

from __future__ import annotations

import glob
import os

MALLOCS = ("auto", "jemalloc", "glibc-keep", "glibc")

#: jemalloc never hands dirty or muzzy pages back to the kernel: freed memory is reused as it is.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
#: glibc (mallopt(3)): blocks up to 32 MiB (its ceiling) from the heap, never trimmed, grown 256 MiB at a time.
GLIBC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
              "MALLOC_TOP_PAD_": str(256 << 20)}
_JEMALLOC_GLOBS = ("/usr/lib/*/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2",
                   "/usr/local/lib/libjemalloc.so.2")
INSTALL_HINT = "apt-get install libjemalloc2 (Debian/Ubuntu) or dnf install jemalloc"


def find_jemalloc() -> str | None:
    """The path of the jemalloc shared library, or None where it is not installed."""
    for pattern in _JEMALLOC_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _jemalloc_path() -> str:
    path = find_jemalloc()
    if path is None:
        raise ValueError(f"--malloc jemalloc: libjemalloc.so.2 not found ({INSTALL_HINT}); "
                         f"or pick one of {', '.join(m for m in MALLOCS if m != 'jemalloc')}")
    return path


def resolve(choice: str) -> tuple[str, str | None]:
    """``choice`` made concrete: ``("jemalloc" | "glibc-keep" | "glibc", note)``; the note says why ``"auto"``
    did not get jemalloc. ValueError for an unknown choice, or ``"jemalloc"`` where it is not installed."""
    if choice not in MALLOCS:
        raise ValueError(f"--malloc must be one of {', '.join(MALLOCS)}, got {choice!r}")
    if choice == "jemalloc":
        _jemalloc_path()
    if choice != "auto":
        return choice, None
    if find_jemalloc() is not None:
        return "jemalloc", None
    return "glibc-keep", (f"malloc: jemalloc not installed ({INSTALL_HINT}); the ranks' glibc keeps freed memory, "
                          "but its heap can fragment and one method then pays page faults at random")


def env_for(choice: str, base: dict[str, str]) -> dict[str, str]:
    """The variables that give a rank process started with environment ``base`` the malloc ``choice``
    (``resolve``d first)."""
    malloc = resolve(choice)[0]
    if malloc == "jemalloc":
        preload = " ".join(filter(None, [_jemalloc_path(), base.get("LD_PRELOAD", "")]))
        return {"LD_PRELOAD": preload, "MALLOC_CONF": JEMALLOC_CONF}
    return dict(GLIBC_KEEP) if malloc == "glibc-keep" else {}


def in_use() -> str:
    """The malloc this process runs: "jemalloc" when its library is mapped, else "glibc" (with this process's
    MALLOC_* settings, if any)."""
    try:
        with open("/proc/self/maps") as f:
            if "libjemalloc" in f.read():
                return "jemalloc"
    except OSError:
        pass
    return "glibc-keep" if all(os.environ.get(k) == v for k, v in GLIBC_KEEP.items()) else "glibc"
