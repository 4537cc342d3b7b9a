"""Turns the last-position logits of a batch into next tokens: logit bias, penalties, temperature, top-k, top-p.

Order and semantics follow transformers' `generate` (penalty on every token already in the sequence, then
temperature, top-k, top-p), with OpenAI's logit bias and presence / frequency penalties where vLLM applies them
(the bias first; the additive penalties, over the reply's own tokens, after the repetition penalty). Sampling draws
`probs / Exponential(1)` noise and takes the argmax, which equals a multinomial draw without a host sync
(gpt-fast); a request with a seed draws its noise from its own generator, once per step it is in, so its output
does not depend on what else is in the batch. On host tensors, where a count can be read for free, a row with a
top-k draws over the tokens it keeps alone (`_best_kept`). The tokens come back as a
device tensor and nothing here waits for the device: per-request values travel through pinned memory, so the engine
can launch the next step before it reads these tokens (engine/llm_engine.py).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from engine.paging.sequence import Sequence


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a host sync. A pageable host-to-device copy waits for the stream; a
    pinned one is queued. The pinned staging comes from torch's caching host allocator, which does not hand it out
    again before the copy has run."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


def _pair_table(rows: list[list[tuple[int, float]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of (token id, value) as a (B, L) id table and a (B, L) fp32 value table for one scatter-add, padded
    with (0, 0.0): adding 0.0 to token 0 changes nothing."""
    width = max(1, max(len(row) for row in rows))
    pad = lambda row, fill: row + [fill] * (width - len(row))  # noqa: E731
    return (to_device([pad([t for t, _ in row], 0) for row in rows], torch.long, device),
            to_device([pad([v for _, v in row], 0.0) for row in rows], torch.float32, device))


