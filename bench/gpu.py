"""GPU benchmark: our engine vs transformers `generate` on real-size LLaVA architectures with random weights.

    python -m bench.gpu [--arch llava-1.5-7b llava-interleave-qwen-0.5b llava-v1.6-vicuna-7b
                         llava-onevision-qwen2-0.5b] [--no-compile] [--json OUT.json]

(default --arch: the two LLaVA rows, as before; name the anyres rows to run them).

Both sides run in the same process on the same weights (ours are copied from the transformers model), bf16.
Measured: batch-1 and batch-32 decode tokens/s, time to first token for one image + 64 text tokens, peak memory.
LLaVA-1.5 / interleave (one 576- or 729-token reading): TTFT from pixels already on the GPU (both sides), and ours
from a 1024x768 JPEG's bytes. LLaVA-NeXT / OneVision (anyres: the image's size sets its tokens): TTFT from a
1920x1080 JPEG's bytes on both sides: ours through the product's path (intake decode, the family's reading, the
engine's vision stage: GPU preprocessing, CUDA-graphed tower, packing), transformers' through PIL, its image
processor and `generate`. Printed with the ratios and the share of the memory-bandwidth limit (bytes a decode step
must read over a copy bandwidth measured here).
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import statistics
import time
import uuid

import numpy as np
import torch
from PIL import Image

from engine.checkpoints.reader import split_parts
from engine.config import EngineConfig, TextConfig
from engine.families import llava_next
from engine.families.llava import LlavaImages
from engine.families.llava_onevision import OnevisionImages
from engine.image_inputs import ImageInput
from engine.llm_engine import LLMEngine
from engine.models import MODELS
from engine.sampling_params import SamplingParams
from engine.paging.sequence import ImageSpan
from vision.anyres import AnyresConfig
from vision.intake import load_image
from vision.preprocess import ImageProcessor, decode_jpeg_to_device
from vision.projector import MultiModalProjector, ProjectorConfig
from vision.towers import build_vision_tower, load_tower_weights

TEXT_TOKENS, B1_NEW, B32_NEW, BATCH = 64, 256, 128, 32
ARCHS = ("llava-interleave-qwen-0.5b", "llava-1.5-7b", "llava-onevision-qwen2-0.5b", "llava-v1.6-vicuna-7b")
PHOTO_WH = (1920, 1080)  # the anyres rows' JPEG
# The anyres image input sides, by config model_type (LLaVA-1.5's is LlavaImages); llava_next.PREFIXES are LLaVA's
# checkpoint keys plus `image_newline`, so they split every row's state dict.
ANYRES_IMAGES = {"llava_next": llava_next.AnyresImages, "llava_onevision": OnevisionImages}


def llama2_7b(vocab_size=32064):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)


def qwen2_05b():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True)


def clip_l_336():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768)


def siglip_384():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                              image_size=384, patch_size=14, vision_use_head=False)


def arch_config(name: str):
    """(transformers config, preprocessor_config.json dict) of a llava-hf checkpoint's architecture."""
    from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

    if name == "llava-1.5-7b":
        proc = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
                "crop_size": {"height": 336, "width": 336}, "do_center_crop": True}
        return LlavaConfig(text_config=llama2_7b(), vision_config=clip_l_336(), image_token_id=32000,
                           vision_feature_layer=-2, vision_feature_select_strategy="default"), proc
    if name == "llava-interleave-qwen-0.5b":
        proc = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384},
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
        return LlavaConfig(text_config=qwen2_05b(), vision_config=siglip_384(), image_token_id=151646,
                           vision_feature_layer=-1, vision_feature_select_strategy="full"), proc
    if name == "llava-v1.6-vicuna-7b":
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        proc = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 336},
                "crop_size": {"height": 336, "width": 336}, "image_grid_pinpoints": pinpoints}
        return LlavaNextConfig(text_config=llama2_7b(), vision_config=clip_l_336(), image_token_id=32000,
                               image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                               vision_feature_select_strategy="default"), proc
    if name == "llava-onevision-qwen2-0.5b":
        pinpoints = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
        proc = {"image_processor_type": "LlavaOnevisionImageProcessor", "size": {"height": 384, "width": 384},
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "image_grid_pinpoints": pinpoints}
        return LlavaOnevisionConfig(text_config=qwen2_05b(), vision_config=siglip_384(), image_token_id=151646,
                                    image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                    vision_feature_layer=-1, vision_feature_select_strategy="full"), proc
    raise ValueError(f"unknown arch {name!r}; known: {', '.join(ARCHS)}")


