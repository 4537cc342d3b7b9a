"""The engine: requests in, tokens and text deltas out, one scheduled step at a time.

`LLMEngine` owns the model runner, the scheduler and block manager, and one incremental detokenizer per request.
`step()` runs one prefill batch or one decode step and reports, for each sequence touched, the new text and whether
(and why) it finished. `generate()` runs a list of requests to completion (like LMDeploy's pipeline given a list of
prompts). Threads and streaming to many clients live in engine/serving.py.

Overlap (`EngineConfig.overlap_decode`, like SGLang's overlap scheduler and vLLM's async scheduling): a decode step
is left in flight when `step()` returns. The next `step()` first launches the following decode step, whose input ids
are the in-flight step's sampled tokens, still on the device, and only then waits for those tokens and does the
host's work (append, detokenize, stop checks, finishing). So during steady decode the GPU runs step N+1 while the host
handles step N. Whenever that is not safe (a request waiting to be admitted, no room for the extra KV slot, nothing
left that surely continues), the step in flight is resolved first and scheduling goes on as without overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig, TextConfig
from engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from engine.kv_cache import count_blocks
from engine.loader import build_text_model
from engine.model_runner import LaunchedStep, ModelRunner
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
        self.inflight: LaunchedStep | None = None  # a decode step launched and not yet resolved (overlap only)

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
        """Cancel a request. If it is in the step in flight, its blocks are freed while that step still writes KV
        into them; that is safe because whatever later reuses a block (a prefill, another decode) is queued on the
        same stream after it. Its pending token is dropped when the step is resolved."""
        self.scheduler.abort(seq)
        self._release(seq)

    def fail_all(self) -> list[Sequence]:
        """After a step raised: finish everything in flight with ERROR so no client waits forever."""
        self.inflight = None
        failed = list(self.scheduler.running) + list(self.scheduler.waiting)
        self.scheduler.waiting.clear()
        for seq in failed:
            self.scheduler.finish(seq, FinishReason.ERROR)
            self._release(seq)
        return failed

    def has_work(self) -> bool:
        return self.inflight is not None or self.scheduler.has_work()

    def _release(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)
        self.runner.sampler.release(seq)

    def step(self) -> list[StepOutput]:
        """Launch the next step, then resolve the one before it; outputs of the step(s) resolved.

        Steady decode with overlap: launch step N+1 on the device tokens of step N, then resolve N. Otherwise:
        resolve the step in flight (if any), schedule, launch, and resolve a prefill (or, without overlap, any step)
        at once; a decode step is left in flight for the next call.
        """
        if self.inflight is not None:
            ahead = self.scheduler.schedule_ahead(self.inflight.seqs)
            if ahead:
                return self._step_ahead(ahead)
        outputs = self._resolve_inflight()
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            return outputs
        launched = self.runner.launch(seqs, is_prefill)
        if is_prefill or not self.cfg.overlap_decode:
            return outputs + self._resolve(launched)
        self.inflight = launched
        return outputs

    def _step_ahead(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Launch a decode step for `seqs` fed by the step in flight, then resolve that one."""
        prev = self.inflight
        self.inflight = self.runner.launch(seqs, False, after=prev)
        outputs = self._resolve(prev)
        for seq in seqs:
            if not seq.is_finished:
                # Its newest token is now known, and the step just launched writes that token's KV: the block it
                # completes can be keyed, as `append_slot` does before a step that is not launched ahead.
                self.blocks.register_full_block(seq)
        return outputs

    def _resolve_inflight(self) -> list[StepOutput]:
        step, self.inflight = self.inflight, None
        return [] if step is None else self._resolve(step)

    def _resolve(self, step: LaunchedStep) -> list[StepOutput]:
        """Wait for a step's tokens and apply them. A sequence finished meanwhile (aborted) gets nothing."""
        tokens = step.token_ids()
        return [self._advance(seq, tok) for seq, tok in zip(step.seqs, tokens) if not seq.is_finished]

    def _advance(self, seq: Sequence, token: int) -> StepOutput:
        seq.append(token)
        detok = self.detokenizers[seq.seq_id]
        if token in self.eos_token_ids and not seq.params.ignore_eos:
            reason, text = FinishReason.STOP, detok.flush()
        else:
            text = detok.push(token)
            reason = FinishReason.STOP if detok.stopped else self.scheduler.limit_reason(seq)
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
