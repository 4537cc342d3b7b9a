"""Prefill attention over the paged KV cache: plain, prefix-cached and chunked prefill in one kernel.

q (T, Hq, D) packs the new tokens of B sequences (`cu_seqlens_q`); `seq_lens[b]` counts all of sequence b's keys,
and the new tokens' K/V are already in the cache. Query i of sequence b sits at absolute position
`seq_lens[b] - q_len_b + i` and attends causally to keys [0, that position]. The Triton path is flash attention
(online softmax) with a tile of BLOCK_M rows = BLOCK_Q tokens x the Hq/Hk query heads of one KV head, so each K/V
tile read through the block table serves the whole group. An int8 cache (`k_scale_zero` / `v_scale_zero`,
kernels/kv_int8.py) is dequantized tile by tile as it is read. Not here: single-token decode (`paged_decode.py`),
sliding windows, ALiBi, soft-capping, non-causal (vision) attention.
"""

import torch
import torch.nn.functional as F

from ._paged import _dot, _load_kv, _softmax_step, check_caches, key_rows, scale_offsets, sequence_kv
from ._triton import triton, tl
from .kv_int8 import check_quantized

_LOG2E = 1.4426950408889634  # the kernel uses exp2, so scores are pre-multiplied by log2(e)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed by "is fp32", the best of a sweep on an H100 at D=128
# (bf16: 640-2048 token prompts, GQA 1 and 4). fp32 tiles are smaller: bigger ones spill registers.
_PREFILL_TILES = {False: (64, 64, 4, 2), True: (32, 32, 4, 3)}


def paged_prefill_attention_torch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, max_seqlen_q: int, scale: float,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)  # rows past cu_seqlens_q[-1] stay unwritten, as in the Triton path
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()  # host sync: the twin is the CPU path and test oracle
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        if q_end == q_start:
            continue
        ids = block_tables[b, : (seq_len + block_size - 1) // block_size].tolist()
        k = sequence_kv(k_cache, k_scale_zero, ids, seq_len, q.dtype)  # (S, Hk, D): a view when blocks are in order
        v = sequence_kv(v_cache, v_scale_zero, ids, seq_len, q.dtype)
        L = q_end - q_start
        if L == seq_len:  # no cached keys: the causal mask is SDPA's own
            causal = None
        else:
            q_pos = torch.arange(seq_len - L, seq_len, device=q.device)  # (L,) absolute positions
            causal = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # (L, S)
        # SDPA in q.dtype, like HF's sdpa attention, so fp32 stays in step with HF.
        out[q_start:q_end] = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (Hq, L|S, D)
            attn_mask=causal, is_causal=causal is None, scale=scale, enable_gqa=True,  # KV heads shared, not copied
        ).transpose(0, 1)
    return out


