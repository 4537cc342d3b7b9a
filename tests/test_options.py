"""The load flags shared by the app, the CLI and the API server reach the engine they load."""
import argparse

import pytest
import torch

from engine.chat import ChatImage, ChatModel, ChatTurn, GenerationSettings
from engine.options import add_model_args, model_kwargs
from kernels.cpu_qgemv import CpuQ8Weight
from kernels.quant_cpu import CpuInt8Weight
from kernels.quant_weight import QuantWeight
from tests.tiny_checkpoints import make_tiny_llava, random_png


def _parse(argv):
    p = argparse.ArgumentParser()
    add_model_args(p)
    return p.parse_args(argv)


def test_unset_flags_keep_the_defaults():
    assert model_kwargs(_parse([])) == {"device": None, "dtype": "auto"}


def test_flags_become_load_keywords():
    args = _parse(["--device", "cpu", "--dtype", "float32", "--quantize", "w8a16", "--kv-cache-dtype", "int8",
                   "--session-len", "4096", "--rope-scaling-factor", "2.0", "--max-num-seqs", "3"])
    assert model_kwargs(args) == {"device": "cpu", "dtype": "float32", "quantize": "w8a16", "kv_cache_dtype": "int8",
                                  "max_model_len": 4096, "rope_scaling_factor": 2.0, "max_num_seqs": 3}


def test_bad_values_are_refused_by_the_parser(capsys):
    for argv in (["--quantize", "w3a16"], ["--kv-cache-dtype", "fp8"], ["--session-len", "many"]):
        with pytest.raises(SystemExit):
            _parse(argv)


def test_quantized_weights_and_int8_cache_through_the_flags(tmp_path):
    folder = make_tiny_llava(tmp_path / "ck", "llama-clip")
    args = _parse(["--device", "cpu", "--dtype", "float32", "--quantize", "w8a16", "--kv-cache-dtype", "int8"])
    model = ChatModel.load(str(folder), **model_kwargs(args))
    try:
        engine = model.loaded.engine
        assert engine.cfg.quantize == "w8a16" and engine.cfg.kv_cache_dtype == "int8"
        proj = engine.model.model.layers[0].self_attn.o_proj
        assert isinstance(getattr(proj, "quant", None), QuantWeight) or isinstance(getattr(proj, "lowp", None),
                                                                                   (CpuInt8Weight, CpuQ8Weight))
        assert engine.model.model.layers[0].self_attn.attn.k_cache.dtype == torch.uint8
        plan = model.plan("", [ChatTurn("user", "Hi", (ChatImage(random_png(), "x.png"),))], 6)
        events = list(model.stream(plan, GenerationSettings(max_new_tokens=6, temperature=0.0)))
        assert events[-1].stats.generated_tokens == 6
    finally:
        model.close()
