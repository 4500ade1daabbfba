"""Llama and the families built like it: Mistral, Qwen2/2.5, Qwen3 and Qwen3-MoE.

All are the shared decoder (`jaxpref.models.decoder`) with pre-RMSNorm layers, rotary attention
with grouped-query heads and a SwiGLU MLP; they differ in a few switches:
  Llama     biases on q/k/v/o (`attention_bias`) and on the MLP (`mlp_bias`); RoPE scaling types
            linear / dynamic / llama3.
  Mistral   a sliding window on every layer (`sliding_window`).
  Qwen2     biases on q/k/v only (never on o); a sliding window on the layers `layer_types` marks
            (off unless `use_sliding_window`).
  Qwen3     RMSNorm of each query and key head (q_norm / k_norm) before RoPE; `head_dim` set
            independently of hidden_size.
  Qwen3-MoE Qwen3 whose MLPs are softmax-routed mixtures of experts (every layer sparse).
Word embeddings tied or not only matters to causal-LM checkpoints: a reward model has no LM head.
"""

from __future__ import annotations

from typing import Any

from jaxpref.models import convert, decoder, rope
from jaxpref.models.config import ModelConfig

LLAMA = decoder.Family()
QWEN2 = decoder.Family(attention_bias=(True, False))
QWEN3 = decoder.Family(qk_norm=True)
TABLE = decoder.hf_table(LLAMA)  # the same names for every family in this module


