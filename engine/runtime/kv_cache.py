"""KV-cache tensors: how many blocks fit, and their allocation (one K and one V tensor per layer).

Sizing: on a GPU, a fraction of the memory still free after the weights are loaded (LMDeploy's
cache_max_entry_count, vLLM's gpu_memory_utilization); on a CPU, a fixed byte budget. Never more blocks than the
longest useful request times the batch needs. `kv_cache_dtype="int8"` stores codes with an fp16 scale and zero per
(token, KV head) beside them (kernels/kv_int8.py): D + 4 bytes where bf16 takes 2D, so about twice the blocks.
"""
from __future__ import annotations

import torch

from engine.config import EngineConfig, TextConfig
from kernels.kv_int8 import SCALE_DTYPE


def block_bytes(text: TextConfig, block_size: int, dtype: torch.dtype, int8: bool = False) -> int:
    if int8:  # per (token, head): D codes + fp16 scale and zero
        return text.kv_bytes_per_token * block_size * (text.head_dim + 4) // text.head_dim
    return text.kv_bytes_per_token * block_size * torch.empty((), dtype=dtype).element_size()


def count_blocks(text: TextConfig, cfg: EngineConfig, dtype: torch.dtype, device: torch.device,
                 max_model_len: int) -> int:
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    per_block = block_bytes(text, cfg.block_size, dtype, cfg.kv_cache_dtype == "int8")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cfg.kv_cache_fraction)
    else:
        budget = cfg.kv_cache_cpu_bytes
    useful = cfg.max_num_seqs * -(-max_model_len // cfg.block_size)
    blocks = min(budget // per_block, useful)
    if blocks * cfg.block_size < min(max_model_len, 2048):
        raise MemoryError(
            f"only {blocks * cfg.block_size} tokens of KV cache fit in the memory left "
            f"({budget / 2**30:.2f} GiB); free memory or lower max_model_len")
    return blocks


def allocate(text: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
             int8: bool = False):
    """Per layer (k_cache, v_cache), each (num_blocks, block_size, Hk, D); int8: uint8 pages and then
    (k_scale_zero, v_scale_zero), each (num_blocks, block_size, Hk, 2) fp16."""
    shape = (num_blocks, block_size, text.num_key_value_heads, text.head_dim)
    if not int8:
        return [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                for _ in range(text.num_hidden_layers)]
    scales = (*shape[:3], 2)
    return [tuple(torch.empty(s, dtype=d, device=device) for s, d in ((shape, torch.uint8), (shape, torch.uint8),
                                                                       (scales, SCALE_DTYPE), (scales, SCALE_DTYPE)))
            for _ in range(text.num_hidden_layers)]
