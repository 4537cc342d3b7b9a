"""The engine: requests in, tokens and text deltas out, one scheduled step at a time.

`LLMEngine` owns the model runner, the scheduler and block manager, and one incremental detokenizer per request.
`step()` runs one scheduled step (every decoding request's next token, plus prompt chunks within the per-step token
budget, engine/paging/scheduler.py) and reports, for each sequence that got a token, the new text and whether (and
why) it finished. `generate()` runs a list of requests to completion (like LMDeploy's pipeline given a list of
prompts). Threads and streaming to many clients live in engine/serving.py.

Scoring requests (`Sequence.score`, LMDeploy's get_ppl; `score()` runs a list of them to the end) are prompts
prefilled chunk by chunk through the same scheduler, so they batch with chats and never stall them; each chunk's
next-token cross-entropy is added to the request's total as its step resolves, and the request finishes (STOP, no
token) once its whole prompt is scored.

Overlap (`EngineConfig.overlap_decode`, like SGLang's overlap scheduler and vLLM's async scheduling): a decode step
is left in flight when `step()` returns. The next `step()` first launches the following decode step, whose input ids
are the in-flight step's sampled tokens, still on the device, and only then waits for those tokens and does the
host's work (append, detokenize, stop checks, finishing). So during steady decode the GPU runs step N+1 while the host
handles step N. Whenever that is not safe (a request waiting to be admitted, a prompt being prefilled in chunks, no
room for the extra KV slot, nothing left that surely continues), the step in flight is resolved first and scheduling
goes on as without overlap; a step with prompt chunks is resolved at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from engine.image_inputs import ImageInputs
from engine.paging.block_manager import BlockManager
from engine.config import EngineConfig, RopeConfig, TextConfig
from engine.detokenizer import IncrementalDetokenizer, NoDetokenizer
from engine.runtime.kv_cache import count_blocks
from engine.checkpoints.loader import build_text_model
from engine.runtime.model_runner import LaunchedStep, ModelRunner
from engine.models.decoder import add_lowp_copies
from engine.quant.install import TIED_HEAD, place_for_cpu, quantize_weights
from kernels.quant_weight import QuantWeight
from engine.sampling_params import SamplingParams, TokenLogprob, unknown_tokens
from engine.paging.scheduler import Batch, Chunk, Scheduler
from engine.paging.sequence import EngineError, ErrorCode, FinishReason, ImageSpan, Score, Sequence
from engine.vision_stage import VisionStage
from kernels import HAS_TRITON, load_cpu_ops, load_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

log = logging.getLogger(__name__)


# A request that was in this many failed steps is failed itself (engine.llm_engine.LLMEngine.recover).
MAX_SUSPECT = 2


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int | None  # None: the request ended without a new token (its image failed, say)
    text: str  # new text safe to show
    finish_reason: FinishReason | None
    logprob: TokenLogprob | None = None  # the token's, where the request asked (SamplingParams.logprobs)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, where the request asked


def serving_rope(text_cfg: TextConfig, cfg: EngineConfig) -> RopeConfig:
    """The checkpoint's rope, or dynamic NTK with `cfg.rope_scaling_factor` in its place (LMDeploy's override;
    transformers' {"rope_type": "dynamic", "factor": F} on the same config)."""
    if cfg.rope_scaling_factor is None:
        return text_cfg.rope
    return replace(text_cfg.rope, kind="dynamic", factor=float(cfg.rope_scaling_factor))


def session_len(text_cfg: TextConfig, cfg: EngineConfig, rope: RopeConfig) -> int:
    """The longest sequence served: `cfg.max_model_len` (LMDeploy's session_len) or the trained length. Longer than
    the trained length is allowed; without rope scaling that is extrapolation, so it is said once in the log."""
    trained = text_cfg.max_position_embeddings
    length = cfg.max_model_len or trained
    if length > trained and rope.kind == "default":
        log.warning("session length %d exceeds the trained length %d without rope scaling: quality past %d tokens "
                    "needs --rope-scaling-factor or a checkpoint with rope scaling", length, trained, trained)
    return length


