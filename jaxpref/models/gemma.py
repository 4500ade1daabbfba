"""Gemma-2 and Gemma-3 (text): the shared decoder with Gemma's switches.

Both scale the embeddings by sqrt(hidden_size), use RMSNorms that multiply by (1 + w) in float32,
norm the attention and MLP outputs as well as their inputs ("sandwich" norms), scale attention
scores by `query_pre_attn_scalar ** -0.5` and use a GeLU-tanh gated MLP. Sliding-window and
full-attention layers alternate as `layer_types` says (Gemma-2: every other layer; Gemma-3: five
sliding layers per full one).
  Gemma-2  attention logits soft-capped as cap * tanh(score / cap) (`attn_logit_softcapping`).
  Gemma-3  RMSNorm of query and key heads; sliding layers use their own RoPE base
           (`rope_local_base_freq`, never scaled), full layers the global one (with its scaling).
The final-logit soft-cap (`final_logit_softcapping`) belongs to the LM head: transformers'
`Gemma2ForSequenceClassification` / `Gemma3TextForSequenceClassification` do not apply it to the
score, and neither does jaxpref.
"""

from __future__ import annotations

from typing import Any

from jaxpref.models import convert, decoder, rope
from jaxpref.models.config import ModelConfig
from jaxpref.models.llama import base_config_to_hf, decoder_fields

GEMMA2 = decoder.Family(norm="rms_plus_one", sandwich_norms=True, embed_scale=True)
GEMMA3 = decoder.Family(norm="rms_plus_one", sandwich_norms=True, embed_scale=True, qk_norm=True)
TABLE = decoder.hf_table(GEMMA2)

_DEFAULTS = dict(
  vocab_size=256000,
  hidden_size=2304,
  num_hidden_layers=26,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=256,
  intermediate_size=9216,
  max_position_embeddings=8192,
  rms_norm_eps=1e-6,
  tie_word_embeddings=True,
  act="gelu_pytorch_tanh",
  bos=2,
  eos=1,
)


def _layer_types(hf_cfg: dict[str, Any], num_layers: int, period: int) -> tuple[str, ...]:
  types = hf_cfg.get("layer_types")
  if not types:
    period = hf_cfg.get("sliding_window_pattern", period)
    types = [
      "sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)
    ]
  return tuple(types)


def _common_from_hf(hf_cfg: dict[str, Any], arch: str, period: int) -> dict[str, Any]:
  if hf_cfg.get("use_bidirectional_attention"):
    raise ValueError("config.json use_bidirectional_attention=true: only causal Gemma is supported")
  fields = decoder_fields(hf_cfg, arch, _DEFAULTS)
  fields["pad_token_id"] = hf_cfg.get("pad_token_id", 0)
  window = hf_cfg.get("sliding_window", 4096)
  return fields | {
    "sliding_window": int(window or 0),
    "layer_types": _layer_types(hf_cfg, fields["num_layers"], period) if window else (),
    "query_pre_attn_scalar": float(hf_cfg.get("query_pre_attn_scalar", 256)),
  }


def _common_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
  return base_config_to_hf(cfg, model_type) | {
    "hidden_activation": cfg.hidden_act,
    "attention_bias": cfg.attention_bias,
    # transformers' config class wants an int here.
    "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar or cfg.dim_per_head),
    "sliding_window": cfg.sliding_window or None,
    "layer_types": ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers],
    "final_logit_softcapping": None,
  }


def gemma2_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  fields = _common_from_hf(hf_cfg, "gemma2", period=2)
  return fields | {"attn_logit_softcap": float(hf_cfg.get("attn_logit_softcapping", 50.0) or 0)}


def gemma2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  fields = _common_to_hf(cfg, "gemma2")
  return fields | {"attn_logit_softcapping": cfg.attn_logit_softcap or None}


def gemma3_config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  if hf_cfg.get("model_type") == "gemma3" or "text_config" in hf_cfg:
    raise ValueError(
      "a multimodal Gemma-3 checkpoint (Gemma3ForConditionalGeneration): jaxpref reads the "
      "text-only Gemma3ForCausalLM / Gemma3TextForSequenceClassification (model_type gemma3_text)"
    )
  by_type = hf_cfg.get("rope_parameters") or {}
  if "full_attention" in by_type:  # transformers 5: one RoPE dict per layer type
    flat = dict(hf_cfg, rope_parameters=by_type["full_attention"], rope_scaling=None)
    local_theta = by_type.get("sliding_attention", {}).get("rope_theta", 10000.0)
  else:
    flat = dict(hf_cfg)
    flat.setdefault("rope_theta", 1_000_000.0)
    local_theta = hf_cfg.get("rope_local_base_freq", 10000.0)
  fields = _common_from_hf(flat, "gemma3", period=6)
  fields |= rope.rope_from_hf(
    flat, theta_keys=("rope_theta",), pct_keys=("partial_rotary_factor",), default_pct=1.0
  )
  if flat.get("attn_logit_softcapping"):
    fields["attn_logit_softcap"] = float(flat["attn_logit_softcapping"])
  return fields | {"rope_local_theta": float(local_theta)}


def gemma3_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  fields = _common_to_hf(cfg, "gemma3_text")
  local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
  return fields | {
    "rope_parameters": {"full_attention": rope.rope_to_hf(cfg), "sliding_attention": local},
    "rope_local_base_freq": local["rope_theta"],
    "attn_logit_softcapping": cfg.attn_logit_softcap or None,
  }


def _arch(name, family, classes, model_type, from_hf, to_hf) -> convert.Arch:
  return convert.Arch(
    name=name,
    backbone=lambda cfg, name: decoder.Decoder(cfg, family, name=name),
    model_types=(model_type,),
    classes=classes,
    hf_prefix="model",
    config_from_hf=from_hf,
    config_to_hf=to_hf,
    table=lambda cfg: TABLE,
  )


ARCHS = (
  _arch(
    "gemma2",
    GEMMA2,
    ("Gemma2ForCausalLM", "Gemma2Model", "Gemma2ForSequenceClassification"),
    "gemma2",
    gemma2_config_from_hf,
    gemma2_config_to_hf,
  ),
  _arch(
    "gemma3",
    GEMMA3,
    ("Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3TextForSequenceClassification"),
    "gemma3_text",
    gemma3_config_from_hf,
    gemma3_config_to_hf,
  ),
)
