"""The one place `kernels/` imports triton.

CPU-only torch wheels ship without triton. The kernel files take `triton` and `tl` from here so that they still
import there (their `*_torch` twins are the CPU path); calling a Triton launcher then raises a clear ImportError.
This is NOT where the Triton-or-twin choice is made: `kernels.load_ops(use_triton)` makes it, once.
"""

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

__all__ = ["HAS_TRITON", "triton", "tl"]
