"""GPT-NeoX (Pythia): the shared decoder with LayerNorms, a fused QKV and parallel residuals.

The network is transformers' `GPTNeoXModel` in eval mode: token embeddings, pre-LN layers with
partial rotary attention (`rotary_pct` of each head) and a GELU MLP, combined either in parallel
(`x + attn(ln1(x)) + mlp(ln2(x))`, Pythia) or sequentially, then a final LayerNorm.

The fused QKV kernel is stored [embed, heads, 3, head_dim]: Hugging Face's `query_key_value.weight`
[3 * hidden, hidden] is, per output row, (head, q/k/v, head_dim), so conversion is a reshape and a
transpose (the "linear" layout of `jaxpref.models.convert`).
"""

from __future__ import annotations

from typing import Any

from jaxpref.models import convert, decoder, rope
from jaxpref.models.config import ModelConfig

FAMILY = decoder.Family(
  embed="embed_in",
  final_norm="final_layer_norm",
  attn="attention",
  qkv=("query_key_value",),
  out="dense",
  mlp=("dense_h_to_4h", "dense_4h_to_h"),
  norm="layer",
  mlp_bias=True,
  parallel_residual=True,
)
TABLE = decoder.hf_table(FAMILY)


def config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig fields of a `GPTNeoXConfig` dict (defaults are transformers' defaults)."""
  hidden, heads = hf_cfg.get("hidden_size", 6144), hf_cfg.get("num_attention_heads", 64)
  if hidden % heads:
    raise ValueError(
      f"config.json hidden_size={hidden} is not divisible by num_attention_heads={heads}"
    )
  fields = {
    "arch": "gpt_neox",
    "vocab_size": hf_cfg.get("vocab_size", 50432),
    "hidden_size": hidden,
    "num_layers": hf_cfg.get("num_hidden_layers", 44),
    "num_heads": heads,
    "intermediate_size": hf_cfg.get("intermediate_size", 24576),
    "max_position_embeddings": hf_cfg.get("max_position_embeddings", 2048),
    "norm_eps": hf_cfg.get("layer_norm_eps", 1e-5),
    "hidden_act": hf_cfg.get("hidden_act", "gelu"),
    "initializer_range": hf_cfg.get("initializer_range", 0.02),
    "use_parallel_residual": hf_cfg.get("use_parallel_residual", True),
    "attention_bias": hf_cfg.get("attention_bias", True),
    "tie_word_embeddings": hf_cfg.get("tie_word_embeddings", False),
  }
  fields.update(
    rope.rope_from_hf(
      hf_cfg,
      theta_keys=("rotary_emb_base", "rope_theta"),
      pct_keys=("rotary_pct", "partial_rotary_factor"),
      default_pct=0.25,
    )
  )
  fields.update(convert.special_tokens_from_hf(hf_cfg, bos=0, eos=2))
  return fields


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The architecture fields of a `GPTNeoXForSequenceClassification` config.json.

  Written in the transformers-5 layout (`rope_parameters`) plus the older top-level keys
  (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) so that transformers 4 reads it too.
  """
  rope_parameters = rope.rope_to_hf(cfg) | {"partial_rotary_factor": cfg.rotary_pct}
  return {
    "model_type": "gpt_neox",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": cfg.hidden_act,
    "max_position_embeddings": cfg.max_position_embeddings,
    "initializer_range": cfg.initializer_range,
    "layer_norm_eps": cfg.norm_eps,
    "use_parallel_residual": cfg.use_parallel_residual,
    "attention_bias": cfg.attention_bias,
    "tie_word_embeddings": cfg.tie_word_embeddings,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "rotary_pct": cfg.rotary_pct,
    "rotary_emb_base": cfg.rope_theta,
    "rope_scaling": rope.rope_to_hf(cfg) if cfg.rope_scaling else None,
    "rope_parameters": rope_parameters,
  }


ARCH = convert.Arch(
  name="gpt_neox",
  backbone=lambda cfg, name: decoder.Decoder(cfg, FAMILY, name=name),
  model_types=("gpt_neox",),
  classes=("GPTNeoXForCausalLM", "GPTNeoXModel", "GPTNeoXForSequenceClassification"),
  hf_prefix="gpt_neox",
  config_from_hf=config_from_hf,
  config_to_hf=config_to_hf,
  table=lambda cfg: TABLE,
  partial_rotary=True,
)
