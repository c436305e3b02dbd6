"""CPU vector levels: detection, the RECSCORE_CPU cap, the per-thread override and its refusals."""
import os
import subprocess
import sys
import threading

import pytest

from recscore.kernels import cpu_info, use_cpu_level
from recscore.kernels._cpu import DETECTED, LEVELS, cpu_level, supported_levels


def test_cpu_info_names_the_cpu_and_its_levels():
    info = cpu_info()
    assert info["detected"] == LEVELS[DETECTED] and info["level"] in LEVELS
    assert info["levels"] == list(LEVELS[:DETECTED + 1]) and info["model"]


def test_detection_agrees_with_the_kernel_flags_linux_reports():
    if not os.path.exists("/proc/cpuinfo") or os.uname().machine != "x86_64":
        pytest.skip("needs Linux on x86-64")
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    has_avx2 = {"avx2", "fma", "f16c", "bmi2"} <= set(flags)
    has_avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(flags)
    expected = 0 if not has_avx2 else 1 if not has_avx512 else 3 if "avx512_vnni" in flags else 2
    assert DETECTED == expected


def test_use_cpu_level_is_per_thread_and_refuses_what_the_cpu_lacks():
    seen = {}
    with use_cpu_level("baseline"):
        assert cpu_level() == 0
        worker = threading.Thread(target=lambda: seen.setdefault("level", cpu_level()))
        worker.start()
        worker.join(timeout=10)
    assert seen["level"] == DETECTED or "RECSCORE_CPU" in os.environ
    with pytest.raises(ValueError, match="CPU level must be one of"):
        with use_cpu_level("sse9"):
            pass
    for name in LEVELS[DETECTED + 1:]:
        with pytest.raises(ValueError, match="not supported here"):
            with use_cpu_level(name):
                pass


def _level_in_subprocess(value):
    env = dict(os.environ, RECSCORE_CPU=value)
    return subprocess.run([sys.executable, "-c", "from recscore.kernels import cpu_info; print(cpu_info()['level'])"],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("name", LEVELS)
def test_recscore_cpu_caps_the_level(name):
    done = _level_in_subprocess(name)
    assert done.returncode == 0, done.stderr
    expected = name if name in supported_levels() else LEVELS[DETECTED]
    assert done.stdout.strip() == expected


def test_a_bad_recscore_cpu_is_a_clear_error():
    done = _level_in_subprocess("avx1024")
    assert done.returncode != 0 and "RECSCORE_CPU='avx1024'" in done.stderr
