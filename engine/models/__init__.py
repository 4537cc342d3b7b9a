"""Language-model families, keyed by the `model_type` of a config.json (or a llava `text_config`).

Each entry: the module class and the family's default for q/k/v bias when the config does not say (Qwen2 has
q/k/v biases and no `attention_bias` key; Llama and Mistral have neither). Mistral's decoder is Llama's; its sliding
window caps the context instead (engine.config.TextConfig).
"""
from engine.models.decoder import PACKED, CausalLM

MODELS = {
    "llama": (CausalLM, False),
    "qwen2": (CausalLM, True),
    "mistral": (CausalLM, False),
}

__all__ = ["MODELS", "PACKED", "CausalLM"]
