"""The quantized-weight and int8-KV Triton kernels compile for sm_90 (no GPU needed): tests/compile_kernels.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tests.compile_kernels"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
