"""Host memory settings for XLA on CPU: keep its big temporary buffers from being page-faulted
in again at every call.

XLA:CPU allocates a program's temporaries (hundreds of MB for a GRPO update) with `malloc` at
each execution and frees them at its end. glibc serves allocations that large with a fresh
`mmap` and returns them with `munmap`, so every call touches new pages: measured on the
benchmark's update program (3.2M-parameter model, 64 x 48 tokens), 77,600 minor page faults and
~130 ms of kernel time per call, a third of its wall time (docs/benchmarks.md).

Two remedies (`GRPO_JAX_MALLOC`: `auto`, the default, `keep`, or `off`):

- `configure()` with `GRPO_JAX_MALLOC=auto` (the default) restarts the process (`os.execve`,
  same arguments) with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: glibc then asks for transparent
  huge pages for its mappings (2 MiB pages: 512x fewer faults, fewer TLB misses). Tunables are
  read only at process start, hence the restart; it happens before JAX is imported and costs
  ~0.1 s. The `grpo-jax` command and the benchmark scripts call it first.
- With `GRPO_JAX_MALLOC=keep`, or with `auto` where a restart is not possible (JAX already
  imported, no THP, not glibc), `retain_freed_memory()` uses `mallopt` so that freed memory stays in
  the process (one arena, no `mmap` for large blocks, no trimming): no faults after the first
  call, at the price of not returning freed memory to the system.

A third setting lowers the peak memory rather than the faults: compiling a big program (the GRPO
update: ~500 MB of compiler memory for the 3.2M-parameter benchmark model) leaves hundreds of MB
freed but still mapped in glibc's heaps, and the program's first run then stacks its temporaries
on top. `trim_after_compiles()` registers a JAX monitoring listener that calls `malloc_trim(0)`
after every compilation longer than `TRIM_AFTER_COMPILE_S`, returning that memory to the system
(measured: 892 -> 576 MiB resident). `grpo-jax` registers it unless `GRPO_JAX_MALLOC=off`.

Nothing here changes any computed value.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

ENV = "GRPO_JAX_MALLOC"  # "auto" (default: restart with the tunable) | "keep" (mallopt) | "off"
TUNABLE = "glibc.malloc.hugetlb=1"
_MARK = "GRPO_JAX_MALLOC_APPLIED"  # set in the restarted process
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _glibc_version() -> tuple[int, int] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def _thp_available() -> bool:
    try:
        with open(_THP) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def tunables_env(env: dict[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None when the tunable is not wanted or not usable:
    not Linux with glibc >= 2.35 (the first with `glibc.malloc.hugetlb`), no transparent huge
    pages, a `glibc.malloc.*` tunable already chosen by the user, or already restarted."""
    mode = env.get(ENV, "auto")
    if mode not in ("auto", "keep", "off"):
        raise ValueError(f"{ENV}={mode!r}: expected auto, keep or off")
    if mode != "auto" or env.get(_MARK) or not sys.platform.startswith("linux"):
        return None
    version = _glibc_version()
    if version is None or version < (2, 35) or not _thp_available():
        return None
    current = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(x for x in (current, TUNABLE) if x), _MARK: "1"}


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only); True if applied. Call it before JAX
    starts its threads: the one-arena setting applies to threads created afterwards."""
    if _glibc_version() is None:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(p, v) == 1 for p, v in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))


TRIM_AFTER_COMPILE_S = 0.5  # shorter compilations leave little garbage; trimming costs ~ms
# jax._src.dispatch.BACKEND_COMPILE_EVENT, recorded after every XLA compilation
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_trim_listener = None


def trim() -> bool:
    """Return the free memory of glibc's heaps to the system (`malloc_trim(0)`); True if done."""
    if _glibc_version() is None:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def trim_after_compiles() -> bool:
    """Call `trim()` after each XLA compilation that took longer than `TRIM_AFTER_COMPILE_S`
    (a `jax.monitoring` listener, registered once). Imports JAX; False where glibc is absent
    or `GRPO_JAX_MALLOC=off`."""
    global _trim_listener
    if _glibc_version() is None or os.environ.get(ENV, "auto") == "off":
        return False
    if _trim_listener is None:
        from jax import monitoring

        def listener(name, duration_s, **_):
            if name == COMPILE_EVENT and duration_s >= TRIM_AFTER_COMPILE_S:
                trim()

        monitoring.register_event_duration_secs_listener(listener)
        _trim_listener = listener
    return True


def configure() -> str:
    """Apply the best available setting (see the module docstring); returns what was done:
    "hugetlb" (this process was restarted with the tunable), "retain", or "none". The restart
    happens only while JAX is not imported yet; otherwise the in-process setting is used."""
    env = dict(os.environ)
    if env.get(_MARK):
        return "hugetlb"
    if env.get(ENV, "auto") == "off":
        return "none"
    new_env = tunables_env(env)
    if new_env is not None and "jax" not in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        argv = [sys.executable, *sys.orig_argv[1:]]
        try:
            os.execve(sys.executable, argv, new_env)
        except OSError:
            pass  # fall through to the in-process setting
    return "retain" if retain_freed_memory() else "none"
