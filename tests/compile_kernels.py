"""Compiles the quantized-weight and int8-KV Triton kernels for an sm_90 GPU without one (Triton's own ptxas), to
catch what TRITON_INTERPRET cannot: code that interprets as Python but does not compile. Run by
tests/test_kernels_compile.py in a subprocess, as TRITON_INTERPRET must be unset before triton is imported."""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.kv_store as ks
import kernels.paged_decode as pd
import kernels.paged_prefill as pp
import kernels.quant_gemv as qg
import kernels.quant_matmul as qm

BF16 = "*bf16"


def compile_one(fn, types: dict, consts: dict, options: dict | None = None) -> None:
    signature = {n: types.get(n, "i32") for n in fn.arg_names if n not in consts}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options=options)


def main():
    for (bits, group, mode, zero, perm), act in [((4, 32, 2, True, False), False), ((4, 128, 1, True, True), False),
                                                 ((8, 4096, 0, False, False), False), ((8, 32, 2, False, True), False),
                                                 ((4, 128, 2, True, False), True), ((8, 4096, 0, False, False), True)]:
        compile_one(qg._quant_gemv_kernel,
                    dict(x_ptr=BF16, q_ptr="*i32", s_ptr="*fp32", z_ptr="*fp32", perm_ptr="*i64", bias_ptr=BF16,
                         res_ptr=BF16, y_ptr=BF16),
                    dict(BITS=bits, GROUP=group, MODE=mode, HAS_ZERO=zero, HAS_PERM=perm, HAS_BIAS=not act,
                         HAS_RESIDUAL=not act, ACT=act, BLOCK_N=16, BLOCK_K=1024, NG=max(1024 // group, 1),
                         STAGES=1 if bits == 4 else 3, FMA=True, PDL=True))
    for bits, group, zero, perm, block_m, swap in [(4, 32, True, False, 16, False), (4, 128, True, True, 32, True),
                                                   (8, 4096, False, False, 64, False),
                                                   (8, 4096, False, False, 32, True)]:
        compile_one(qm._quant_matmul_kernel,
                    dict(x_ptr=BF16, q_ptr="*u8" if bits == 4 else "*i8", s_ptr="*fp32", z_ptr="*fp32",
                         perm_ptr="*i64", bias_ptr=BF16, res_ptr=BF16, y_ptr=BF16, part_ptr="*fp32"),
                    dict(BITS=bits, GROUP=group, HAS_ZERO=zero, HAS_PERM=perm, HAS_BIAS=False, HAS_RESIDUAL=True,
                         BLOCK_M=block_m, BLOCK_N=128 if swap else 64, BLOCK_K=min(group, 128),
                         SPLIT_K=1 if perm else 4, DOT_PRECISION="tf32", UPCAST_DOT=False, SWAP=swap,
                         TRIGGER=True),
                    dict(num_warps=4, maxnreg=96) if swap else None)  # the 17-32-row tiles' register cap
        compile_one(qm._dequantize_kernel,
                    dict(q_ptr="*u8" if bits == 4 else "*i8", s_ptr="*fp32", z_ptr="*fp32", w_ptr=BF16),
                    dict(BITS=bits, GROUP=group, HAS_ZERO=zero, BLOCK_N=16, BLOCK_K=256))
    compile_one(qm._split_k_sum_kernel, dict(part_ptr="*fp32", bias_ptr=BF16, res_ptr=BF16, y_ptr=BF16),
                dict(SPLIT_K=4, HAS_BIAS=True, HAS_RESIDUAL=True, BLOCK_M=16, BLOCK_N=128, PDL=True))
    for quant in (False, True):
        cache = "*u8" if quant else BF16
        compile_one(ks._rope_store_kv_kernel,
                    dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, pos_ptr="*i64", cos_sin_ptr="*fp32", k_cache_ptr=cache,
                         v_cache_ptr=cache, k_sz_ptr="*fp16", v_sz_ptr="*fp16", slot_ptr="*i64"),
                    dict(HEAD_DIM=128, HALF=64, BLOCK_HALF=64, BLOCK_D=128, BLOCK_HQ=32, BLOCK_HK=8, QUANT=quant, PDL=quant))
        for group in (4, 1) if quant else (4,):  # int8 with one query head a KV head: the CUDA-core path
            compile_one(pd._paged_decode_kernel,
                        dict(q_ptr=BF16, k_cache_ptr=cache, v_cache_ptr=cache, k_sz_ptr="*fp16", v_sz_ptr="*fp16",
                             block_tables_ptr="*i32", seq_lens_ptr="*i32", out_ptr=BF16, part_out_ptr="*fp32",
                             part_lse_ptr="*fp32", scale_log2="fp32"),
                        dict(KV_HEADS=8, GROUP=group, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16, BLOCK_N=64,
                             MIN_SPLIT_KEYS=64, SPLIT=True, DOT_PRECISION="tf32", UPCAST_DOT=False, QUANT=quant,
                             WORD_CODES=quant, MHA_INT8=quant and group == 1))
        compile_one(pp._paged_prefill_kernel,
                    dict(q_ptr=BF16, k_cache_ptr=cache, v_cache_ptr=cache, k_sz_ptr="*fp16", v_sz_ptr="*fp16",
                         block_tables_ptr="*i32", cu_seqlens_q_ptr="*i32", seq_lens_ptr="*i32", out_ptr=BF16,
                         scale_log2="fp32"),
                    dict(KV_HEADS=8, GROUP=4, BLOCK_Q=16, BLOCK_M=64, HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16,
                         BLOCK_N=64, DOT_PRECISION="tf32", UPCAST_DOT=False, QUANT=quant))
    print("compiled")


if __name__ == "__main__":
    main()