def hf_model_class(cfg):
    from transformers import (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
                              LlavaOnevisionForConditionalGeneration)

    return {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration,
            "llava_onevision": LlavaOnevisionForConditionalGeneration}[cfg.model_type]


def copy_bandwidth() -> float:
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), 10)
    return 2 * x.numel() * 2 / (ms / 1000)


def timed(fn, repeats=5, warmup=3) -> float:
    """Median milliseconds of fn() on the GPU, after warm-up calls (kernel compilation, allocator, clocks)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_timed(fns, calls=200, repeats=5) -> float:
    """Median microseconds a call of kernels that each take microseconds: `fns` (say one per copy of a weight, so
    that together they outgrow the L2 cache and every call reads memory, as in a decode step) called round robin
    `calls` times inside one CUDA graph, its replays timed with events. No launch gaps, unlike `timed` around one
    call, whose time is mostly the host's launch for kernels this small."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(times) / calls


def jpeg_bytes(w=1024, h=768) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    img = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1).astype(np.int16)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def prompt_ids(cfg, n_image: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 30000, (TEXT_TOKENS,), generator=g).tolist()
    return [1] + [cfg.image_token_id] * n_image + text


# ---------------------------------------------------------------- transformers side
def hf_image_inputs(image_processor, jpeg: bytes) -> dict:
    """transformers' path from upload bytes: PIL decode, its image processor (CPU, its default), to the GPU."""
    out = image_processor(Image.open(io.BytesIO(jpeg)).convert("RGB"), return_tensors="pt")
    return {"pixel_values": out["pixel_values"].to("cuda", torch.bfloat16), "image_sizes": out["image_sizes"].cuda()}


