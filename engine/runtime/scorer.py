"""The cross-entropy of scoring requests (LMDeploy's get_ppl), taken from a prefill step's hidden states.

Each scoring chunk's rows predict the tokens after them (`Chunk.score_targets`). The LM head runs on blocks of at
most `LOGITS_BYTES` of fp32 logits, so neither a sequence's nor even a whole chunk's logits exist at once: a 1,024-row
chunk of a 152k-word vocabulary would be 620 MB. Not here: sampling (engine/runtime/sampler.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models.decoder import CausalLM
from engine.runtime.sampler import to_device

LOGITS_BYTES = 64 << 20  # fp32 logits per block of rows at most


def block_rows(vocab_size: int) -> int:
    return max(1, LOGITS_BYTES // (4 * vocab_size))


def chunk_nll(model: CausalLM, hidden: torch.Tensor, scored: list[tuple[int, list[int]]]) -> torch.Tensor:
    """(C,) fp32: for each of C scoring chunks, given as (its first row in `hidden`, its targets), the summed
    next-token negative log-likelihood of its rows. `hidden` (T, hidden): the step's un-normed residual stream."""
    device = hidden.device
    rows = to_device([first + i for first, targets in scored for i in range(len(targets))], torch.int64, device)
    targets = to_device([t for _, ts in scored for t in ts], torch.int64, device)
    owner = to_device([c for c, (_, ts) in enumerate(scored) for _ in ts], torch.int64, device)
    nll = torch.empty(len(targets), dtype=torch.float32, device=device)
    step = block_rows(model.config.vocab_size)
    for i in range(0, len(targets), step):
        logits = model.logits(hidden[rows[i:i + step]], exact=True)  # (n, V) fp32
        nll[i:i + step] = F.cross_entropy(logits, targets[i:i + step], reduction="none")
    return torch.zeros(len(scored), dtype=torch.float32, device=device).index_add_(0, owner, nll)
