"""Decode attention: one new query token per sequence against its paged KV cache.

q (B, Hq, D); the caches (num_blocks, block_size, Hk, D); `block_tables[b]` lists sequence b's blocks and
`seq_lens[b]` counts its keys, the current token's included (already stored). A padding row has seq_len 0 and gets
zeros. The Triton path is split-K "flash decoding": programs (sequence, KV head, key split) each reduce a slice of the
keys for all Hq/Hk query heads sharing that KV head, then a small kernel merges the splits; with one split the first
kernel writes the output itself. Sizes come from shapes only, so the launch is CUDA-graph capturable. An int8 cache
(`k_scale_zero` / `v_scale_zero`, kernels/kv_int8.py) is never dequantized element by element: each key's scale
and zero apply to its score (`q . (c s + z) = s (q . c) + z sum(q)`) and to its softmax weight (`sum p (c s + z) =
(p s) . c + sum p z`). With several query heads a KV head (grouped-query attention) the codes go to the tensor cores:
on the GPU read as int32 words and made fp16 by bit arithmetic (`codes_f16`; integers 0-255 are exact in fp16), so q
is scaled into [-1, 1] and rounded to fp16 (11 bits, more than bf16's 8), and p * scale likewise. With one (multi-head
attention: Llama-2, Vicuna, so LLaVA-1.5) a 16-row tensor-core tile would be 15/16 padding, and every per-key step
on it 16 times the work, so `_mha_int8_keys` runs on the CUDA cores in fp32: codes made 2^23 + code by `prmt`
(`codes_f32_biased`) and multiplied by one fused multiply-add each. Measured on an H200 (graph-timed kernel, 2k-token
context, D=128, 32 heads, 2026-12-01): batch 32 int8 242 us against bf16's 243 (the tensor-core path took 370),
batch 1 15.3 against 15.7 (was 23.8); `python -m bench.quant_sweep --attention`. Not here:
prefill or chunked prefill (`paged_prefill.py`), sliding windows, ALiBi, soft-capping.
"""

import torch
import torch.nn.functional as F

from ._paged import (_dot, _softmax_step, check_caches, codes_f16, codes_f32_biased, key_rows, scale_offsets,
                     sequence_kv)
from ._triton import triton, tl
from .kv_int8 import check_quantized

_LOG2E = 1.4426950408889634  # the kernels use exp2, so scores are pre-multiplied by log2(e)
# the kernel's path -> (keys per inner step, warps, pipeline stages): "float" the best of a sweep on an H100 (bf16,
# D=128); "int8" (tensor cores, grouped-query attention) and "int8_mha" (CUDA cores, one query head a KV head) on an
# H200 (`python -m bench.quant_sweep --attention`, 2026-12-01: at batch 1 with many splits the long steps win)
DECODE_TILES = {"float": (64, 4, 3), "int8": (64, 4, 2), "int8_mha": (64, 2, 2), "int8_mha_split": (128, 4, 2)}
_MIN_SPLIT_KEYS = 64  # below this a split's fixed cost (q load, partial write, merge) outweighs its work
_MAX_SPLITS = 64
_INTERPRETER_SMS = 4  # CPU tensors only run under TRITON_INTERPRET; any small number works


def paged_decode_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    B = q.shape[0]
    block_size = k_cache.shape[1]
    out = None if B == 1 else torch.zeros_like(q)  # padding rows (seq_len 0) stay zero
    # Host sync: the twin is the CPU path (where it costs nothing) and the test oracle, never inside a CUDA graph.
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        ids = block_tables[b, : (n + block_size - 1) // block_size].tolist()
        k = sequence_kv(k_cache, k_scale_zero, ids, n, q.dtype).transpose(0, 1)  # (Hk, n, D)
        v = sequence_kv(v_cache, v_scale_zero, ids, n, q.dtype).transpose(0, 1)
        # enable_gqa shares each KV head with its Hq/Hk query heads without materialising copies.
        o = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, scale=scale, enable_gqa=True)  # (Hq, 1, D)
        if out is None:  # batch-1 decode (the CPU's usual step): no output buffer to fill
            return o.transpose(0, 1)
        out[b] = o.squeeze(1)
    return torch.zeros_like(q) if out is None else out


@triton.jit
def _split_keys(seq_len, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr):
    # Each sequence spreads its OWN keys over the launch's splits, so a short row in a batch sized for the
    # longest (a CUDA graph's max_blocks) still keeps every split busy.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(per_split, MIN_SPLIT_KEYS)


