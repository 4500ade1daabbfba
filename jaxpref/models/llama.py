"""Llama-family backbone (Llama 1/2/3, grouped-query attention) and its Hugging Face conversion.

The network is transformers' `LlamaModel` in eval mode: token embeddings, pre-RMSNorm layers with
rotary attention (`rope_theta`, `rope_scaling` of type linear / dynamic / llama3) and a SwiGLU MLP,
then a final RMSNorm. `num_kv_heads < num_heads` gives grouped-query attention (query head h reads
key/value head h // (num_heads / num_kv_heads), as transformers' `repeat_kv`). Layers are stacked
with `nn.scan` (leading "layers" axis on every layer parameter).

Word embeddings tied or not only matters to causal-LM checkpoints: a reward model has no LM head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxpref.models import hf_io, layers, rope
from jaxpref.models.config import ModelConfig

HF_PREFIX = "model"
HF_CLASSES = ("LlamaForCausalLM", "LlamaModel", "LlamaForSequenceClassification")


class LlamaAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, x_bld: jax.Array, mask_b1ll: jax.Array, cos_blr: jax.Array, sin_blr: jax.Array
  ) -> jax.Array:
    cfg = self.cfg
    head_dim, bias = cfg.dim_per_head, cfg.attention_bias
    query_blhd = layers.dense(
      cfg, (cfg.num_heads, head_dim), ("embed", "heads", "head_dim"), use_bias=bias, name="q_proj"
    )(x_bld)
    key_blkd = layers.dense(
      cfg, (cfg.kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), use_bias=bias, name="k_proj"
    )(x_bld)
    value_blkd = layers.dense(
      cfg, (cfg.kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), use_bias=bias, name="v_proj"
    )(x_bld)
    query_blhd = rope.apply_rotary(query_blhd, cos_blr, sin_blr)
    key_blkd = rope.apply_rotary(key_blkd, cos_blr, sin_blr)
    # Query heads are grouped onto kv heads the way `repeat_kv` does.
    out_blhd = layers.causal_attention(cfg, query_blhd, key_blkd, value_blkd, mask_b1ll)
    return layers.dense(
      cfg,
      cfg.hidden_size,
      ("heads", "head_dim", "embed"),
      use_bias=bias,
      name="o_proj",
      in_axis=(-2, -1),
    )(out_blhd)


class LlamaMLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    cfg = self.cfg

    def up(name: str) -> jax.Array:
      return layers.dense(
        cfg, cfg.intermediate_size, ("embed", "mlp"), use_bias=cfg.mlp_bias, name=name
      )(x_bld)

    h_blf = layers.activation(cfg.hidden_act)(up("gate_proj")) * up("up_proj")
    return layers.dense(
      cfg, cfg.hidden_size, ("mlp", "embed"), use_bias=cfg.mlp_bias, name="down_proj"
    )(h_blf)


class LlamaLayer(nn.Module):
  """One layer; a `nn.scan` body `(hidden, mask, cos, sin) -> (hidden, hidden or None)`."""

  cfg: ModelConfig
  emit_hidden: bool = False

  @nn.compact
  def __call__(
    self, hidden_bld: jax.Array, mask_b1ll: jax.Array, cos_blr: jax.Array, sin_blr: jax.Array
  ):
    cfg = self.cfg
    normed_bld = layers.RMSNorm(cfg, name="input_layernorm")(hidden_bld)
    hidden_bld = hidden_bld + LlamaAttention(cfg, name="self_attn")(
      normed_bld, mask_b1ll, cos_blr, sin_blr
    )
    normed_bld = layers.RMSNorm(cfg, name="post_attention_layernorm")(hidden_bld)
    out_bld = hidden_bld + LlamaMLP(cfg, name="mlp")(normed_bld)
    return out_bld, (out_bld if self.emit_hidden else None)


class Llama(nn.Module):
  """The Llama backbone: `(input_ids_bl, attention_mask_bl) -> (hidden_bld, hidden_states)`."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    output_hidden_states: bool = False,
    segment_ids_bl: jax.Array | None = None,
    positions_bl: jax.Array | None = None,
  ):
    cfg = self.cfg
    embedded_bld = layers.embed(cfg, cfg.vocab_size, "embed_tokens")(input_ids_bl)
    positions_bl, mask_b1ll = layers.decoder_positions_and_mask(
      attention_mask_bl, segment_ids_bl, positions_bl
    )
    cos_blr, sin_blr = rope.rotary_angles(cfg, positions_bl)
    stack = layers.scan_layers(LlamaLayer, cfg, num_broadcast=3, emit_hidden=output_hidden_states)
    last_bld, per_layer = stack(embedded_bld, mask_b1ll, cos_blr, sin_blr)
    hidden_bld = layers.RMSNorm(cfg, name="norm")(last_bld)
    if not output_hidden_states:
      return hidden_bld, None
    return hidden_bld, layers.stack_hidden_states(embedded_bld, per_layer, hidden_bld)


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion (the per-arch interface of `jaxpref.models.hf_io`).
# ---------------------------------------------------------------------------------------------


