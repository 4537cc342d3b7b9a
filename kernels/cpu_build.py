"""Building and loading the CPU's C kernels: kernels/cpu_ops.c and kernels/cpu_qgemv.c (with cpu_bf16.h), compiled
once per machine and source by the system C compiler into ~/.cache/visionchat/kernels and bound through ctypes.
Used by kernels/cpu_ops.py (the decode-step ops), cpu_qgemv.py (the int8-activation GEMV) and cpu_decoder.py (the
one-call decode step); None everywhere when no compiler is found or the build fails, and the twins run."""

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_ops.c")
QGEMV_SOURCE = Path(__file__).with_name("cpu_qgemv.c")  # compiled once, into the same library (kernels/cpu_qgemv.py)
HEADER = Path(__file__).with_name("cpu_bf16.h")  # included by both
CACHE = Path.home() / ".cache" / "visionchat" / "kernels"
FLAGS = ["-O3", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
# IEEE arithmetic: the activations' int8 codes must round as the twin's, near-ties included
QGEMV_FLAGS = ["-O3", "-fPIC", "-pthread"]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
P, I64, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # C argument types: pointers, int64 sizes and strides, float scalars
    "rms_norm": [P, I64, P, P, I64, I64, F32],
    "silu_mul": [P, I64, P, I64, I64],
    "rope_store_kv": [P, I64, I64, P, I64, I64, P, I64, I64, P, P, I64, P, P, P, P, P, I64, I64, I64, I64],
    "paged_decode": [P, I64, I64, P, P, P, P, I64, P, I64, P, P, I64, I64, I64, I64, I64, F32],
    "decode_layers": [P, I64, P, I64, I64, I64, I64, I64, I64, F32, P, P, I64, P, P, I64, P, I64, I64, F32, I64],
}
# x, stride_x, bf16, M, tiles, dm, bits, N, K, y, residual, threads (kernels/cpu_qgemv.c)
QGEMV_SIGNATURE = [P, I64, I64, I64, P, P, I64, I64, I64, P, P, I64]
# The C pool's thread count while `torch_on_one_thread` holds torch's at 1 (0: outside it, torch's own count).
_POOL_THREADS = contextvars.ContextVar("cpu_pool_threads", default=0)


def pool_threads() -> int:
    """Threads for the C kernels' own pool (kernels/cpu_qgemv.c): torch's thread count, the one it had outside
    `torch_on_one_thread` inside it."""
    return _POOL_THREADS.get() or torch.get_num_threads()


@cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch's CPU ops run on, when it is GNU's and already loaded (torch's own copy: RTLD_NOLOAD
    never loads another); else None."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):  # another runtime, or a platform without RTLD_NOLOAD
        return None


@contextlib.contextmanager
def torch_on_one_thread():
    """torch's own ops on one thread in this thread only (its OpenMP setting, `omp_set_num_threads`; torch's
    `set_num_threads` would also change the count other threads start with), while the C kernels' pool keeps
    torch's count. For a CPU decode step whose heavy work is all on that pool, which leaves torch only small ops (an
    embedding, logits to fp32, sampling): each of those would start an OpenMP region, after which torch's workers
    spin for milliseconds on the cores the pool needs. Without GNU OpenMP, nothing changes."""
    omp, outer = _openmp(), torch.get_num_threads()
    if omp is None or outer == 1:
        yield
        return
    token = _POOL_THREADS.set(outer)
    omp.omp_set_num_threads(1)
    try:
        yield
    finally:
        omp.omp_set_num_threads(outer)
        _POOL_THREADS.reset(token)


def _compile(cc: str, march: list[str], target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        objects = []
        for name, define in (("bf16", ["-DACT_BF16"]), ("f32", [])):
            obj = f"{tmp}/{name}.o"
            subprocess.run([cc, *FLAGS, *march, *define, "-c", str(SOURCE), "-o", obj], check=True,
                           capture_output=True, text=True)
            objects.append(obj)
        objects.append(f"{tmp}/qgemv.o")
        subprocess.run([cc, *QGEMV_FLAGS, *march, "-c", str(QGEMV_SOURCE), "-o", objects[-1]], check=True,
                       capture_output=True, text=True)
        out = f"{tmp}/lib.so"
        subprocess.run([cc, "-shared", *objects, "-o", out, "-lm", "-pthread"], check=True, capture_output=True,
                       text=True)
        partial = target.with_suffix(f".{os.getpid()}.partial")
        shutil.copyfile(out, partial)
        os.replace(partial, target)  # atomic: another process may be building the same library


@cache
def library() -> ctypes.CDLL | None:
    """The compiled ops, or None (no C compiler, or it failed: the twins run)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("no C compiler: the CPU runs the PyTorch twins of the decode ops")
        return None
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else platform.processor()
    sources = SOURCE.read_text() + QGEMV_SOURCE.read_text() + HEADER.read_text()
    key = hashlib.sha256("\n".join([sources, " ".join(FLAGS + QGEMV_FLAGS), cc, platform.machine(), cpu]).encode())
    target = CACHE / f"cpu_ops-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:  # -march=native: the library is built on, and for, this machine
            _compile(cc, ["-march=native"], target)
        except subprocess.CalledProcessError:
            try:
                _compile(cc, [], target)
            except subprocess.CalledProcessError as exc:
                log.warning("building %s failed, the CPU runs the PyTorch twins: %s", SOURCE.name, exc.stderr[-500:])
                return None
    lib = ctypes.CDLL(str(target))
    for name, args in SIGNATURES.items():
        for suffix in SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = args, None
    lib.qgemv.argtypes, lib.qgemv.restype = QGEMV_SIGNATURE, None
    lib.qgemv_available.argtypes, lib.qgemv_available.restype = [], ctypes.c_int
    return lib


@cache
def _functions() -> dict:
    """{(op name, activation dtype): C function}; empty without the library."""
    lib = library()
    return {} if lib is None else {(n, d): getattr(lib, f"{n}_{s}") for n in SIGNATURES for d, s in SUFFIX.items()}


def function(name: str, dtype: torch.dtype):
    """The C function `name` for activations of `dtype`, or None."""
    return _functions().get((name, dtype))
