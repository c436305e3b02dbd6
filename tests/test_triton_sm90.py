"""The Triton kernels compiled for an H100 (sm_90) by Triton's own toolchain, with no GPU here:
every configuration the launchers reach compiles (the embedding lookup's without spilling
registers), the direct launch passes what Triton's launch passes, and its cache key is finer
than Triton's specialization.
Each check runs tests/sm90_checks.py in a fresh process without TRITON_INTERPRET."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

nvidia = pytest.importorskip("triton.backends.nvidia")
from recscore.kernels._triton_launch import FAST_LAUNCH_VERSIONS, _triton_version  # noqa: E402

TOOLS = [Path(nvidia.__file__).parent / "bin" / tool for tool in ("ptxas", "cuobjdump")]
pytestmark = pytest.mark.skipif(
    _triton_version() not in FAST_LAUNCH_VERSIONS or not all(tool.exists() for tool in TOOLS),
    reason="the stand-in driver follows Triton 3.6-3.9 and needs the wheel's ptxas and cuobjdump")


@pytest.mark.parametrize("check", ["embedding", "topk", "qmatmul", "launch-key"])
def test_sm90(check):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).with_name("sm90_checks.py")), check], env=env,
                              capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"sm90_checks.py {check} ran past 900 s:\n{timeout.stdout or ''}\n{timeout.stderr or ''}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
