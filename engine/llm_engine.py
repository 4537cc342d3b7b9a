"""The engine: requests in, tokens and text deltas out, one scheduled step at a time.

`LLMEngine` owns the model runner, the scheduler and block manager, and one incremental detokenizer per request.
`step()` runs one prefill batch or one decode step and reports, for each sequence touched, the new text and whether
(and why) it finished. `generate()` runs a list of requests to completion (like LMDeploy's pipeline given a list of
prompts). Threads and streaming to many clients live in engine/serving.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, TextConfig
from engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from engine.kv_cache import count_blocks
from engine.loader import build_text_model
from engine.model_runner import ModelRunner
from engine.models.decoder import add_lowp_copies
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import FinishReason, ImageSpan, Sequence
from kernels import HAS_TRITON, load_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    text: str  # new text safe to show
    finish_reason: FinishReason | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason


class LLMEngine:
    def __init__(self, text_cfg: TextConfig, weights: dict[str, torch.Tensor], tokenizer, cfg: EngineConfig,
                 eos_token_ids: tuple[int, ...] = ()):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device, self.dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        use_triton = cfg.use_triton if cfg.use_triton is not None else (
            self.device.type == "cuda" and HAS_TRITON)
        self.ops = load_ops(use_triton)
        self.model = build_text_model(text_cfg, weights, self.ops, self.device, self.dtype)
        if cfg.decode_weight_dtype is not None:
            add_lowp_copies(self.model, DTYPES[cfg.decode_weight_dtype])
        self.max_model_len = min(cfg.max_model_len or text_cfg.max_position_embeddings,
                                 text_cfg.max_position_embeddings)
        num_blocks = count_blocks(text_cfg, cfg, self.dtype, self.device, self.max_model_len)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len)
        # CUDA graphs need the Triton kernels: the torch twins read lengths on the host.
        self.runner = ModelRunner(self.model, cfg, self.blocks, self.max_model_len, self.dtype, self.device,
                                  cuda_graphs=cfg.cuda_graphs and use_triton)
        self.eos_token_ids = frozenset(eos_token_ids or text_cfg.eos_token_ids)
        self.detokenizers: dict[int, IncrementalDetokenizer | NoDetokenizer] = {}

    @property
    def context_len(self) -> int:
        """The longest prompt + reply one request can have here (model context, capped by the KV cache)."""
        return self.scheduler.max_tokens_per_seq

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's own token embeddings, for projectors that speak in words."""
        with torch.inference_mode():
            return self.model.embed(ids.to(self.device))

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    images: tuple[ImageSpan, ...] = ()) -> Sequence:
        return self.add_sequence(Sequence(prompt_ids, params, images))

    def add_sequence(self, seq: Sequence) -> Sequence:
        """Queue a sequence; one that can never fit the context comes back finished with reason CONTEXT."""
        self.detokenizers[seq.seq_id] = (NoDetokenizer() if self.tokenizer is None else  # token ids only
                                         IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.params.stop))
        if not self.scheduler.add(seq):
            self.detokenizers.pop(seq.seq_id)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.scheduler.abort(seq)
        self._release(seq)

    def fail_all(self) -> list[Sequence]:
        """After a step raised: finish everything in flight with ERROR so no client waits forever."""
        failed = list(self.scheduler.running) + list(self.scheduler.waiting)
        self.scheduler.waiting.clear()
        for seq in failed:
            self.scheduler.finish(seq, FinishReason.ERROR)
            self._release(seq)
        return failed

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _release(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)
        self.runner.sampler.release(seq)

    def step(self) -> list[StepOutput]:
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return []
        tokens = self.runner.run(seqs, is_prefill)
        return [self._advance(seq, tok) for seq, tok in zip(seqs, tokens)]

    def _advance(self, seq: Sequence, token: int) -> StepOutput:
        seq.append(token)
        detok = self.detokenizers[seq.seq_id]
        reason = None
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            reason, text = FinishReason.STOP, detok.flush()
        else:
            text = detok.push(token)
            if detok.stopped:
                reason = FinishReason.STOP
            elif seq.num_output_tokens >= seq.params.max_new_tokens:
                reason = FinishReason.LENGTH
            elif len(seq) >= self.scheduler.max_tokens_per_seq:
                reason = FinishReason.CONTEXT
            if reason is not None and reason is not FinishReason.STOP:
                text += detok.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._release(seq)
        return StepOutput(seq, token, text, reason)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 images: list[tuple[ImageSpan, ...]] | None = None) -> list[Completion]:
        """Run a batch of requests to the end; results in the order given."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        images = images or [()] * len(prompts)
        seqs = [self.add_request(p, sp, im) for p, sp, im in zip(prompts, params_list, images)]
        texts = {s.seq_id: [] for s in seqs}
        while self.has_work():
            for out in self.step():
                texts[out.seq.seq_id].append(out.text)
        return [Completion("".join(texts[s.seq_id]), s.output_ids, s.num_prompt_tokens, s.finish_reason)
                for s in seqs]
