"""Weight-only quantization at load: where quantized weights come from and how each device runs them.

`rtn` rounds a dense checkpoint's projections to nearest (EngineConfig.quantize "w8a16" / "w4a16"); `formats` reads
AWQ / GPTQ checkpoints, `gguf` a GGUF's Q4_1 / Q8_0 blocks (`store` caches those on disk); all of them produce
`kernels.quant_weight.QuantWeight`s keyed like the dense weights, which the loader installs. `install` gives each
device its form (the GPU's Triton ops take a QuantWeight as it is; a CPU gets a dense prefill copy and a packed
decode weight), and `policy` measures this CPU once to pick dtypes and kernels for `auto`. The int8 KV cache is
not here: it is a cache format (kernels/kv_int8.py, engine/runtime/kv_cache.py).
"""
