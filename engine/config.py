"""Configuration dataclasses: the language model's hyperparameters (read from config.json) and the engine's knobs.

Nothing here touches torch or the filesystem beyond what the caller hands in; the values are validated once in
`__post_init__` and never mutated afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """A checkpoint's rotary embedding, with transformers' meaning for every field (modeling_rope_utils.py).

    `max_position_embeddings` is the config's own (before any sliding-window cap): dynamic NTK measures a sequence
    against it. `original_max_position_embeddings` is the pre-scaling length llama3 and YaRN read. YaRN's optional
    fields stay None when the checkpoint leaves them out, as transformers then derives them.
    """

    theta: float = 10000.0
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 8192
    beta_fast: float | None = None  # YaRN from here on
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.kind!r} (supported: {', '.join(ROPE_TYPES)})")

    @property
    def dynamic_from(self) -> int | None:
        """Dynamic NTK: sequences longer than this get a base of their own; None for the static types."""
        return self.max_position_embeddings if self.kind == "dynamic" else None

    @classmethod
    def from_dict(cls, d: dict) -> "RopeConfig":
        # transformers 5 writes `rope_parameters`; older configs write `rope_theta` + `rope_scaling` (with "type").
        params = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        merged = {**scaling, **params}
        kind = merged.get("rope_type", merged.get("type", "default")) or "default"
        context = int(d.get("max_position_embeddings", 4096))
        # transformers' standardize_rope_params: a top-level value wins (Phi3), else the scaling dict's, else context
        original = int(d.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
                       or context)
        factor = merged.get("factor")
        if factor is None:  # YaRN without a factor: the ratio of the lengths (transformers, DeepSeek-V3)
            factor = context / original if kind == "yarn" else 1.0
        optional = {k: merged.get(k) for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                               "attention_factor")}
        return cls(
            theta=float(theta), kind=kind, factor=float(factor),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=original, max_position_embeddings=context,
            truncate=bool(merged.get("truncate", True)), **optional,
        )


@dataclass(frozen=True)
class TextConfig:
    """A decoder-only language model (Llama / Qwen2 / Mistral), from a config.json or a llava `text_config`.

    `max_position_embeddings` is the trained length, the default session length (EngineConfig.max_model_len may
    ask for more; rope scaling, `rope`, is what makes more work). A model that attends through a sliding window
    (Mistral's `sliding_window`; Qwen2's when `use_sliding_window`) gets it capped at the window: our attention is
    full causal, which equals sliding-window attention exactly as long as no sequence is longer than the window.
    llava-v1.6-mistral's window is null, so nothing is capped there.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    hidden_act: str
    rope: RopeConfig
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}: the Llama/Qwen2 MLP uses silu")

    @classmethod
    def from_dict(cls, d: dict, qkv_bias_default: bool = False) -> "TextConfig":
        heads = d["num_attention_heads"]
        bias = d.get("attention_bias")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        context = int(d.get("max_position_embeddings", 4096))
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        return cls(
            model_type=d["model_type"],
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=min(context, int(window)) if window else context,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias_default if bias is None else bool(bias),
            o_bias=False if bias is None else bool(bias),
            hidden_act=d.get("hidden_act", "silu"),
            rope=RopeConfig.from_dict(d),
            eos_token_ids=eos_ids,
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, per byte of element size."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


# Per-step token budgets by device type (`EngineConfig.max_num_batched_tokens`). CUDA: the prefill CUDA graphs' cap,
# so a chunk with a few decode rows still replays a graph, one image and a question (600-800 tokens) still prefill in
# one step, and a 7B step with a full chunk costs a few decode steps, not a whole long prompt's prefill. CPU (the
# 135M default, bench/results/stall_cpu.txt): with 128, a chat decoding while a ~5,900-token message is prefilled
# waits at most 1.1-1.4 s for a token (45-56 s with the whole prompt in one step) and the message's TTFT does not
# grow; 64 halves that gap again but costs the message up to 1.2x, 256 and 512 double and triple the gap.
DEFAULT_STEP_TOKENS = {"cuda": 1024, "cpu": 128}

QUANTIZE = (None, "auto", "w8a16", "w4a16", "gguf")
KV_CACHE_DTYPES = ("auto", "int8")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Defaults suit one GPU or a laptop CPU; every field is explicit."""

    device: str = "cpu"
    dtype: str = "float32"  # "float32", "bfloat16", "float16"
    block_size: int = 16
    max_num_seqs: int = 32
    # The per-step token budget (chunked prefill; vLLM's name and meaning): a step computes the next token of every
    # decoding sequence, then prompt chunks in what is left, so a prompt longer than that is prefilled over several
    # steps while every other chat still gets a token in each. It bounds how much one long message slows the others
    # (each step costs about as much as this many prompt tokens); smaller costs the long prompt more steps' overhead.
    # None: `DEFAULT_STEP_TOKENS` for the device (the comment there says why), and never below max_num_seqs.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings (LMDeploy's session_len)
    # Dynamic NTK RoPE scaling with this factor (LMDeploy's rope_scaling_factor, transformers' "dynamic" rope type),
    # replacing the checkpoint's own scaling; None keeps the checkpoint's.
    rope_scaling_factor: float | None = None
    kv_cache_fraction: float = 0.85  # of free accelerator memory after weights (like LMDeploy's cache_max_entry_count)
    kv_cache_cpu_bytes: int = 1 << 30  # KV budget on CPU
    num_kv_blocks: int | None = None  # overrides the sizing above (tests)
    enable_prefix_caching: bool = True
    use_triton: bool | None = None  # None: Triton kernels on CUDA, torch twins elsewhere
    # A bf16 copy of the weights for decode steps: on CPUs without bf16 matrix units that is ~2.7x faster than fp32
    # there while prefill stays fp32 (bf16 prefill is ~6x slower). Only meaningful with dtype float32.
    decode_weight_dtype: str | None = None
    # Weight-only quantization (engine/quant/): None keeps the checkpoint's dense weights; "w8a16" (int8 per output
    # channel) and "w4a16" (int4, groups of 128) round the projections to nearest at load; "gguf" keeps a GGUF
    # source's own blocks (the embedded default: Q4_1 layers, Q8_0 LM head). AWQ and GPTQ checkpoints load
    # quantized whatever this says. The families resolve "auto" (engine/families/__init__.py).
    quantize: str | None = None
    # "auto": K/V in the model's dtype; "int8": per (token, KV head) asymmetric int8 with an fp16 scale and zero
    # beside the pages (LMDeploy's quant_policy 8), about half of bf16's bytes (engine/runtime/kv_cache.py).
    kv_cache_dtype: str = "auto"
    cuda_graphs: bool = True  # decode under CUDA graphs on CUDA devices
    cuda_graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 24, 32, 48, 64))
    # Prefill under CUDA graphs too, for batches of up to this many new tokens (in 16-token buckets; 0: never) and
    # sequences. One image and a question is 600-800 tokens; larger prefills are GPU-bound enough to run eagerly.
    cuda_graph_prefill_tokens: int = 1024
    cuda_graph_prefill_seqs: int = 4
    # Launch decode step N+1 before the host handles step N's tokens (engine/llm_engine.py), so the GPU does not
    # idle during sampling bookkeeping, detokenizing and scheduling. Same outputs; on a CPU it gains nothing.
    overlap_decode: bool = True
    # The vision stage (engine/vision_stage.py): images encoded per engine step at most (batched across requests,
    # so one message with many images does not hold other chats' decode steps for long), and features kept by
    # content digest for retries and follow-ups (entries live requests need are never evicted).
    max_images_per_step: int = 8
    feature_cache_size: int = 64

    def __post_init__(self):
        if self.max_num_batched_tokens is None:  # resolved once, here: the only write after construction
            default = DEFAULT_STEP_TOKENS.get(self.device.split(":")[0], DEFAULT_STEP_TOKENS["cpu"])
            object.__setattr__(self, "max_num_batched_tokens", max(default, self.max_num_seqs))
        if self.max_images_per_step < 1 or self.feature_cache_size < 0:
            raise ValueError("max_images_per_step must be >= 1 and feature_cache_size >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.decode_weight_dtype not in (None, "bfloat16", "float16"):
            raise ValueError("decode_weight_dtype must be None, bfloat16 or float16")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor >= 1:
            raise ValueError(f"rope_scaling_factor must be at least 1, got {self.rope_scaling_factor!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError("kv_cache_fraction must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_seqs must be positive and max_num_batched_tokens at least max_num_seqs (a step "
                             "holds one token of every decoding sequence)")
        if self.cuda_graph_prefill_tokens < 0 or self.cuda_graph_prefill_seqs < 1:
            raise ValueError("cuda_graph_prefill_tokens must be >= 0 and cuda_graph_prefill_seqs >= 1")