def hf_side(model, cfg, image: dict, n_image, compile_lm: bool, jpeg_image=None) -> dict:
    """`image`: the model's image inputs on the GPU (pixel_values, and image_sizes for anyres); `jpeg_image`, for
    the anyres rows: a function from nothing to those inputs, made from the JPEG's bytes (timed into TTFT)."""
    ids = torch.tensor([prompt_ids(cfg, n_image, 0)], device="cuda")
    res = {}

    def gen(batch_ids, kw, new):
        return model.generate(input_ids=batch_ids, **kw, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, attention_mask=torch.ones_like(batch_ids))

    with torch.inference_mode():
        res["ttft_ms"] = timed(lambda: gen(ids, image, 1), 5)
        if jpeg_image is not None:
            res["ttft_jpeg_ms"] = timed(lambda: gen(ids, jpeg_image(), 1), 5)
        t_n = timed(lambda: gen(ids, image, 1 + B1_NEW // 4), 2)
        res["b1_tok_s"] = (B1_NEW // 4) / ((t_n - res["ttft_ms"]) / 1000)
        ids32 = ids.repeat(BATCH, 1)
        image32 = {k: v.repeat(BATCH, *[1] * (v.dim() - 1)) for k, v in image.items()}
        t1 = timed(lambda: gen(ids32, image32, 1), 1)
        t_n = timed(lambda: gen(ids32, image32, 1 + B32_NEW // 2), 1)
        res["b32_tok_s"] = BATCH * (B32_NEW // 2) / ((t_n - t1) / 1000)
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if compile_lm:
        res.update(hf_compiled_lm(model, cfg))
    return res


def hf_compiled_lm(model, cfg) -> dict:
    """transformers' fastest documented decode: the language model alone, static cache + torch.compile."""
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_config(cfg.text_config, dtype=torch.bfloat16)
        lm.model = model.model.language_model
        lm.lm_head = model.lm_head
        lm.to("cuda").eval()
        lm.forward = torch.compile(lm.forward, mode="reduce-overhead", fullgraph=True)
        ids = torch.tensor([prompt_ids(cfg, 0, 0)], device="cuda")
        gen = lambda new: lm.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      cache_implementation="static")
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen(8), gen(8)
            compile_s = time.perf_counter() - t0
            t1 = timed(lambda: gen(1), 3)
            tn = timed(lambda: gen(1 + B1_NEW // 2), 3)
        return {"compiled_b1_tok_s": (B1_NEW // 2) / ((tn - t1) / 1000), "compile_s": compile_s}
    except Exception as exc:  # report, don't hide: the row says why it is missing
        return {"compiled_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


# ---------------------------------------------------------------- our side
class Ours:
    def __init__(self, cfg, proc_dict, state, max_model_len: int = 4096):
        parts = split_parts(state, llava_next.PREFIXES)
        text = cfg.text_config.to_dict()
        self.cfg = cfg
        tcfg = TextConfig.from_dict(text, MODELS[text["model_type"]][1])
        t = time.perf_counter()
        self.engine = LLMEngine(tcfg, parts["text"], None, EngineConfig(device="cuda", dtype="bfloat16",
                                                                       max_num_seqs=BATCH,
                                                                       max_model_len=max_model_len))
        self.build_s = time.perf_counter() - t  # weights to the GPU, KV cache, CUDA-graph capture
        self.tower = build_vision_tower(cfg.vision_config.to_dict(), cfg.vision_feature_layer,
                                        cfg.vision_feature_select_strategy, "cuda", torch.bfloat16)
        load_tower_weights(self.tower, parts["vision"])
        self.projector = MultiModalProjector(ProjectorConfig.from_dict(cfg.to_dict(), text["hidden_size"]))
        self.projector.load_state_dict(parts["projector"])
        self.projector.to("cuda", torch.bfloat16).eval()
        # The product's encoder: GPU preprocessing and a CUDA-graphed tower + projector.
        if cfg.model_type in ANYRES_IMAGES:
            newline = parts["newline"]["image_newline"].to("cuda", torch.bfloat16)
            self.encoder = ANYRES_IMAGES[cfg.model_type](AnyresConfig.from_configs(cfg.to_dict(), proc_dict),
                                                         self.tower.eval(), self.projector, newline,
                                                         torch.device("cuda"), torch.bfloat16)
        else:
            self.processor = ImageProcessor.from_dict(proc_dict)
            self.encoder = LlavaImages(self.processor, self.tower.eval(), self.projector, torch.device("cuda"),
                                       torch.bfloat16)
        self.engine.attach_images(self.encoder)  # the vision stage, for requests that bring an image to encode

    @torch.inference_mode()
    def encode(self, pixels):
        return self.encoder.forward(pixels.to(torch.bfloat16))[0]  # (T, hidden)

    def request(self, feats, seed=0, new=1, digest=None):
        ids = prompt_ids(self.cfg, feats.shape[0], seed)
        span = ImageSpan(1, feats.shape[0], digest or uuid.uuid4().hex, feats)
        return self.engine.add_request(ids, SamplingParams(max_new_tokens=new, ignore_eos=True), (span,))

    def image_input(self, jpeg: bytes) -> ImageInput:
        """The product's path from upload bytes to what the engine encodes: intake's decode and checks, and the
        family's own reading of the image (a fresh digest, so the feature cache never answers)."""
        picture = load_image(jpeg, "photo.jpg")
        return ImageInput(picture, uuid.uuid4().hex, self.encoder.prompt_readings([picture.size])[0][0])

    def request_image(self, image: ImageInput):
        span = ImageSpan(1, image.reading.tokens, repr(image.cache_key), source=image)  # the vision stage encodes
        ids = prompt_ids(self.cfg, image.reading.tokens, 0)
        return self.engine.add_request(ids, SamplingParams(max_new_tokens=1, ignore_eos=True), (span,))

    def run_to_end(self):
        while self.engine.has_work():
            self.engine.step()

    def ttft_fixed(self, pixels, jpeg: bytes) -> tuple[dict, torch.Tensor]:
        """LLaVA-1.5 / interleave: from GPU pixels, and from JPEG bytes (nvJPEG, GPU preprocessing)."""
        def from_pixels():
            self.request(self.encode(pixels))
            self.run_to_end()

        def from_jpeg():
            img = decode_jpeg_to_device(jpeg, "cuda")
            px = self.processor.preprocess_uint8([img])
            self.request(self.encode(px))
            self.run_to_end()

        res = {"ttft_ms": timed(from_pixels, 10), "ttft_jpeg_ms": timed(from_jpeg, 10),
               "vision_ms": timed(lambda: self.encode(pixels), 10)}
        return res, self.encode(pixels)

    def ttft_anyres(self, jpeg: bytes) -> tuple[dict, torch.Tensor]:
        """NeXT / OneVision: from JPEG bytes through intake and the engine's vision stage."""
        res = {"ttft_jpeg_ms": timed(lambda: (self.request_image(self.image_input(jpeg)), self.run_to_end()), 10)}
        image = self.image_input(jpeg)
        res["vision_ms"] = timed(lambda: self.encoder.encode([image]), 10)  # pixels, tower, projector, packing
        return res, self.encoder.encode([image])[0]

    def measure(self, pixels, jpeg: bytes) -> dict:
        """`pixels`: the fixed-reading rows' GPU pixels; None for the anyres rows."""
        res, feats = self.ttft_fixed(pixels, jpeg) if pixels is not None else self.ttft_anyres(jpeg)
        digest = uuid.uuid4().hex
        self.request(feats, digest=digest)
        self.run_to_end()
        res["ttft_cached_ms"] = timed(lambda: (self.request(feats, digest=digest), self.run_to_end()), 10)
        graphs, prefill = self.engine.runner.graphs, self.engine.runner.prefill_graphs
        tokens = len(prompt_ids(self.cfg, feats.shape[0], 0))
        if prefill is not None and prefill.fits(1, tokens):
            bucket = next(k for k in prefill.buckets if k >= tokens)
            res["prefill_graph_ms"] = timed(lambda: prefill.graphs[bucket].replay(), 20)
        res["build_s"] = self.build_s
        res["graph_step_b1_ms"] = timed(lambda: graphs.graphs[1].replay(), 20)
        res["graph_step_b32_ms"] = timed(lambda: graphs.graphs[BATCH].replay(), 20)
        # batch 1 decode
        seq = self.request(feats, new=B1_NEW)
        self.engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        self.run_to_end()
        res["b1_tok_s"] = (seq.num_output_tokens - 1) / (time.perf_counter() - t)
        # batch 32 decode: admit all, run the prefills, then time the decode steps
        seqs = [self.request(feats, seed=i, new=B32_NEW) for i in range(BATCH)]
        while any(s.num_output_tokens == 0 for s in seqs):
            self.engine.step()
        torch.cuda.synchronize()
        before = sum(s.num_output_tokens for s in seqs)
        t = time.perf_counter()
        self.run_to_end()
        res["b32_tok_s"] = (sum(s.num_output_tokens for s in seqs) - before) / (time.perf_counter() - t)
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return res


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def image_setup(cfg, proc: dict):
    """(n_image, the JPEG, the HF image inputs on the GPU, a JPEG -> HF inputs function or None, our pixels or
    None). Fixed-reading rows: random GPU pixels, 576 / 729 tokens. Anyres rows: a 1920x1080 JPEG, its tokens as
    transformers' processor counts them (which vision.anyres equals; tests/test_families_anyres.py)."""
    if cfg.model_type not in ANYRES_IMAGES:
        n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        s = cfg.vision_config.image_size
        pixels = torch.randn(1, 3, s, s, device="cuda", dtype=torch.bfloat16)
        return n_image, jpeg_bytes(), {"pixel_values": pixels}, None, pixels
    import transformers

    jpeg = jpeg_bytes(*PHOTO_WH)
    kwargs = {k: v for k, v in proc.items() if k != "image_processor_type"}
    image_processor = getattr(transformers, proc["image_processor_type"])(**kwargs)
    n_image = AnyresConfig.from_configs(cfg.to_dict(), proc).num_image_tokens(PHOTO_WH[::-1])
    return n_image, jpeg, hf_image_inputs(image_processor, jpeg), lambda: hf_image_inputs(image_processor, jpeg), None


def bench(name: str, compile_lm: bool, bw: float) -> dict:
    progress(f"{name}: building transformers model")
    cfg, proc = arch_config(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = hf_model_class(cfg)(cfg).to(torch.bfloat16).eval()
    n_image, jpeg, image, jpeg_image, pixels = image_setup(cfg, proc)
    torch.cuda.reset_peak_memory_stats()
    progress(f"{name}: transformers generate")
    theirs = hf_side(model, cfg, image, n_image, compile_lm, jpeg_image)
    progress(f"{name}: transformers done: {theirs}")
    state = model.state_dict()
    lm_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if "vision" not in k
                   and "projector" not in k and "embed_tokens" not in k)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    progress(f"{name}: building our engine (weights copied from the transformers model)")
    ours = Ours(cfg, proc, state, max_model_len=max(4096, n_image + 1 + TEXT_TOKENS + B1_NEW))
    del state
    gc.collect()
    progress(f"{name}: our engine")
    mine = ours.measure(pixels, jpeg)
    progress(f"{name}: ours done: {mine}")
    del ours
    gc.collect()
    torch.cuda.empty_cache()
    kv_per_tok = 2 * cfg.text_config.num_hidden_layers * cfg.text_config.num_key_value_heads * \
        (cfg.text_config.hidden_size // cfg.text_config.num_attention_heads) * 2
    ctx = 1 + n_image + TEXT_TOKENS + B1_NEW // 2
    limit_b1 = bw / (lm_bytes + kv_per_tok * ctx)
    limit_b32 = BATCH * bw / (lm_bytes + BATCH * kv_per_tok * (1 + n_image + TEXT_TOKENS + B32_NEW // 2))
    return {"arch": name, "ours": mine, "hf": theirs, "lm_bytes": lm_bytes, "limit_b1_tok_s": limit_b1,
            "limit_b32_tok_s": limit_b32, "image_tokens": n_image,
            "jpeg": f"{PHOTO_WH[0]}x{PHOTO_WH[1]}" if pixels is None else "1024x768"}


def report(r: dict) -> None:
    o, h = r["ours"], r["hf"]
    print(f"\n== {r['arch']}  ({r['image_tokens']} image tokens + {TEXT_TOKENS} text; LM weights "
          f"{r['lm_bytes'] / 1e9:.2f} GB read per decode step)")
    print(f"{'metric':<28}{'ours':>10}{'HF eager':>10}{'ratio':>8}{'% of BW limit (ours)':>22}")
    rows = [("batch-1 decode tok/s", "b1_tok_s", r["limit_b1_tok_s"]),
            ("batch-32 decode tok/s", "b32_tok_s", r["limit_b32_tok_s"])]
    for label, key, limit in rows:
        print(f"{label:<28}{o[key]:>10.1f}{h[key]:>10.1f}{o[key] / h[key]:>7.2f}x"
              f"{100 * o[key] / limit:>20.0f}%  (limit {limit:.0f})")
    if "ttft_ms" in o:
        print(f"{'TTFT from GPU pixels, ms':<28}{o['ttft_ms']:>10.1f}{h['ttft_ms']:>10.1f}"
              f"{h['ttft_ms'] / o['ttft_ms']:>7.2f}x")
    else:
        print(f"{'TTFT from GPU pixels, ms':<28}{'':>10}{h['ttft_ms']:>10.1f}   (HF only: ours starts from bytes)")
    label = f"TTFT from {r['jpeg']} JPEG, ms"
    if "ttft_jpeg_ms" in h:
        print(f"{label:<28}{o['ttft_jpeg_ms']:>10.1f}{h['ttft_jpeg_ms']:>10.1f}"
              f"{h['ttft_jpeg_ms'] / o['ttft_jpeg_ms']:>7.2f}x")
    else:
        print(f"{label:<28}{o['ttft_jpeg_ms']:>10.1f}{'':>10}")
    print(f"{'TTFT retry (prefix cache)':<28}{o['ttft_cached_ms']:>10.1f}")
    print(f"{'vision tower+projector, ms':<28}{o['vision_ms']:>10.1f}")
    if "prefill_graph_ms" in o:
        print(f"{'prefill graph replay, ms':<28}{o['prefill_graph_ms']:>10.1f}   (the language model's share of TTFT)")
    print(f"{'engine build s':<28}{o['build_s']:>10.1f}   (weights, KV cache, CUDA-graph capture)")
    print(f"{'decode graph replay b1, ms':<28}{o['graph_step_b1_ms']:>10.2f}   (whole step: "
          f"{1000 / o['b1_tok_s']:.2f} ms; the rest is host work between steps)")
    print(f"{'decode graph replay b32, ms':<28}{o['graph_step_b32_ms']:>10.2f}   (whole step: "
          f"{1000 * BATCH / o['b32_tok_s']:.2f} ms)")
    print(f"{'peak memory GB':<28}{o['peak_gb']:>10.1f}{h['peak_gb']:>10.1f}")
    if "compiled_b1_tok_s" in h:
        c = h["compiled_b1_tok_s"]
        print(f"{'HF static+compile b1 tok/s':<28}{'':>10}{c:>10.1f}{o['b1_tok_s'] / c:>7.2f}x  "
              f"(ours vs compiled; compile took {h['compile_s']:.0f} s)")
    elif "compiled_error" in h:
        print(f"HF static+compile: did not run: {h['compiled_error']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", nargs="+", default=list(ARCHS[:2]), choices=ARCHS)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    results = []
    for name in args.arch:
        results.append(bench(name, not args.no_compile, bw))
        report(results[-1])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"bandwidth": bw, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
