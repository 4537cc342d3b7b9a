"""What the two paged-attention files share: the tile matrix product, the online-softmax step and the checks on
the KV cache layout.

Imported by those files only, never by `kernels/__init__`: triton decides between compiled and interpreted code
(TRITON_INTERPRET) when a jit function is defined, so `import kernels` alone must define none.
"""

import torch

from ._triton import tl, triton
from .kv_int8 import dequantize_kv


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        # TRITON_INTERPRET multiplies bf16 as raw uint16 bits; bf16 products are exact in fp32, so this is the
        # GPU's bf16 dot up to summation order.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _softmax_step(s, v, m, l, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax update (flash attention): scores s (rows, keys) in log2 units, already masked; the key
    tile's values v; running max m, running sum l and unnormalised output acc of each row. Returns acc, m, l."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
    return acc, m_new, l


@triton.jit
def _word_tile(words, c0, c1, c2, c3):
    """The (BLOCK_N, D) tile of codes from int32 words (BLOCK_N, D // 4), given code j of every word as cj."""
    codes = tl.join(tl.join(c0, c2), tl.join(c1, c3))  # (BLOCK_N, D // 4, 2, 2): code 2 * a + b at [a, b]
    return tl.reshape(codes, (words.shape[0], words.shape[1] * 4))


@triton.jit
def codes_f16(words):
    """An int8 cache tile read as int32 words of 4 codes, (BLOCK_N, D // 4), as exact fp16 (BLOCK_N, D), with no
    int -> float conversion (a quarter-rate instruction, which made an int8 cache's attention slower than bf16's):
    `prmt` puts two codes in the low bytes of two fp16 1024s (bits 0x64cc: the float 1024 + code) and one packed
    subtraction removes the 1024s. Converting whole words before the tensor-core layout change also keeps the
    compiler from reading the codes out of shared memory a byte at a time, which it does for a uint8 tile."""
    c0, c1, c2, c3 = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 lo, hi, magic;
        mov.b32 magic, 0x64006400;
        prmt.b32 lo, $4, 0x64646464, 0x4140;
        prmt.b32 hi, $4, 0x64646464, 0x4342;
        sub.rn.f16x2 lo, lo, magic;
        sub.rn.f16x2 hi, hi, magic;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r", args=[words], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
        is_pure=True, pack=1)
    return _word_tile(words, c0, c1, c2, c3)


@triton.jit
def codes_f32_biased(words):
    """An int8 cache tile read as int32 words of 4 codes, (BLOCK_N, D // 4), as fp32 (BLOCK_N, D) holding 2^23 +
    code, exactly: `prmt` puts each code in the low byte of the float 2^23 (0x4B000000), no int -> float conversion.
    `tl.fma(c, x, -2^23 * x)` then gives code * x rounded once."""
    c0, c1, c2, c3 = tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 magic;
        mov.b32 magic, 0x4B000000;
        prmt.b32 $0, $4, magic, 0x7540;
        prmt.b32 $1, $4, magic, 0x7541;
        prmt.b32 $2, $4, magic, 0x7542;
        prmt.b32 $3, $4, magic, 0x7543;
        }""",
        constraints="=r,=r,=r,=r,r", args=[words], dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True, pack=1)
    return _word_tile(words, c0, c1, c2, c3)


@triton.jit
def key_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cache_block,
             KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """(page, row) of keys n: each one's page id and the offset of its head's first element in a (blocks,
    PAGE_SIZE, KV_HEADS, HEAD_DIM) cache, dense below the block. Masked so no block-table entry past the sequence is
    read; page ids go int64 before the stride multiply."""
    page = tl.load(block_tables_ptr + b * stride_bt + n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    return page, page * stride_cache_block + (n % PAGE_SIZE) * (KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM


@triton.jit
def scale_offsets(page, n, kv_head, KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Offsets of keys n's (scale, zero) pairs in an int8 cache's (blocks, PAGE_SIZE, KV_HEADS, 2) scale_zero."""
    return page * (PAGE_SIZE * KV_HEADS * 2) + (n % PAGE_SIZE) * (KV_HEADS * 2) + kv_head * 2


@triton.jit
def _load_kv(cache_ptr, sz_ptr, kv_offs, sz_offs, kv_mask, n_mask, out_dtype, QUANT: tl.constexpr):
    """A (BLOCK_N, BLOCK_D) K or V tile; an int8 cache's codes dequantized with their (token, head) scale and zero
    (kernels/kv_int8.py) and rounded to the attention's dtype, as the twins dequantize."""
    x = tl.load(cache_ptr + kv_offs, mask=kv_mask, other=0)
    if QUANT:
        scale = tl.load(sz_ptr + sz_offs, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(sz_ptr + sz_offs + 1, mask=n_mask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * scale[:, None] + zero[:, None]).to(out_dtype)
    return x


def check_caches(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 quantized: bool = False) -> None:
    """q (..., Hq, D); caches (num_blocks, block_size, Hk, D), dense within a block, sharing strides and q's dtype
    (uint8 when `quantized`)."""
    Hq, D = q.shape[-2:]
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[3] != D or Hq % k_cache.shape[2]:
        raise ValueError(f"caches must be (blocks, block_size, Hk, {D}) with Hq % Hk == 0, got "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)} for q {tuple(q.shape)}")
    if not quantized and (k_cache.dtype != q.dtype or v_cache.dtype != q.dtype):
        raise ValueError(f"q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} must share a dtype")
    if q.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q and block_tables need a unit stride in their last dim")
    _, block_size, Hk, _ = k_cache.shape
    dense = (block_size * Hk * D, Hk * D, D, 1)
    if k_cache.stride()[1:] != dense[1:] or v_cache.stride() != k_cache.stride() or k_cache.stride(0) < dense[0]:
        raise ValueError(f"caches must be dense within a block and share strides, got {k_cache.stride()} and "
                         f"{v_cache.stride()}")


def sequence_kv(cache: torch.Tensor, scale_zero: torch.Tensor | None, ids: list[int], n: int, dtype) -> torch.Tensor:
    """One sequence's first n keys (or values), (n, Hk, D): a view when its blocks are consecutive (the usual case),
    else a gathered copy; an int8 cache's dequantized."""
    first = ids[0]
    if ids == list(range(first, first + len(ids))):
        x = cache[first:first + len(ids)]
        sz = None if scale_zero is None else scale_zero[first:first + len(ids)]
    else:
        index = torch.tensor(ids, device=cache.device)
        x, sz = cache[index], None if scale_zero is None else scale_zero[index]
    x = x.flatten(0, 1)[:n]
    return x if sz is None else dequantize_kv(x, sz.flatten(0, 1)[:n], dtype)