@triton.jit
def _attend_tile(
    q, acc, m, l, n0, kv_end, pos, b, kv_head, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr,
    scale_log2, stride_cache_block, stride_bt,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    QUANT: tl.constexpr,
):
    # One BLOCK_N tile of keys. Off the diagonal every key is below every row's position and below kv_end, so
    # the loads and scores need no key mask there; on it, the causal and length masks apply.
    n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
    d = tl.arange(0, BLOCK_D)
    if DIAGONAL:
        n_mask = n < kv_end
    else:
        n_mask = tl.full([BLOCK_N], True, tl.int1)  # a constant: the compiler drops the predicate
    kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
    page, row = key_rows(block_tables_ptr, b, stride_bt, n, n_mask, kv_head, stride_cache_block,
                         KV_HEADS, HEAD_DIM, PAGE_SIZE)
    kv_offs = row[:, None] + d[None, :]  # (BLOCK_N, BLOCK_D)
    sz_offs = scale_offsets(page, n, kv_head, KV_HEADS, PAGE_SIZE)  # int8 only
    k = _load_kv(k_cache_ptr, k_sz_ptr, kv_offs, sz_offs, kv_mask, n_mask, q.dtype, QUANT)
    s = _dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
    if DIAGONAL:
        s = tl.where((n[None, :] <= pos[:, None]) & n_mask[None, :], s, float("-inf"))
    v = _load_kv(v_cache_ptr, v_sz_ptr, kv_offs, sz_offs, kv_mask, n_mask, q.dtype, QUANT)
    return _softmax_step(s, v, m, l, acc, UPCAST_DOT, DOT_PRECISION)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, block_tables_ptr, cu_seqlens_q_ptr, seq_lens_ptr, out_ptr,
    scale_log2, stride_qt, stride_qh, stride_cache_block, stride_bt,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr,
):
    q_tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len  # keys cached before this step's tokens

    r = tl.arange(0, BLOCK_M)  # row = (token in tile, head in group)
    tok = q_tile * BLOCK_Q + r // GROUP  # (BLOCK_M,) token index within the sequence
    heads = kv_head * GROUP + r % GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (tok < q_len)
    d = tl.arange(0, BLOCK_D)
    q_rows = (q_start + tok).to(tl.int64)
    io_mask = row_mask[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=io_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    pos = context + tok  # absolute position of each row's token

    # Rows start at a large finite m, not -inf: a padding row sees no key and must not turn into NaN.
    m = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_pos = context + q_tile * BLOCK_Q  # the tile's first token sees keys [0, first_pos]
    kv_end = tl.minimum(first_pos + BLOCK_Q, seq_len)  # one past the tile's last visible key
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m, l = _attend_tile(
            q, acc, m, l, n0, kv_end, pos, b, kv_head, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr,
            block_tables_ptr, scale_log2, stride_cache_block, stride_bt,
            KV_HEADS, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT, QUANT)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m, l = _attend_tile(
            q, acc, m, l, n0, kv_end, pos, b, kv_head, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr,
            block_tables_ptr, scale_log2, stride_cache_block, stride_bt,
            KV_HEADS, HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, DOT_PRECISION, UPCAST_DOT, QUANT)

    l = tl.where(l > 0, l, 1.0)
    out_rows = q_rows * (KV_HEADS * GROUP) + heads  # rows of out viewed as (T * Hq, D)
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM + d[None, :],
             (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=io_mask)


def _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, quantized):
    B = seq_lens.shape[0]
    check_caches(q, k_cache, v_cache, block_tables, quantized)
    if block_tables.dim() != 2 or block_tables.shape[0] != B or cu_seqlens_q.shape != (B + 1,):
        raise ValueError(f"block_tables (B, max_blocks) and cu_seqlens_q (B+1,) for B={B}, got "
                         f"{tuple(block_tables.shape)}, {tuple(cu_seqlens_q.shape)}")
    if any(t.dtype != torch.int32 for t in (block_tables, cu_seqlens_q, seq_lens)):
        raise ValueError("block_tables, cu_seqlens_q and seq_lens must be int32")
    if len({t.device for t in (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)}) != 1:
        raise ValueError("all inputs must be on one device")


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, max_seqlen_q: int, scale: float,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    _check(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, quantized)
    T, Hq, D = q.shape
    B = seq_lens.shape[0]
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hk
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous: the kernel assumes it
    if T == 0 or B == 0 or max_seqlen_q == 0:
        return out
    fp32 = q.dtype == torch.float32
    BLOCK_M, BLOCK_N, num_warps, num_stages = _PREFILL_TILES[fp32]
    # Rows = tokens x group heads: shrink the tile for short chunks (fewer padding rows), never below one group.
    BLOCK_M = max(min(BLOCK_M, triton.next_power_of_2(max_seqlen_q * group)), 16, triton.next_power_of_2(group))
    BLOCK_Q = BLOCK_M // group
    BLOCK_D = triton.next_power_of_2(D)
    grid = (triton.cdiv(max_seqlen_q, BLOCK_Q), B, Hk)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, k_scale_zero if quantized else k_cache, v_scale_zero if quantized else v_cache,
        block_tables, cu_seqlens_q, seq_lens, out,
        scale * _LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), block_tables.stride(0),
        KV_HEADS=Hk, GROUP=group, BLOCK_Q=BLOCK_Q, BLOCK_M=BLOCK_M, HEAD_DIM=D, BLOCK_D=BLOCK_D,
        PAGE_SIZE=block_size, BLOCK_N=BLOCK_N,
        DOT_PRECISION="ieee" if fp32 else "tf32",  # fp32 stays fp32: no silent TF32
        UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,  # CPU tensors mean TRITON_INTERPRET
        QUANT=quantized, num_warps=num_warps, num_stages=num_stages,
    )
    return out
