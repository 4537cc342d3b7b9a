"""Turns the last-position logits of a batch into next tokens: repetition penalty, temperature, top-k, top-p.

Order and semantics follow transformers' `generate` (penalty on every token already in the sequence, then
temperature, top-k, top-p). Sampling draws `probs / Exponential(1)` noise and takes the argmax, which equals a
multinomial draw without a host sync (gpt-fast); a request with a seed draws its noise from its own generator, so
its output does not depend on what else is in the batch.
"""
from __future__ import annotations

import torch

from engine.sequence import Sequence


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.generators: dict[int, torch.Generator] = {}  # seq_id -> generator, for seeded requests

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.params.seed)
            self.generators[seq.seq_id] = gen
        return gen

    def _apply_penalty(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        for i in rows:
            # Image placeholders may sit outside the vocabulary (an added <image> token): they carry no logit.
            ids = torch.tensor(sorted(t for t in set(seqs[i].token_ids) if t < logits.shape[-1]),
                               device=logits.device, dtype=torch.long)
            penalty = seqs[i].params.repetition_penalty
            seen = logits[i, ids]
            logits[i, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)
        return logits

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        # logits (B, V) float32
        logits = self._apply_penalty(logits, seqs)
        greedy = logits.argmax(dim=-1)
        if all(s.params.greedy for s in seqs):
            return greedy.tolist()
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], device=logits.device)
        logits = logits / temps[:, None]
        logits = self._top_k(logits, seqs)
        logits = self._top_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=self._generator(seq))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([s.params.greedy for s in seqs], device=logits.device)
        return torch.where(is_greedy, greedy, sampled).tolist()

    @staticmethod
    def _top_k(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        ks = [s.params.top_k for s in seqs]
        if not any(0 < k < logits.shape[-1] for k in ks):
            return logits
        k_max = max(min(k, logits.shape[-1]) if k > 0 else 1 for k in ks)
        top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max) descending
        kth = torch.tensor([min(k, logits.shape[-1]) - 1 if k > 0 else 0 for k in ks], device=logits.device)
        threshold = top.gather(1, kth.clamp(max=k_max - 1)[:, None])
        active = torch.tensor([0 < k < logits.shape[-1] for k in ks], device=logits.device)[:, None]
        return logits.masked_fill(active & (logits < threshold), float("-inf"))

    @staticmethod
    def _top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(s.params.top_p >= 1 for s in seqs):
            return logits
        ps = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - ps)[:, None]
        remove[:, -1] = False  # always keep the most likely token
        return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
