"""Which vector level the CPU kernels run at: detected once (bindings/_cpu.h), capped by the
environment variable RECSCORE_CPU, and overridable per thread with `use_cpu_level` (tests run
every kernel at every level the machine has).

Levels, lowest first: "baseline" (portable C the compiler vectorises), "avx2" (AVX2 + FMA +
F16C), "avx512" (AVX-512 F/BW/DQ/VL), "avx512_vnni" (with VNNI integer dot products). Every C
entry point checks its level against the CPU again, so no setting can run an instruction the
CPU lacks.
"""
import contextlib
import contextvars
import os
import platform
import sys

from ..bindings import _cpu
from ._backend import warn_once

LEVELS = ("baseline", "avx2", "avx512", "avx512_vnni")
DETECTED = _cpu.detected_level()
ENV_VARIABLE = "RECSCORE_CPU"


def _level_from_environment():
    value = os.environ.get(ENV_VARIABLE, "").strip().lower()
    if not value:
        return DETECTED
    if value not in LEVELS:
        raise ValueError(f"{ENV_VARIABLE}={value!r}: expected one of {', '.join(LEVELS)}")
    if LEVELS.index(value) > DETECTED:
        warn_once("cpu-cap", f"{ENV_VARIABLE}={value}: this CPU runs at most {LEVELS[DETECTED]}; using that")
        return DETECTED
    return LEVELS.index(value)


DEFAULT = _level_from_environment()
_forced_level = contextvars.ContextVar("recscore_cpu_level", default=None)


def kernel_threads():
    """The OpenMP threads a CPU kernel call may use: numba.get_num_threads() of the calling thread (the
    process-wide setting, which numba.set_num_threads changes per thread), without importing Numba
    for it (0.2-0.3 s at a first call): until something has imported it, no thread can have changed
    the count from its default, NUMBA_NUM_THREADS or the CPUs this process may run on."""
    numba = sys.modules.get("numba")
    if numba is not None:
        return numba.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(os.environ.get("NUMBA_NUM_THREADS", 0)) or usable


def cpu_level():
    """The level code (an index into LEVELS) the calling thread's kernels run at."""
    forced = _forced_level.get()
    level = DEFAULT if forced is None else forced
    if level == 0 and DETECTED == 0 and platform.machine().lower() in ("x86_64", "amd64"):
        warn_once("cpu-baseline", "this CPU has no AVX2 + FMA: the kernels run as portable C (slower)")
    return level


def supported_levels():
    """The names of the levels this CPU runs, lowest first."""
    return LEVELS[:DETECTED + 1]


@contextlib.contextmanager
def use_cpu_level(name):
    """Run the CPU kernels called inside the block, in this thread, at level `name`."""
    if name not in LEVELS:
        raise ValueError(f"CPU level must be one of {LEVELS}, got {name!r}")
    if LEVELS.index(name) > DETECTED:
        raise ValueError(f"CPU level {name!r} is not supported here: this CPU runs at most {LEVELS[DETECTED]!r}")
    token = _forced_level.set(LEVELS.index(name))
    try:
        yield
    finally:
        _forced_level.reset(token)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info():
    """What the kernels run on: CPU model, detected level, the RECSCORE_CPU cap and the level in use."""
    return {
        "model": _cpu_model(),
        "machine": platform.machine(),
        "detected": LEVELS[DETECTED],
        "cap": os.environ.get(ENV_VARIABLE) or None,
        "level": LEVELS[cpu_level()],
        "levels": list(supported_levels()),
        "cores": os.cpu_count(),
    }