class LLMEngine:
    def __init__(self, text_cfg: TextConfig, weights: dict[str, torch.Tensor], tokenizer, cfg: EngineConfig,
                 eos_token_ids: tuple[int, ...] = ()):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device, self.dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        use_triton = cfg.use_triton if cfg.use_triton is not None else (
            self.device.type == "cuda" and HAS_TRITON)
        # A CPU's twins get C versions of the decode step's small ops where a C compiler is found (kernels/cpu_ops.py)
        self.ops = load_cpu_ops() if self.device.type == "cpu" and not use_triton else load_ops(use_triton)
        weights = quantize_weights(weights, cfg.quantize)
        self.model = build_text_model(text_cfg, weights, self.ops, self.device, self.dtype)
        if self.device.type == "cpu" and not use_triton:
            head = weights.get(TIED_HEAD) if text_cfg.tie_word_embeddings else None  # a tied checkpoint may still
            place_for_cpu(self.model, self.dtype, head if isinstance(head, QuantWeight) else None)  # store it dense
        if cfg.decode_weight_dtype is not None:
            add_lowp_copies(self.model, DTYPES[cfg.decode_weight_dtype])
        self.rope = serving_rope(text_cfg, cfg)
        self.max_model_len = session_len(text_cfg, cfg, self.rope)
        num_blocks = count_blocks(text_cfg, cfg, self.dtype, self.device, self.max_model_len)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching, self.rope.dynamic_from)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len)
        # CUDA graphs need the Triton kernels: the torch twins read lengths on the host.
        self.runner = ModelRunner(self.model, cfg, self.blocks, self.max_model_len, self.dtype, self.device,
                                  cuda_graphs=cfg.cuda_graphs and use_triton, rope=self.rope)
        self.eos_token_ids = frozenset(eos_token_ids or text_cfg.eos_token_ids)
        self.vocab_size = text_cfg.vocab_size
        self.detokenizers: dict[int, IncrementalDetokenizer | NoDetokenizer] = {}
        self.inflight: LaunchedStep | None = None  # a decode step launched and not yet resolved (overlap only)
        self.vision: VisionStage | None = None  # set by `attach_images` for a model that reads images
        self._attempt: list[Chunk] = []  # the work of the steps being launched or resolved (`recover`)

    def attach_images(self, images: ImageInputs) -> None:
        """Pair the language model with a family's image input side; its encoding runs as a stage of `step`."""
        self.vision = VisionStage(images, self.cfg.max_images_per_step, self.cfg.feature_cache_size)

    @property
    def images(self) -> ImageInputs | None:
        return None if self.vision is None else self.vision.images

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
        """Queue a sequence; one that can never fit the context comes back finished with reason ERROR and code
        CONTEXT_EXCEEDED, one with images on a model that reads none with BAD_IMAGE, one with a logit bias for a
        token the model does not have with INVALID_PARAMETER."""
        if seq.images and any(span.embeds is None for span in seq.images) and self.vision is None:
            seq.finish(FinishReason.ERROR, EngineError(ErrorCode.BAD_IMAGE, "this model reads text only"))
            return seq
        if (unknown := unknown_tokens(seq.params.logit_bias, self.vocab_size)) is not None:
            seq.finish(FinishReason.ERROR, EngineError(ErrorCode.INVALID_PARAMETER, unknown, param="logit_bias"))
            return seq
        if not self.scheduler.add(seq):
            return seq
        no_text = self.tokenizer is None or seq.score is not None  # token ids only, or no reply at all
        self.detokenizers[seq.seq_id] = (NoDetokenizer() if no_text else
                                         IncrementalDetokenizer(self.tokenizer, seq.token_ids, seq.params.stop))
        if self.vision is not None:
            self.vision.admit(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Cancel a request. If it is in the step in flight, its blocks are freed while that step still writes KV
        into them; that is safe because whatever later reuses a block (a prefill, another decode) is queued on the
        same stream after it. Its pending token is dropped when the step is resolved."""
        self.scheduler.abort(seq)
        self._release(seq)

    def recover(self, detail: str) -> list[Sequence]:
        """After a step raised: the requests in it (and in the step in flight) go back to the queue to be
        recomputed, each marked suspect; other running requests go on. The scheduler prefills suspects one at a
        time, so a request that makes steps fail goes on to fail by itself; one that was in `MAX_SUSPECT` failed
        steps is finished with ERROR (code ENGINE). The prefix-cache keys of the blocks those steps were to complete
        are dropped: their KV may never have been written. Returns those finished."""
        attempt, self._attempt, self.inflight = self._attempt, [], None
        starts: dict[Sequence, int] = {}
        for chunk in attempt:
            if not chunk.seq.is_finished:
                starts[chunk.seq] = min(starts.get(chunk.seq, chunk.start), chunk.start)
        failed = []
        for seq in reversed(list(starts)):  # requeue keeps order
            self.blocks.unkey_from(seq, starts[seq])
            seq.suspect += 1
            if seq.suspect >= MAX_SUSPECT:
                self.scheduler.finish(seq, FinishReason.ERROR, EngineError(ErrorCode.ENGINE, detail))
                self._release(seq)
                failed.append(seq)
            else:
                self.scheduler.requeue(seq)
        return failed[::-1]

    def has_work(self) -> bool:
        return self.inflight is not None or self.scheduler.has_work()

    def _release(self, seq: Sequence) -> None:
        self.detokenizers.pop(seq.seq_id, None)
        self.runner.sampler.release(seq)
        if self.vision is not None:
            self.vision.release(seq)

    def _encode_images(self) -> list[StepOutput]:
        """The vision stage: encode the images of waiting requests (capped per step); a request whose image
        cannot be encoded ends with BAD_IMAGE, the others go on."""
        waiting = [s for s in self.scheduler.waiting if not s.images_ready]
        if self.vision is None or not waiting:
            return []
        outputs = []
        for seq, exc in self.vision.run(waiting):
            self.scheduler.abort(seq)
            seq.finish(FinishReason.ERROR, EngineError(ErrorCode.BAD_IMAGE, f"{type(exc).__name__}: {exc}"))
            self._release(seq)
            outputs.append(StepOutput(seq, None, "", FinishReason.ERROR))
        return outputs

    def step(self) -> list[StepOutput]:
        """Launch the next step, then resolve the one before it; outputs of the step(s) resolved.

        Steady decode with overlap: launch step N+1 on the device tokens of step N, then resolve N. Otherwise:
        resolve the step in flight (if any), schedule, launch, and resolve a step with prompt chunks (or, without
        overlap, any step) at once; a decode step is left in flight for the next call.
        """
        self._attempt = [] if self.inflight is None else list(self.inflight.batch.chunks)
        encoded = self._encode_images()
        if self.inflight is not None:
            ahead = self.scheduler.schedule_ahead(self.inflight.seqs)
            if ahead.chunks:
                return encoded + self._step_ahead(ahead)
        outputs = encoded + self._resolve_inflight()
        batch = self.scheduler.schedule()
        if not batch.chunks:
            return outputs
        self._attempt += batch.chunks
        launched = self.runner.launch(batch)
        if not batch.is_decode or not self.cfg.overlap_decode:
            return outputs + self._resolve(launched)
        self.inflight = launched
        return outputs

    def _step_ahead(self, batch: Batch) -> list[StepOutput]:
        """Launch a decode step fed by the step in flight, then resolve that one."""
        prev = self.inflight
        self._attempt += batch.chunks
        self.inflight = self.runner.launch(batch, after=prev)
        outputs = self._resolve(prev)
        for seq in batch.seqs:
            if not seq.is_finished:
                # Its newest token is now known, and the step just launched writes that token's KV: the block it
                # completes can be keyed, as `append_slot` does before a step that is not launched ahead.
                self.blocks.register_full_block(seq)
        return outputs

    def _resolve_inflight(self) -> list[StepOutput]:
        step, self.inflight = self.inflight, None
        return [] if step is None else self._resolve(step)

    def _resolve(self, step: LaunchedStep) -> list[StepOutput]:
        """Wait for a step's tokens and apply them to the sequences that sampled (a chunk inside its prompt gets
        nothing). A sequence finished meanwhile (aborted) gets nothing."""
        scored = self._add_scores(step) if step.losses is not None else []
        tokens = step.token_ids()
        return scored + [self._advance(seq, tok, lp) for seq, tok, lp in zip(step.seqs, tokens,
                                                                             step.token_logprobs(tokens))
                         if not seq.is_finished]

    def _add_scores(self, step: LaunchedStep) -> list[StepOutput]:
        """Each scoring chunk's NLL onto its request's total; a request whose prompt is all scored finishes."""
        outputs = []
        for chunk, nll in step.chunk_losses():
            seq = chunk.seq
            if seq.is_finished:  # aborted meanwhile
                continue
            seq.score.total += nll
            seq.score.tokens += len(chunk.score_targets)
            if chunk.end == len(seq):
                self.scheduler.finish(seq, FinishReason.STOP)
                self._release(seq)
                outputs.append(StepOutput(seq, None, "", FinishReason.STOP))
        return outputs

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> StepOutput:
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
        return StepOutput(seq, token, text, reason, logprob)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 images: list[tuple[ImageSpan, ...]] | None = None) -> list[Completion]:
        """Run a batch of requests to the end; results in the order given."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        images = images or [()] * len(prompts)
        seqs = [self.add_request(p, sp, im) for p, sp, im in zip(prompts, params_list, images)]
        texts = {s.seq_id: [] for s in seqs}
        logprobs = {s.seq_id: [] for s in seqs}
        while self.has_work():
            for out in self.step():
                texts[out.seq.seq_id].append(out.text)
                if out.logprob is not None:
                    logprobs[out.seq.seq_id].append(out.logprob)
        return [Completion("".join(texts[s.seq_id]), s.output_ids, s.num_prompt_tokens, s.finish_reason,
                           logprobs[s.seq_id]) for s in seqs]

    def score(self, prompts: list[list[int]]) -> list[float]:
        """The mean next-token cross-entropy of each prompt (LMDeploy's get_ppl; perplexity is its exp), run to the
        end like `generate`. Each needs 2 to `context_len` tokens, else ValueError before anything runs."""
        limit = self.scheduler.max_prompt_tokens(scoring=True)
        for i, ids in enumerate(prompts):
            if not 2 <= len(ids) <= limit:
                raise ValueError(f"sequence {i}: {len(ids)} tokens; scoring takes 2 to {limit} (the context)")
        seqs = [self.add_sequence(Sequence(ids, SamplingParams(), score=Score())) for ids in prompts]
        while self.has_work():
            self.step()
        failed = [s for s in seqs if s.finish_reason is not FinishReason.STOP]
        if failed:
            raise RuntimeError(f"scoring failed: {failed[0].finish_reason.value} {failed[0].error or ''}")
        return [s.score.mean for s in seqs]
