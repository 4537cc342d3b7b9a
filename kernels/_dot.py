"""The matrix product shared by the attention kernels (`paged_decode`, `paged_prefill`).

Imported by those files only, never by `kernels/__init__`: triton decides between compiled and interpreted code
(TRITON_INTERPRET) when a jit function is defined, so `import kernels` alone must define none.
"""

from ._triton import tl, triton


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        # TRITON_INTERPRET multiplies bf16 as raw uint16 bits; bf16 products are exact in fp32, so this is the
        # GPU's bf16 dot up to summation order.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c
