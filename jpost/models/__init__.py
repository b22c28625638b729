"""Decoder language models (Llama / Mistral / Qwen2 / Qwen3 / Gemma 2) as pure functions.

See docs/architecture.md ("Models") for the contract; `decoder.py` for the parameter layout.
"""
from jpost.models.config import ModelConfig
from jpost.models.config import get_model_config
from jpost.models.config import model_names
from jpost.models.config import read_model_config_json
from jpost.models.config import write_model_config_json
from jpost.models.decoder import CACHE_AXES
from jpost.models.decoder import apply
from jpost.models.decoder import compute_weights
from jpost.models.decoder import decode_step
from jpost.models.decoder import grow_cache
from jpost.models.decoder import init_cache
from jpost.models.decoder import init_params
from jpost.models.decoder import logits
from jpost.models.decoder import param_logical_axes
from jpost.models.decoder import param_shapes
from jpost.models.decoder import prefill
from jpost.models.decoder import unembedding
from jpost.models.hf import config_from_hf
from jpost.models.hf import config_to_hf
from jpost.models.hf import load_hf
from jpost.models.hf import save_hf

__all__ = [
    "ModelConfig", "get_model_config", "model_names", "read_model_config_json",
    "write_model_config_json", "apply", "compute_weights", "init_params", "logits",
    "param_logical_axes", "param_shapes", "unembedding", "CACHE_AXES", "init_cache", "grow_cache",
    "prefill", "decode_step", "config_from_hf", "config_to_hf", "load_hf", "save_hf",
]