@dataclass(frozen=True)
class ModelLogprobs:
    """The log-probabilities under the model of a batch's rows that asked for them (`rows`, in batch order), taken
    before sampling adjusts the logits: their log-softmax (R, V) and top `k` (values and ids, likeliest first) for
    the widest k asked."""

    rows: list[int]
    index: torch.Tensor | None  # `rows` on the device; None where every row asked
    full: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor

    def pick(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the log-probabilities of those rows' sampled tokens (R,), top values (R, k), top ids (R, k)), on the
        device; `tokens` (B,) is the whole batch's."""
        mine = tokens if self.index is None else tokens[self.index]
        return self.full.gather(1, mine[:, None])[:, 0], self.top_values, self.top_ids


def model_logprobs(logits: torch.Tensor, seqs: list[Sequence]) -> ModelLogprobs | None:
    """The model's log-probabilities for the rows of a batch that asked for them (`SamplingParams.logprobs`), None
    where none did. Take them before sampling, which adjusts `logits` in place."""
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    index = to_device(rows, torch.long, logits.device) if len(rows) < len(seqs) else None
    full = torch.log_softmax((logits if index is None else logits[index]).float(), dim=-1)
    top = torch.topk(full, max(1, max(seqs[i].params.logprobs for i in rows)), dim=-1)
    return ModelLogprobs(rows, index, full, top.values, top.indices)


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

    @staticmethod
    def _add_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Each row's logit bias, added in one scatter. Ids past the logits' width were refused at admission
        (engine.llm_engine)."""
        if not any(s.params.logit_bias for s in seqs):
            return logits
        vocab = logits.shape[-1]
        ids, bias = _pair_table([[(t, b) for t, b in s.params.logit_bias if t < vocab] for s in seqs], logits.device)
        return logits.scatter_add_(1, ids, bias)

    def _apply_penalty(self, logits: torch.Tensor, seqs: list[Sequence],
                       pending: torch.Tensor | None) -> torch.Tensor:
        """Penalise every token id the sequence holds, its pending token (sampled, still on the device) included.

        One gather and one scatter for the batch over a (B, L) table of ids. Rows are padded with a repeat of one
        of their own ids, and the pending id may repeat a held one: a duplicate gathers the same logit and writes
        the same value back, so it changes nothing.
        """
        penalties = [s.params.repetition_penalty for s in seqs]
        if all(p == 1.0 for p in penalties):
            return logits
        vocab = logits.shape[-1]
        # Image placeholders may sit outside the vocabulary (an added <image> token): they carry no logit.
        held = [sorted(t for t in set(s.token_ids) if t < vocab) if p != 1.0 else [] for s, p in zip(seqs, penalties)]
        width = max(len(row) for row in held)
        ids = to_device([row + row[:1] * (width - len(row)) if row else [0] * width for row in held],
                        torch.long, logits.device)  # (B, L)
        if pending is not None:
            ids = torch.cat([ids, pending[:, None]], dim=1)
        # A row with nothing to penalise keeps a factor of 1 (x * 1 and x / 1 are exact), so its padding is inert. A
        # row with a pending token always holds the output token sampled before it, so it is never such a row.
        factor = to_device([p if row else 1.0 for p, row in zip(penalties, held)], torch.float32, logits.device)
        factor = factor[:, None]
        seen = logits.gather(1, ids)
        return logits.scatter_(1, ids, torch.where(seen < 0, seen * factor, seen / factor))

    @staticmethod
    def _additive_penalties(logits: torch.Tensor, seqs: list[Sequence],
                            pending: torch.Tensor | None) -> torch.Tensor:
        """OpenAI's presence and frequency penalties over each row's reply so far, its pending token included:
        logit -= frequency * count + presence * (count > 0). The counts are a (B, V) table built by two scatter-adds
        (the held tokens' counts, then the pending token), so a pending id that repeats a held one counts twice."""
        presence = [s.params.presence_penalty for s in seqs]
        frequency = [s.params.frequency_penalty for s in seqs]
        if not any(presence) and not any(frequency):
            return logits
        vocab, dev = logits.shape[-1], logits.device
        held = [list(collections.Counter(t for t in s.output_ids if t < vocab).items()) if p or f else []
                for s, p, f in zip(seqs, presence, frequency)]
        counts = torch.zeros_like(logits).scatter_add_(1, *_pair_table(held, dev))
        if pending is not None:
            counts.scatter_add_(1, pending[:, None], torch.ones_like(counts[:, :1]))
        frequency = to_device(frequency, torch.float32, dev)[:, None]
        presence = to_device(presence, torch.float32, dev)[:, None]
        return logits - (counts * frequency + (counts > 0) * presence)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 pending: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) int64 tokens on the logits' device. `pending` (B,): each sequence's token that a step still in
        flight has sampled and the host has not appended yet; only the penalties read it."""
        # logits (B, V) float32
        logits = self._add_bias(logits, seqs)
        logits = self._apply_penalty(logits, seqs, pending)
        logits = self._additive_penalties(logits, seqs, pending)
        greedy = logits.argmax(dim=-1)
        if all(s.params.greedy for s in seqs):
            return greedy
        dev = logits.device
        temps = to_device([s.params.temperature or 1.0 for s in seqs], torch.float32, dev)
        logits = logits / temps[:, None]
        best = self._best_kept(logits, seqs)
        index = None
        if best is None:
            logits = self._top_k(logits, seqs)
        elif None not in best[2]:  # every row draws over its own kept tokens alone
            logits, index = best[0], best[1]
        else:  # some rows without a top-k: full width, each other row cut at its k-th value (no second topk)
            active = torch.tensor([n is not None for n in best[2]])[:, None]
            logits = logits.masked_fill(active & (logits < best[3]), float("-inf"))
        logits = self._top_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        sampled = (probs / self._noise(probs, seqs, best, index is not None)).argmax(dim=-1)
        if index is not None:
            sampled = index.gather(1, sampled[:, None])[:, 0]
        is_greedy = to_device([s.params.greedy for s in seqs], torch.bool, dev)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _best_kept(logits: torch.Tensor, seqs: list[Sequence]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[int | None], torch.Tensor] | None:
        """The tokens top-k keeps (as `_top_k`: ties at a row's k-th value included), in token id order: (values,
        the rest of a row -inf; their token ids; how many each row keeps, None for a row without a top-k; each row's
        k-th value (B, 1), which `_top_k` would cut at; a greedy row counts as k = 1). Host
        tensors only, where reading the counts waits for nothing; None for device tensors, which keep to the
        full-width path (no host sync). Why: on a CPU a vocabulary-wide sort and noise draw cost milliseconds a row,
        more than a small model's decode step; over the kept tokens they cost microseconds. Token id order, not
        topk's: its order among equal values may change with its width, which other rows set."""
        vocab = logits.shape[-1]
        ks = [1 if s.params.greedy else s.params.top_k if 0 < s.params.top_k < vocab else None for s in seqs]
        if logits.device.type != "cpu" or all(k is None for k in ks):
            return None
        top = torch.topk(logits, max(k or 1 for k in ks), dim=-1)
        kth = top.values.gather(1, torch.tensor([(k or 1) - 1 for k in ks])[:, None])  # (B, 1)
        kept = [n if k else None for n, k in zip((logits >= kth).sum(dim=-1).tolist(), ks)]
        widest = max(n or 1 for n in kept)
        if widest > top.values.shape[1]:  # ties at a k-th value past the largest k
            top = torch.topk(logits, widest, dim=-1)
        dropped = top.values < kth
        order = top.indices.masked_fill(dropped, vocab).argsort(dim=-1)  # kept tokens by id, then the dropped
        values = top.values.masked_fill(dropped, float("-inf")).gather(1, order)
        return values, top.indices.gather(1, order), kept, kth

    def _noise(self, probs: torch.Tensor, seqs: list[Sequence], best, over_best: bool) -> torch.Tensor:
        """Exponential(1) noise for `probs`, each row's from its own generator. A row's draws depend on that row
        alone, whatever else is in the batch: a row with a top-k (host tensors) draws one value per kept token, in
        token id order; any other row one per vocabulary entry."""
        noise = torch.ones_like(probs)
        for i, seq in enumerate(seqs):
            gen = self._generator(seq)
            kept = best[2][i] if best is not None else None
            if kept is None:
                noise[i].exponential_(generator=gen)
            elif over_best:  # columns are the row's kept tokens
                noise[i, :kept].exponential_(generator=gen)
            else:  # columns are token ids
                noise[i, best[1][i, :kept]] = torch.empty(kept).exponential_(generator=gen)
        return noise

    @staticmethod
    def _top_k(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        ks = [s.params.top_k for s in seqs]
        if not any(0 < k < logits.shape[-1] for k in ks):
            return logits
        dev = logits.device
        k_max = max(min(k, logits.shape[-1]) if k > 0 else 1 for k in ks)
        top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max) descending
        kth = to_device([min(k, logits.shape[-1]) - 1 if k > 0 else 0 for k in ks], torch.long, dev)
        threshold = top.gather(1, kth.clamp(max=k_max - 1)[:, None])
        active = to_device([0 < k < logits.shape[-1] for k in ks], torch.bool, dev)[:, None]
        return logits.masked_fill(active & (logits < threshold), float("-inf"))

    @staticmethod
    def _top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(s.params.top_p >= 1 for s in seqs):
            return logits
        ps = to_device([s.params.top_p for s in seqs], torch.float32, logits.device)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - ps)[:, None]
        remove[:, -1] = False  # always keep the most likely token
        return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
