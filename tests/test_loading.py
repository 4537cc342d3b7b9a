"""Loading checkpoints: stop tokens from wherever the checkpoint keeps them (or nowhere), and the dtype policy."""
import json

import pytest

from engine.chat import ChatImage, ChatModel, ChatTurn, GenerationSettings
from engine.families import engine_config, load_model
from tests.tiny_checkpoints import make_tiny_llava, random_png


def test_a_checkpoint_with_no_eos_anywhere_loads_and_answers(tmp_path):
    folder = make_tiny_llava(tmp_path / "noeos", "llama-clip")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = None  # explicit: LlamaConfig would fill in its default of 2
    (folder / "config.json").write_text(json.dumps(config))
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.pop("eos_token_id", None)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("eos_token", None)
            path.write_text(json.dumps(data))
    loaded = load_model(str(folder), "cpu", "float32")
    assert loaded.engine.eos_token_ids == frozenset()
    model = ChatModel(loaded)
    try:
        plan = model.plan("", [ChatTurn("user", "Hi", (ChatImage(random_png(), "x.png"),))], 8)
        events = list(model.stream(plan, GenerationSettings(max_new_tokens=8, temperature=0.0)))
        assert events[-1].stats.finish_reason == "length" and events[-1].stats.generated_tokens == 8
    finally:
        model.close()


def test_dtype_policy():
    from engine.quant.policy import cpu_policy

    policy = cpu_policy()  # measured once per process: the CPU's auto follows it
    auto = engine_config("cpu", "auto")
    assert (auto.dtype, auto.decode_weight_dtype, auto.quantize) == (policy.dtype, policy.decode_weight_dtype, "auto")
    assert policy.dtype == "bfloat16" or policy.decode_weight_dtype in ("bfloat16", None)
    exact = engine_config("cpu", "float32")
    assert exact.dtype == "float32" and exact.decode_weight_dtype is None and exact.quantize is None
    assert engine_config("cuda", "auto").dtype == "bfloat16"
    assert engine_config("cpu", "bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError):
        engine_config("cpu", "int3")


@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(dtype="float32", decode_weight_dtype="bfloat16"),
                                dict(dtype="bfloat16", quantize="w8a16")], ids=str)
def test_tied_checkpoint_that_also_stores_its_head_loads_on_cpu(kw):
    # Some tied checkpoints keep a dense lm_head.weight beside the embedding; the CPU placement once took it for a
    # quantized head and crashed.
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from engine.config import EngineConfig, TextConfig
    from engine.llm_engine import LLMEngine
    from engine.models import MODELS
    from engine.sampling_params import SamplingParams

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    state = AutoModelForCausalLM.from_config(cfg).state_dict()
    assert "lm_head.weight" in state
    engine = LLMEngine(TextConfig.from_dict(cfg.to_dict(), MODELS["qwen2"][1]), state, None, EngineConfig(**kw))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()