def config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig fields of a `LlamaConfig` dict (defaults are transformers' defaults)."""
  hidden, heads = hf_cfg.get("hidden_size", 4096), hf_cfg.get("num_attention_heads", 32)
  head_dim = hf_cfg.get("head_dim") or hidden // heads
  kv_heads = hf_cfg.get("num_key_value_heads") or heads
  fields = {
    "arch": "llama",
    "vocab_size": hf_cfg.get("vocab_size", 32000),
    "hidden_size": hidden,
    "num_layers": hf_cfg.get("num_hidden_layers", 32),
    "num_heads": heads,
    "num_kv_heads": 0 if kv_heads == heads else kv_heads,
    "head_dim": 0 if head_dim * heads == hidden else head_dim,
    "intermediate_size": hf_cfg.get("intermediate_size", 11008),
    "max_position_embeddings": hf_cfg.get("max_position_embeddings", 2048),
    "norm_eps": hf_cfg.get("rms_norm_eps", 1e-6),
    "hidden_act": hf_cfg.get("hidden_act", "silu"),
    "initializer_range": hf_cfg.get("initializer_range", 0.02),
    "attention_bias": hf_cfg.get("attention_bias", False),
    "mlp_bias": hf_cfg.get("mlp_bias", False),
    "tie_word_embeddings": hf_cfg.get("tie_word_embeddings", False),
  }
  fields.update(
    rope.rope_from_hf(
      hf_cfg, theta_keys=("rope_theta",), pct_keys=("partial_rotary_factor",), default_pct=1.0
    )
  )
  if fields["rotary_pct"] != 1.0:
    raise ValueError(
      f"config.json partial_rotary_factor={fields['rotary_pct']}: Llama "
      "checkpoints with partial rotary embeddings are not supported"
    )
  fields.update(hf_io.special_tokens_from_hf(hf_cfg, bos=1, eos=2))
  return fields


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A `LlamaForSequenceClassification` config.json (num_labels=1) for `cfg`.

  Written in the transformers-5 layout (`rope_parameters`) plus the older `rope_theta` and
  `rope_scaling` so that transformers 4 reads it too.
  """
  return hf_io.seq_cls_config(
    cfg,
    "LlamaForSequenceClassification",
    {
      "model_type": "llama",
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
      "attention_bias": cfg.attention_bias,
      "mlp_bias": cfg.mlp_bias,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_dropout": 0.0,
      "pretraining_tp": 1,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope.rope_to_hf(cfg) if cfg.rope_scaling else None,
      "rope_parameters": rope.rope_to_hf(cfg),
    },
  )


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
  shapes = {
    "input_layernorm.weight": (d,),
    "post_attention_layernorm.weight": (d,),
    "self_attn.q_proj.weight": (q, d),
    "self_attn.k_proj.weight": (kv, d),
    "self_attn.v_proj.weight": (kv, d),
    "self_attn.o_proj.weight": (d, q),
    "mlp.gate_proj.weight": (f, d),
    "mlp.up_proj.weight": (f, d),
    "mlp.down_proj.weight": (d, f),
  }
  if cfg.attention_bias:
    shapes |= {
      "self_attn.q_proj.bias": (q,),
      "self_attn.k_proj.bias": (kv,),
      "self_attn.v_proj.bias": (kv,),
      "self_attn.o_proj.bias": (d,),
    }
  if cfg.mlp_bias:
    shapes |= {"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,), "mlp.down_proj.bias": (d,)}
  return shapes


def _layer_from_hf(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  hd, d = cfg.dim_per_head, cfg.hidden_size

  def split_heads(name: str, heads: int) -> dict[str, np.ndarray]:
    # [heads * head_dim, embed] -> kernel [embed, heads, head_dim].
    p = {"kernel": t[f"self_attn.{name}.weight"].reshape(heads, hd, d).transpose(2, 0, 1)}
    if cfg.attention_bias:
      p["bias"] = t[f"self_attn.{name}.bias"].reshape(heads, hd)
    return p

  def linear(name: str, has_bias: bool) -> dict[str, np.ndarray]:
    p = {"kernel": t[f"{name}.weight"].T}
    if has_bias:
      p["bias"] = t[f"{name}.bias"]
    return p

  o_proj = {"kernel": t["self_attn.o_proj.weight"].T.reshape(cfg.num_heads, hd, d)}
  if cfg.attention_bias:
    o_proj["bias"] = t["self_attn.o_proj.bias"]
  return {
    "input_layernorm": {"scale": t["input_layernorm.weight"]},
    "post_attention_layernorm": {"scale": t["post_attention_layernorm.weight"]},
    "self_attn": {
      "q_proj": split_heads("q_proj", cfg.num_heads),
      "k_proj": split_heads("k_proj", cfg.kv_heads),
      "v_proj": split_heads("v_proj", cfg.kv_heads),
      "o_proj": o_proj,
    },
    "mlp": {
      name: linear(f"mlp.{name}", cfg.mlp_bias) for name in ("gate_proj", "up_proj", "down_proj")
    },
  }


def params_from_hf(tensors: hf_io.Tensors, cfg: ModelConfig) -> dict[str, Any]:
  """Backbone params from the tensors of any Llama checkpoint (with or without `model.`)."""
  take = hf_io.Taker(tensors, HF_PREFIX, cfg)
  d = cfg.hidden_size
  layer_params = (
    _layer_from_hf(
      {name: take(f"layers.{i}.{name}", shape) for name, shape in _shapes(cfg).items()}, cfg
    )
    for i in range(cfg.num_layers)
  )
  return {
    "embed_tokens": {"embedding": take("embed_tokens.weight", (cfg.vocab_size, d))},
    "layers": hf_io.stack_layers(layer_params, cfg.num_layers),
    "norm": {"scale": take("norm.weight", (d,))},
  }


def _layer_to_hf(p: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  d = cfg.hidden_size
  attn = p["self_attn"]
  out = {
    "input_layernorm.weight": p["input_layernorm"]["scale"],
    "post_attention_layernorm.weight": p["post_attention_layernorm"]["scale"],
    "self_attn.o_proj.weight": attn["o_proj"]["kernel"].reshape(-1, d).T,
  }
  for name in ("q_proj", "k_proj", "v_proj"):
    kernel = attn[name]["kernel"]
    out[f"self_attn.{name}.weight"] = kernel.transpose(1, 2, 0).reshape(-1, d)
    if cfg.attention_bias:
      out[f"self_attn.{name}.bias"] = attn[name]["bias"].reshape(-1)
  if cfg.attention_bias:
    out["self_attn.o_proj.bias"] = attn["o_proj"]["bias"]
  for name in ("gate_proj", "up_proj", "down_proj"):
    out[f"mlp.{name}.weight"] = p["mlp"][name]["kernel"].T
    if cfg.mlp_bias:
      out[f"mlp.{name}.bias"] = p["mlp"][name]["bias"]
  return out


def params_to_hf(backbone_params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`model.`-prefixed Hugging Face tensors of the backbone params."""
  p = hf_io.to_numpy(backbone_params)
  out = {"embed_tokens.weight": p["embed_tokens"]["embedding"], "norm.weight": p["norm"]["scale"]}
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda x, i=i: x[i], p["layers"])
    out |= {f"layers.{i}.{k}": v for k, v in _layer_to_hf(layer, cfg).items()}
  return hf_io.with_prefix(out, HF_PREFIX)


def head_params_from_hf(tensors: hf_io.Tensors, cfg: ModelConfig) -> dict[str, Any]:
  return hf_io.score_head_from_hf(tensors, cfg)


def head_params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  return hf_io.score_head_to_hf(params, cfg)


def hf_incompatibility(cfg: ModelConfig) -> str | None:
  return hf_io.last_token_incompatibility(cfg, "LlamaForSequenceClassification")