def decoder_fields(hf_cfg: dict[str, Any], arch: str, defaults: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig fields shared by the Llama-like families (`defaults`: transformers' defaults)."""

  def get(key: str):
    value = hf_cfg.get(key)
    return defaults.get(key) if value is None else value

  hidden, heads = get("hidden_size"), get("num_attention_heads")
  head_dim = get("head_dim") or hidden // heads
  kv_heads = get("num_key_value_heads") or heads
  fields = {
    "arch": arch,
    "vocab_size": get("vocab_size"),
    "hidden_size": hidden,
    "num_layers": get("num_hidden_layers"),
    "num_heads": heads,
    "num_kv_heads": 0 if kv_heads == heads else kv_heads,
    "head_dim": 0 if head_dim * heads == hidden else head_dim,
    "intermediate_size": get("intermediate_size"),
    "max_position_embeddings": get("max_position_embeddings"),
    "norm_eps": get("rms_norm_eps"),
    "hidden_act": (hf_cfg.get("hidden_activation") or hf_cfg.get("hidden_act") or defaults["act"]),
    "initializer_range": hf_cfg.get("initializer_range", 0.02),
    "attention_bias": bool(hf_cfg.get("attention_bias", False)),
    "mlp_bias": bool(hf_cfg.get("mlp_bias", False)),
    "tie_word_embeddings": bool(get("tie_word_embeddings")),
  }
  fields.update(
    rope.rope_from_hf(
      hf_cfg, theta_keys=("rope_theta",), pct_keys=("partial_rotary_factor",), default_pct=1.0
    )
  )
  if fields["rotary_pct"] != 1.0:
    raise ValueError(
      f"config.json partial_rotary_factor={fields['rotary_pct']}: {arch} "
      "checkpoints with partial rotary embeddings are not supported"
    )
  fields.update(convert.special_tokens_from_hf(hf_cfg, bos=defaults["bos"], eos=defaults["eos"]))
  return fields


def sliding_fields(hf_cfg: dict[str, Any], num_layers: int, *, qwen: bool) -> dict[str, Any]:
  """`sliding_window` and `layer_types` from config.json (Mistral: every layer; Qwen: as marked)."""
  window = hf_cfg.get("sliding_window")
  if qwen and not hf_cfg.get("use_sliding_window", False):
    window = None
  if not window:
    return {"sliding_window": 0, "layer_types": ()}
  types = hf_cfg.get("layer_types")
  if qwen and not types and "max_window_layers" in hf_cfg:
    first = hf_cfg["max_window_layers"]
    types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
  return {"sliding_window": int(window), "layer_types": tuple(types or ())}


def base_config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  """config.json fields of a Llama-like family, in the transformers-5 layout (`rope_parameters`)
  plus the older `rope_theta` and `rope_scaling` so that transformers 4 reads it too."""
  return {
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.dim_per_head,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": cfg.hidden_act,
    "max_position_embeddings": cfg.max_position_embeddings,
    "initializer_range": cfg.initializer_range,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "attention_dropout": 0.0,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": rope.rope_to_hf(cfg) if cfg.rope_scaling else None,
    "rope_parameters": rope.rope_to_hf(cfg),
  }


def _layer_types(cfg: ModelConfig) -> list[str]:
  return ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]


# --- Llama --------------------------------------------------------------------------------------

_LLAMA_DEFAULTS = dict(
  vocab_size=32000,
  hidden_size=4096,
  num_hidden_layers=32,
  num_attention_heads=32,
  intermediate_size=11008,
  max_position_embeddings=2048,
  rms_norm_eps=1e-6,
  tie_word_embeddings=False,
  act="silu",
  bos=1,
  eos=2,
)


def llama_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  return decoder_fields(hf_cfg, "llama", _LLAMA_DEFAULTS)


def llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  fields = base_config_to_hf(cfg, "llama")
  return fields | {
    "attention_bias": cfg.attention_bias,
    "mlp_bias": cfg.mlp_bias,
    "pretraining_tp": 1,
  }


# --- Mistral ------------------------------------------------------------------------------------


def mistral_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  defaults = _LLAMA_DEFAULTS | dict(
    intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32
  )
  fields = decoder_fields(hf_cfg, "mistral", defaults)
  window = hf_cfg.get("sliding_window", 4096)
  return fields | {"sliding_window": int(window or 0)}


def mistral_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  if cfg.layer_types and not all(cfg.sliding_layers):
    raise ValueError("Mistral slides on every layer; model.layer_types mixes full and sliding")
  return base_config_to_hf(cfg, "mistral") | {"sliding_window": cfg.sliding_window or None}


# --- Qwen2 / Qwen3 / Qwen3-MoE --------------------------------------------------------------------

_QWEN_DEFAULTS = _LLAMA_DEFAULTS | dict(
  vocab_size=151936,
  intermediate_size=22016,
  num_key_value_heads=32,
  max_position_embeddings=32768,
  bos=None,
  eos=None,
)


def _qwen_from_hf(hf_cfg: dict[str, Any], arch: str, defaults: dict[str, Any]) -> dict[str, Any]:
  fields = decoder_fields(hf_cfg, arch, defaults)
  return fields | sliding_fields(hf_cfg, fields["num_layers"], qwen=True)


def _qwen_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  return base_config_to_hf(cfg, model_type) | {
    "use_sliding_window": bool(cfg.sliding_window),
    "sliding_window": cfg.sliding_window or None,
    "max_window_layers": cfg.num_layers,
    "layer_types": _layer_types(cfg),
  }


def qwen2_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  return _qwen_from_hf(hf_cfg, "qwen2", _QWEN_DEFAULTS)


def qwen2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return _qwen_to_hf(cfg, "qwen2")


def qwen3_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  return _qwen_from_hf(hf_cfg, "qwen3", _QWEN_DEFAULTS | {"head_dim": 128})


def qwen3_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return _qwen_to_hf(cfg, "qwen3") | {"attention_bias": cfg.attention_bias}


def qwen3_moe_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  defaults = _QWEN_DEFAULTS | dict(
    hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, num_key_value_heads=4
  )
  fields = decoder_fields(hf_cfg, "qwen3_moe", defaults)
  if hf_cfg.get("decoder_sparse_step", 1) != 1 or hf_cfg.get("mlp_only_layers"):
    raise ValueError(
      "config.json decoder_sparse_step != 1 or mlp_only_layers: Qwen3-MoE checkpoints with dense "
      "layers among the sparse ones are not supported"
    )
  window = hf_cfg.get("sliding_window") if hf_cfg.get("use_sliding_window") else None
  return fields | {
    # transformers 5 writes `num_local_experts`; older files `num_experts`.
    "num_experts": hf_cfg.get("num_local_experts") or hf_cfg.get("num_experts") or 128,
    "num_experts_per_tok": hf_cfg.get("num_experts_per_tok", 8),
    "moe_intermediate_size": hf_cfg.get("moe_intermediate_size", 768),
    "norm_topk_prob": bool(hf_cfg.get("norm_topk_prob", False)),
    "sliding_window": int(window or 0),
  }


def qwen3_moe_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  if cfg.layer_types and not all(cfg.sliding_layers):
    raise ValueError("Qwen3-MoE slides on every layer or none; model.layer_types mixes them")
  return base_config_to_hf(cfg, "qwen3_moe") | {
    "attention_bias": cfg.attention_bias,
    "use_sliding_window": bool(cfg.sliding_window),
    "sliding_window": cfg.sliding_window or None,
    "num_experts": cfg.num_experts,
    "num_local_experts": cfg.num_experts,
    "num_experts_per_tok": cfg.num_experts_per_tok,
    "moe_intermediate_size": cfg.moe_intermediate_size,
    "norm_topk_prob": cfg.norm_topk_prob,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
  }


def _arch(name: str, family: decoder.Family, hf: str, model_type: str, from_hf, to_hf):
  return convert.Arch(
    name=name,
    backbone=lambda cfg, name: decoder.Decoder(cfg, family, name=name),
    model_types=(model_type,),
    classes=(f"{hf}ForCausalLM", f"{hf}Model", f"{hf}ForSequenceClassification"),
    hf_prefix="model",
    config_from_hf=from_hf,
    config_to_hf=to_hf,
    table=lambda cfg: TABLE,
  )


ARCHS = (
  _arch("llama", LLAMA, "Llama", "llama", llama_config_from_hf, llama_config_to_hf),
  _arch("mistral", LLAMA, "Mistral", "mistral", mistral_config_from_hf, mistral_config_to_hf),
  _arch("qwen2", QWEN2, "Qwen2", "qwen2", qwen2_config_from_hf, qwen2_config_to_hf),
  _arch("qwen3", QWEN3, "Qwen3", "qwen3", qwen3_config_from_hf, qwen3_config_to_hf),
  _arch(
    "qwen3_moe", QWEN3, "Qwen3Moe", "qwen3_moe", qwen3_moe_config_from_hf, qwen3_moe_config_to_hf
  ),
)
