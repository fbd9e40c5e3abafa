"""engram-moe: DeepSeek's Engram conditional memory inside a Mixture-of-Experts causal LM, for Transformers.

Importing the package registers ``model_type="engram_moe"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, and marks the classes for remote-code export, so that ``save_pretrained`` writes the
modeling files and ``auto_map`` next to the weights.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .compression import build_token_map, check_tokenizer_matches, compressed_vocab_size, token_map_config
from .configuration_engram import EngramMoEConfig
from .modeling_engram import (
    EngramLayer,
    EngramMoEForCausalLM,
    EngramMoEModel,
    EngramMoEPreTrainedModel,
    engram_hash_ids,
    hash_ngrams,
    update_router_biases,
)
from .optim import engram_param_groups
from .presets import PRESETS, get_preset

AutoConfig.register(EngramMoEConfig.model_type, EngramMoEConfig, exist_ok=True)
AutoModel.register(EngramMoEConfig, EngramMoEModel, exist_ok=True)
AutoModelForCausalLM.register(EngramMoEConfig, EngramMoEForCausalLM, exist_ok=True)
EngramMoEConfig.register_for_auto_class()
EngramMoEModel.register_for_auto_class("AutoModel")
EngramMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "EngramLayer",
    "EngramMoEConfig",
    "EngramMoEForCausalLM",
    "EngramMoEModel",
    "EngramMoEPreTrainedModel",
    "build_token_map",
    "check_tokenizer_matches",
    "compressed_vocab_size",
    "engram_hash_ids",
    "engram_param_groups",
    "get_preset",
    "hash_ngrams",
    "token_map_config",
    "update_router_biases",
]