@triton.jit
def _key_scales(k_sz_ptr, v_sz_ptr, page, n, n_mask, kv_head, KV_HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """An int8 cache's (k_scale, k_zero, v_scale, v_zero) of keys n, fp32 (kernels/kv_int8.py)."""
    sz_offs = scale_offsets(page, n, kv_head, KV_HEADS, PAGE_SIZE)
    k_scale = tl.load(k_sz_ptr + sz_offs, mask=n_mask, other=0.0).to(tl.float32)
    k_zero = tl.load(k_sz_ptr + sz_offs + 1, mask=n_mask, other=0.0).to(tl.float32)
    v_scale = tl.load(v_sz_ptr + sz_offs, mask=n_mask, other=0.0).to(tl.float32)
    v_zero = tl.load(v_sz_ptr + sz_offs + 1, mask=n_mask, other=0.0).to(tl.float32)
    return k_scale, k_zero, v_scale, v_zero


@triton.jit
def _word_offsets(row, n_mask, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(offsets, mask) of the keys' rows as int32 words of 4 codes (D and the strides are multiples of 4)."""
    dw = tl.arange(0, BLOCK_D // 4)
    return row[:, None] // 4 + dw[None, :], n_mask[:, None] & (dw < HEAD_DIM // 4)[None, :]


@triton.jit
def _mha_int8_keys(q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, b, kv_head, start, end,
                   scale_log2, stride_qb, stride_qh, stride_cache_block, stride_bt,
                   KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, WORD_CODES: tl.constexpr):
    """Multi-head attention (one query head a KV head) on an int8 cache, keys start..end: (acc (BLOCK_D,), m, l) of
    the online softmax, in fp32 on the CUDA cores. The tensor-core path's 16-row tiles would be 15/16 padding here,
    and every per-key step on them (scales, exponentials) 16 times the work. With WORD_CODES (GPU) each code is
    2^23 + code in fp32 (`codes_f32_biased`, no conversion instruction) and one fused multiply-add with -2^23 times
    its factor makes code * factor, rounded once; else (TRITON_INTERPRET) the codes are converted."""
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    qv = tl.load(q_ptr + b * stride_qb + kv_head * stride_qh + d, mask=d_mask, other=0.0).to(tl.float32)
    q_sum = tl.sum(qv, axis=0)
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        page, row = key_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cache_block,
                              KV_HEADS, HEAD_DIM, PAGE_SIZE)
        k_scale, k_zero, v_scale, v_zero = _key_scales(k_sz_ptr, v_sz_ptr, page, n, n_mask, kv_head, KV_HEADS,
                                                       PAGE_SIZE)
        if WORD_CODES:
            w_offs, w_mask = _word_offsets(row, n_mask, BLOCK_D, HEAD_DIM)
            k = codes_f32_biased(tl.load(k_cache_ptr.to(tl.pointer_type(tl.int32)) + w_offs, mask=w_mask, other=0))
            s = tl.sum(tl.fma(k, qv[None, :], (qv * -8388608.0)[None, :]), axis=1)
        else:
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0).to(tl.float32)
            s = tl.sum(k * qv[None, :], axis=1)
        s = (s * k_scale + q_sum * k_zero) * scale_log2  # q . (code * scale + zero), (BLOCK_N,)
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new)
        l = l * alpha + tl.sum(p, axis=0)
        pw = p * v_scale
        if WORD_CODES:
            v = codes_f32_biased(tl.load(v_cache_ptr.to(tl.pointer_type(tl.int32)) + w_offs, mask=w_mask, other=0))
            pv = tl.sum(tl.fma(v, pw[:, None], (pw * -8388608.0)[:, None]), axis=0)
        else:
            v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0).to(tl.float32)
            pv = tl.sum(v * pw[:, None], axis=0)
        acc = acc * alpha + pv + tl.sum(p * v_zero, axis=0)
        m = m_new
    return acc, m, l


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr,
    part_lse_ptr, scale_log2, num_splits, stride_qb, stride_qh, stride_cache_block, stride_bt,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr,
    WORD_CODES: tl.constexpr, MHA_INT8: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    keys_per_split = _split_keys(seq_len, num_splits, BLOCK_N, MIN_SPLIT_KEYS)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_len)  # <= start for splits past the sequence: no loop trips

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # (BLOCK_G,) query heads sharing this KV head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    if MHA_INT8:
        acc1, m1, l1 = _mha_int8_keys(q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, b, kv_head,
                                      start, end, scale_log2, stride_qb, stride_qh, stride_cache_block, stride_bt,
                                      KV_HEADS, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, WORD_CODES)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32) + acc1[None, :]  # row 0 is the head; the rest are masked
        m = tl.zeros([BLOCK_G], tl.float32) + m1
        l = tl.zeros([BLOCK_G], tl.float32) + l1
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

        q_sum = tl.sum(q.to(tl.float32), axis=1)  # (BLOCK_G,): an int8 key's zero times it is the zero's share
        # int8: the codes are multiplied in fp16 (exact there, and made without a conversion instruction), so q goes to
        # fp16 too, each head's row over its largest |q| (in [-1, 1]: no overflow, 11 bits kept), its max applied after.
        if WORD_CODES:
            q_max = tl.maximum(tl.max(tl.abs(q.to(tl.float32)), axis=1), 1e-30)
            q16 = (q.to(tl.float32) / q_max[:, None]).to(tl.float16)
        # Every trip has at least one live key, so m is finite after the first and -inf is a safe start.
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
            n_mask = n < end
            page, row = key_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cache_block,
                                  KV_HEADS, HEAD_DIM, PAGE_SIZE)
            kv_offs = row[:, None] + d[None, :]  # (BLOCK_N, BLOCK_D)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            if QUANT:  # int8: the codes on the tensor cores as they are, each key's scale and zero applied per key
                k_scale, k_zero, v_scale, v_zero = _key_scales(k_sz_ptr, v_sz_ptr, page, n, n_mask, kv_head,
                                                               KV_HEADS, PAGE_SIZE)
                if WORD_CODES:  # the tiles as int32 words
                    w_offs, w_mask = _word_offsets(row, n_mask, BLOCK_D, HEAD_DIM)
                    k = codes_f16(tl.load(k_cache_ptr.to(tl.pointer_type(tl.int32)) + w_offs, mask=w_mask, other=0))
                    v = codes_f16(tl.load(v_cache_ptr.to(tl.pointer_type(tl.int32)) + w_offs, mask=w_mask, other=0))
                    s = tl.dot(q16, tl.trans(k)) * q_max[:, None]
                else:  # fp32 (exact), or TRITON_INTERPRET (UPCAST_DOT: it mishandles half precision)
                    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0).to(tl.float32 if UPCAST_DOT else q.dtype)
                    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0).to(tl.float32 if UPCAST_DOT else q.dtype)
                    s = _dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION)
                s = (s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]) * scale_log2  # q . (code * scale + zero)
                s = tl.where(n_mask[None, :], s, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                alpha = tl.exp2(m - m_new)
                p = tl.exp2(s - m_new[:, None])
                l = l * alpha + tl.sum(p, axis=1)
                if WORD_CODES:  # p * scale over the tile's largest scale lies in [0, 1], where fp16 keeps 11 bits
                    v_max = tl.maximum(tl.max(v_scale, axis=0), 1e-30)
                    pv = tl.dot((p * (v_scale / v_max)[None, :]).to(tl.float16), v) * v_max
                else:
                    pv = _dot((p * v_scale[None, :]).to(q.dtype).to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
                acc = acc * alpha[:, None] + pv + tl.sum(p * v_zero[None, :], axis=1)[:, None]
                m = m_new
            else:
                k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
                s = _dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
                s = tl.where(n_mask[None, :], s, float("-inf"))
                v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
                acc, m, l = _softmax_step(s, v, m, l, acc, UPCAST_DOT, DOT_PRECISION)

    rows = b * (KV_HEADS * GROUP) + heads  # (BLOCK_G,) rows of out viewed as (B * Hq, D)
    out_mask = g_mask[:, None] & d_mask[None, :]
    l_safe = tl.where(l > 0, l, 1.0)  # a split past the row, or a seq_len 0 row: acc is 0, so write 0, not NaN
    if SPLIT:
        # Normalised partial + its log2-sum-exp, at (row, split); the merge reads only splits that hold keys.
        live = start < seq_len
        part = rows * num_splits + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l_safe[:, None], mask=out_mask & live)
        tl.store(part_lse_ptr + part, m + tl.log2(l_safe), mask=g_mask & live)
    else:
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + d[None, :],
                 (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_decode_merge_kernel(
    part_out_ptr, part_lse_ptr, seq_lens_ptr, out_ptr, num_splits,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = b * NUM_HEADS + tl.program_id(1)  # row of out viewed as (B * Hq, D)
    seq_len = tl.load(seq_lens_ptr + b)
    n_live = tl.cdiv(seq_len, _split_keys(seq_len, num_splits, BLOCK_N, MIN_SPLIT_KEYS))
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_live
    lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))  # (BLOCK_S,)
    lse_max = tl.where(n_live > 0, tl.max(lse, axis=0), 0.0)  # keeps exp2 finite for a seq_len 0 row
    w = tl.exp2(lse - lse_max)  # 0 for dead splits
    parts = tl.load(part_out_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                    mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)  # (BLOCK_S, BLOCK_D)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _check(q, k_cache, v_cache, block_tables, seq_lens, quantized):
    B = q.shape[0]
    check_caches(q, k_cache, v_cache, block_tables, quantized)
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(f"block_tables (B, max_blocks) and seq_lens (B,) for B={B}, got "
                         f"{tuple(block_tables.shape)}, {tuple(seq_lens.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if len({t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}) != 1:
        raise ValueError("all inputs must be on one device")


def _num_splits(batch: int, kv_heads: int, max_keys: int, device: torch.device) -> int:
    # Enough (sequence, KV head, split) programs to cover the GPU four times, but no more splits than the longest
    # possible row fills at the minimum split size. Shapes only: a CUDA graph replays any seq_lens.
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else _INTERPRETER_SMS
    want = triton.cdiv(4 * sms, batch * kv_heads)
    return max(min(want, _MAX_SPLITS, triton.cdiv(max_keys, _MIN_SPLIT_KEYS)), 1)


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    return paged_decode_tiled(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale_zero, v_scale_zero)


def paged_decode_tiled(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale_zero=None, v_scale_zero=None,
                       tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`paged_decode_attention_triton` with `tiles` (BLOCK_N, warps, stages) instead of DECODE_TILES' (for sweeps:
    bench/quant_sweep.py)."""
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    _check(q, k_cache, v_cache, block_tables, seq_lens, quantized)
    B, Hq, D = q.shape
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the kernel assumes it
    if B == 0:
        return out
    mha_int8 = quantized and Hq == Hk
    num_splits = _num_splits(B, Hk, block_tables.shape[1] * block_size, q.device)
    split = num_splits > 1
    path = ("int8_mha_split" if split else "int8_mha") if mha_int8 else "int8" if quantized else "float"
    block_n, warps, stages = tiles or DECODE_TILES[path]
    # int8 codes read as int32 words and made floats by bit arithmetic where they can be: a GPU, whole aligned
    # words, and for the tensor cores' fp16 a half-precision q
    word_codes = quantized and q.is_cuda and D % 4 == 0 and k_cache.stride(0) % 4 == 0 \
        and k_cache.data_ptr() % 4 == 0 and v_cache.data_ptr() % 4 == 0 and (mha_int8 or q.dtype != torch.float32)
    # Sized from shapes alone. Only splits holding keys are written and merged; with one split the first kernel
    # writes `out` itself and these stay untouched.
    part_out = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(D)
    _paged_decode_kernel[(B, Hk, num_splits)](
        q, k_cache, v_cache, k_scale_zero if quantized else k_cache, v_scale_zero if quantized else v_cache,
        block_tables, seq_lens, out, part_out, part_lse,
        scale * _LOG2E, num_splits, q.stride(0), q.stride(1), k_cache.stride(0), block_tables.stride(0),
        KV_HEADS=Hk, GROUP=Hq // Hk, BLOCK_G=max(16, triton.next_power_of_2(Hq // Hk)),  # tl.dot needs M >= 16
        HEAD_DIM=D, BLOCK_D=BLOCK_D, PAGE_SIZE=block_size, BLOCK_N=block_n, MIN_SPLIT_KEYS=_MIN_SPLIT_KEYS,
        SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 stays fp32: no silent TF32
        UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,  # CPU tensors mean TRITON_INTERPRET
        QUANT=quantized, WORD_CODES=word_codes, MHA_INT8=mha_int8,
        num_warps=warps, num_stages=stages,
    )
    if split:
        _paged_decode_merge_kernel[(B, Hq)](
            part_out, part_lse, seq_lens, out, num_splits,
            NUM_HEADS=Hq, HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_N=block_n, MIN_SPLIT_KEYS=_MIN_SPLIT_KEYS,
            num_warps=4,
        )
    return out
