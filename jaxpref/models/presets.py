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

_QWEN = {
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "hidden_act": "silu",
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "tie_word_embeddings": False,
  "use_sliding_window": False,
}
_QWEN3 = _QWEN | {
  "attention_bias": False,
  "head_dim": 128,
  "max_position_embeddings": 40960,
  "rope_scaling": None,
  "sliding_window": None,
  "vocab_size": 151936,
}
_MISTRAL_7B = {
  "architectures": ["MistralForCausalLM"],
  "model_type": "mistral",
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "tie_word_embeddings": False,
}
_GEMMA = {
  "bos_token_id": 2,
  "eos_token_id": 1,
  "pad_token_id": 0,
  "head_dim": 256,
  "hidden_activation": "gelu_pytorch_tanh",
  "initializer_range": 0.02,
  "query_pre_attn_scalar": 256,
  "rms_norm_eps": 1e-06,
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
  "qwen2.5-7b": _QWEN
  | {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "sliding_window": 131072,
    "vocab_size": 152064,
  },
  "qwen3-8b": _QWEN3
  | {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_window_layers": 36,
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
  },
  # Mixture of experts: 128 experts, 8 per token (30.5B parameters, 3.3B active).
  "qwen3-30b-a3b": _QWEN3
  | {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "decoder_sparse_step": 1,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
  },
  # v0.1 slides a 4096-token window over every layer; v0.3 attends to all of its 32k context.
  "mistral-7b-v0.1": _MISTRAL_7B
  | {"rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000},
  "mistral-7b-v0.3": _MISTRAL_7B
  | {"rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32768},
  "gemma-2-9b": _GEMMA
  | {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 42,
    "num_key_value_heads": 8,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
  },
  # The text part of google/gemma-3-12b-pt (its `text_config`, read as a Gemma3ForCausalLM).
  "gemma-3-12b": _GEMMA
  | {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "max_position_embeddings": 131072,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "rope_theta": 1000000.0,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "vocab_size": 262208,
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
