"""The one place `kernels/` imports triton.

CPU-only torch wheels ship without triton. The kernel files take `triton` and `tl` from here so that they still
import there (their `*_torch` twins are the CPU path); calling a Triton launcher then raises a clear ImportError.
This is NOT where the Triton-or-twin choice is made: `kernels.load_ops(use_triton)` makes it, once.

Also here: programmatic dependent launch (`dependent_launches`, `dependent_launch`), which the decode step's small
kernels share: the GEMVs, RMSNorm, SiLU and the rotary + KV store. Measured end to end on an H200 (Llama-2-7B, batch
1): w4a16 379 -> 401 tokens/s, bf16 242 -> 247. Not used by the dequantize-GEMM (batch 32: 5,325 -> 5,021 with it)
nor the decode attention (the int8 cache's cost at a 2k context rose from 3.9% to 7.1% of w4a16 batch 1 with it).
"""

import functools

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    class _Unavailable:
        """Any triton name when triton is missing: fine to define a kernel with, raises when used."""

        def __init__(self, name: str):
            self._name = name

        def __call__(self, *args, **kwargs):
            raise ImportError(f"{self._name} needs triton, which is not installed; use the *_torch twin")

        __getitem__ = __call__  # kernel[grid](...)

        def __getattr__(self, attr: str):
            return _Unavailable(f"{self._name}.{attr}")

    class _MissingTriton:
        @staticmethod
        def jit(fn):
            return _Unavailable(fn.__name__)

        def __getattr__(self, attr: str):
            return _Unavailable(f"triton.{attr}")

    class _MissingLanguage:
        constexpr = None  # only read by kernel signatures, as an annotation

    triton = _MissingTriton()
    tl = _MissingLanguage()

if HAS_TRITON:
    try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        _HAS_GDC = True
    except ImportError:
        _HAS_GDC = False

    @triton.jit
    def dependent_launch(PDL: tl.constexpr):
        """First thing in a kernel launched with `launch_pdl=dependent_launches(x)`: lets the next kernel be
        scheduled once all of this one's programs have started (its programs then wait here, in the SMs' free
        slots), then waits until the kernel before this one has finished and its writes are visible. Nothing may
        be read from an earlier kernel, or written, before this; weights, which no kernel writes, may be."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

    @triton.jit
    def dependents_early(TRIGGER: tl.constexpr):
        """In a kernel launched without programmatic dependent launch (it waits for nothing): lets the next kernel,
        launched with it, be scheduled once all of this one's programs have started, instead of once they end."""
        if TRIGGER:
            gdc_launch_dependents()
else:
    _HAS_GDC = False
    dependent_launch = triton.jit(lambda PDL: None)
    dependents_early = triton.jit(lambda TRIGGER: None)


@functools.cache
def _device_dependent_launches(index: int) -> bool:
    return _HAS_GDC and torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9  # NVIDIA


def dependent_launches(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with programmatic dependent launch (Hopper and later): a kernel's
    programs start while the one before it finishes and wait in `dependent_launch`, which hides the launch gap
    between a decode step's ~200 small kernels (CUDA graphs keep the dependency)."""
    return t.is_cuda and _device_dependent_launches(t.device.index if t.device.index is not None
                                                    else torch.cuda.current_device())


__all__ = ["HAS_TRITON", "triton", "tl", "dependent_launch", "dependent_launches", "dependents_early"]
