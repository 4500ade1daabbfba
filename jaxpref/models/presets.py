"""Full-size model shapes by name, as the Hugging Face `config.json` of the published checkpoints.

Training configs use `preset(name)` to get a ModelConfig without the checkpoint at hand (e.g. to
compile for a TPU topology, or to train from scratch); `jaxpref.models.hf_io.load_hf` reads the
same fields from a downloaded checkpoint. Only architecture fields are copied (values from the
`config.json` files on the Hugging Face Hub); `tests/test_param_counts.py` checks that each gives
the parameter count transformers gives.
"""

from __future__ import annotations

from typing import Any

from jaxpref.models import hf_io
from jaxpref.models.config import ModelConfig


def _pythia(hidden: int, layers: int, heads: int, vocab: int) -> dict[str, Any]:
  return {
    "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": hidden,
    "initializer_range": 0.02,
    "intermediate_size": 4 * hidden,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "num_attention_heads": heads,
    "num_hidden_layers": layers,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "use_parallel_residual": True,
    "vocab_size": vocab,
  }


def _llama2(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": hidden,
    "initializer_range": 0.02,
    "intermediate_size": intermediate,
    "max_position_embeddings": 4096,
    "num_attention_heads": heads,
    "num_hidden_layers": layers,
    "num_key_value_heads": heads,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
  }


_LLAMA3_8B = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "attention_bias": False,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 8192,
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": None,
  "rope_theta": 500000.0,
  "tie_word_embeddings": False,
  "vocab_size": 128256,
}

PRESETS: dict[str, dict[str, Any]] = {
  "pythia-1.4b": _pythia(2048, 24, 16, 50304),
  "pythia-2.8b": _pythia(2560, 32, 32, 50304),
  "pythia-6.9b": _pythia(4096, 32, 32, 50432),
  "llama-2-7b": _llama2(4096, 11008, 32, 32),
  "llama-2-13b": _llama2(5120, 13824, 40, 40),
  "llama-3-8b": _LLAMA3_8B,
  # Llama 3.1 8B: the same shapes, 128k context through llama3 RoPE scaling.
  "llama-3.1-8b": _LLAMA3_8B
  | {
    "max_position_embeddings": 131072,
    "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
      "rope_type": "llama3",
    },
  },
}


def preset(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a named full-size model, with field overrides (e.g. dtype="bfloat16").

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
  return hf_io.from_hf(PRESETS[name], **overrides)
