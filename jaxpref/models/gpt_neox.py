"""GPT-NeoX (Pythia) backbone and its Hugging Face conversion.

The network is transformers' `GPTNeoXModel` in eval mode: token embeddings, pre-LN layers with
partial rotary attention (`rotary_pct` of each head) and a GELU MLP, combined either in parallel
(`x + attn(ln1(x)) + mlp(ln2(x))`, Pythia) or sequentially, then a final LayerNorm. Layers are
stacked with `nn.scan` (leading "layers" axis on every layer parameter).

The fused QKV kernel is stored [embed, heads, 3, head_dim]: Hugging Face's `query_key_value.weight`
[3 * hidden, hidden] is, per output row, (head, q/k/v, head_dim), so conversion is a reshape and a
transpose.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxpref.models import hf_io, layers, rope
from jaxpref.models.config import ModelConfig

HF_PREFIX = "gpt_neox"
HF_CLASSES = ("GPTNeoXForCausalLM", "GPTNeoXModel", "GPTNeoXForSequenceClassification")


class GPTNeoXAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(
    self, x_bld: jax.Array, mask_b1ll: jax.Array, cos_blr: jax.Array, sin_blr: jax.Array
  ) -> jax.Array:
    cfg = self.cfg
    qkv_blhtd = layers.dense(
      cfg,
      (cfg.num_heads, 3, cfg.dim_per_head),
      ("embed", "heads", None, "head_dim"),
      use_bias=cfg.attention_bias,
      name="query_key_value",
    )(x_bld)
    query_blhd = rope.apply_rotary(qkv_blhtd[..., 0, :], cos_blr, sin_blr)
    key_blhd = rope.apply_rotary(qkv_blhtd[..., 1, :], cos_blr, sin_blr)
    out_blhd = layers.causal_attention(cfg, query_blhd, key_blhd, qkv_blhtd[..., 2, :], mask_b1ll)
    return layers.dense(
      cfg,
      cfg.hidden_size,
      ("heads", "head_dim", "embed"),
      use_bias=cfg.attention_bias,
      name="dense",
      in_axis=(-2, -1),
    )(out_blhd)


class GPTNeoXMLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    cfg = self.cfg
    h_blf = layers.dense(
      cfg, cfg.intermediate_size, ("embed", "mlp"), use_bias=True, name="dense_h_to_4h"
    )(x_bld)
    h_blf = layers.activation(cfg.hidden_act)(h_blf)
    return layers.dense(
      cfg, cfg.hidden_size, ("mlp", "embed"), use_bias=True, name="dense_4h_to_h"
    )(h_blf)


class GPTNeoXLayer(nn.Module):
  """One layer; a `nn.scan` body `(hidden, mask, cos, sin) -> (hidden, hidden or None)`."""

  cfg: ModelConfig
  emit_hidden: bool = False

  @nn.compact
  def __call__(
    self, hidden_bld: jax.Array, mask_b1ll: jax.Array, cos_blr: jax.Array, sin_blr: jax.Array
  ):
    cfg = self.cfg
    attention = GPTNeoXAttention(cfg, name="attention")
    mlp = GPTNeoXMLP(cfg, name="mlp")
    post_ln = layers.layer_norm(cfg, "post_attention_layernorm")
    attn_bld = attention(
      layers.layer_norm(cfg, "input_layernorm")(hidden_bld), mask_b1ll, cos_blr, sin_blr
    )
    if cfg.use_parallel_residual:
      out_bld = mlp(post_ln(hidden_bld)) + attn_bld + hidden_bld
    else:
      attn_bld = attn_bld + hidden_bld
      out_bld = mlp(post_ln(attn_bld)) + attn_bld
    return out_bld, (out_bld if self.emit_hidden else None)


class GPTNeoX(nn.Module):
  """The GPT-NeoX backbone: `(input_ids_bl, attention_mask_bl) -> (hidden_bld, hidden_states)`."""

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
    embedded_bld = layers.embed(cfg, cfg.vocab_size, "embed_in")(input_ids_bl)
    positions_bl, mask_b1ll = layers.decoder_positions_and_mask(
      attention_mask_bl, segment_ids_bl, positions_bl
    )
    cos_blr, sin_blr = rope.rotary_angles(cfg, positions_bl)
    stack = layers.scan_layers(GPTNeoXLayer, cfg, num_broadcast=3, emit_hidden=output_hidden_states)
    last_bld, per_layer = stack(embedded_bld, mask_b1ll, cos_blr, sin_blr)
    hidden_bld = layers.layer_norm(cfg, "final_layer_norm")(last_bld)
    if not output_hidden_states:
      return hidden_bld, None
    return hidden_bld, layers.stack_hidden_states(embedded_bld, per_layer, hidden_bld)


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion (the per-arch interface of `jaxpref.models.hf_io`).
# ---------------------------------------------------------------------------------------------


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
  fields.update(hf_io.special_tokens_from_hf(hf_cfg, bos=0, eos=2))
  return fields


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A `GPTNeoXForSequenceClassification` config.json (num_labels=1) for `cfg`.

  Written in the transformers-5 layout (`rope_parameters`) plus the older top-level keys
  (`rotary_pct`, `rotary_emb_base`, `rope_scaling`) so that transformers 4 reads it too.
  """
  rope_parameters = rope.rope_to_hf(cfg) | {"partial_rotary_factor": cfg.rotary_pct}
  return hf_io.seq_cls_config(
    cfg,
    "GPTNeoXForSequenceClassification",
    {
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
    },
  )


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  shapes = {
    "input_layernorm.weight": (d,),
    "input_layernorm.bias": (d,),
    "post_attention_layernorm.weight": (d,),
    "post_attention_layernorm.bias": (d,),
    "attention.query_key_value.weight": (3 * d, d),
    "attention.dense.weight": (d, d),
    "mlp.dense_h_to_4h.weight": (f, d),
    "mlp.dense_h_to_4h.bias": (f,),
    "mlp.dense_4h_to_h.weight": (d, f),
    "mlp.dense_4h_to_h.bias": (d,),
  }
  if cfg.attention_bias:
    shapes |= {"attention.query_key_value.bias": (3 * d,), "attention.dense.bias": (d,)}
  return shapes


def _layer_from_hf(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  h, hd, d = cfg.num_heads, cfg.dim_per_head, cfg.hidden_size
  qkv = {"kernel": t["attention.query_key_value.weight"].reshape(h, 3, hd, d).transpose(3, 0, 1, 2)}
  dense = {"kernel": t["attention.dense.weight"].T.reshape(h, hd, d)}
  if cfg.attention_bias:
    qkv["bias"] = t["attention.query_key_value.bias"].reshape(h, 3, hd)
    dense["bias"] = t["attention.dense.bias"]
  return {
    "input_layernorm": {"scale": t["input_layernorm.weight"], "bias": t["input_layernorm.bias"]},
    "post_attention_layernorm": {
      "scale": t["post_attention_layernorm.weight"],
      "bias": t["post_attention_layernorm.bias"],
    },
    "attention": {"query_key_value": qkv, "dense": dense},
    "mlp": {
      "dense_h_to_4h": {
        "kernel": t["mlp.dense_h_to_4h.weight"].T,
        "bias": t["mlp.dense_h_to_4h.bias"],
      },
      "dense_4h_to_h": {
        "kernel": t["mlp.dense_4h_to_h.weight"].T,
        "bias": t["mlp.dense_4h_to_h.bias"],
      },
    },
  }


def params_from_hf(tensors: hf_io.Tensors, cfg: ModelConfig) -> dict[str, Any]:
  """Backbone params from the tensors of any GPT-NeoX checkpoint (with or without `gpt_neox.`)."""
  take = hf_io.Taker(tensors, HF_PREFIX, cfg)
  d = cfg.hidden_size
  layer_params = (
    _layer_from_hf(
      {name: take(f"layers.{i}.{name}", shape) for name, shape in _shapes(cfg).items()}, cfg
    )
    for i in range(cfg.num_layers)
  )
  return {
    "embed_in": {"embedding": take("embed_in.weight", (cfg.vocab_size, d))},
    "layers": hf_io.stack_layers(layer_params, cfg.num_layers),
    "final_layer_norm": {
      "scale": take("final_layer_norm.weight", (d,)),
      "bias": take("final_layer_norm.bias", (d,)),
    },
  }


def _layer_to_hf(p: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  d = cfg.hidden_size
  attn = p["attention"]
  out = {
    "input_layernorm.weight": p["input_layernorm"]["scale"],
    "input_layernorm.bias": p["input_layernorm"]["bias"],
    "post_attention_layernorm.weight": p["post_attention_layernorm"]["scale"],
    "post_attention_layernorm.bias": p["post_attention_layernorm"]["bias"],
    "attention.query_key_value.weight": attn["query_key_value"]["kernel"]
    .transpose(1, 2, 3, 0)
    .reshape(3 * d, d),
    "attention.dense.weight": attn["dense"]["kernel"].reshape(d, d).T,
    "mlp.dense_h_to_4h.weight": p["mlp"]["dense_h_to_4h"]["kernel"].T,
    "mlp.dense_h_to_4h.bias": p["mlp"]["dense_h_to_4h"]["bias"],
    "mlp.dense_4h_to_h.weight": p["mlp"]["dense_4h_to_h"]["kernel"].T,
    "mlp.dense_4h_to_h.bias": p["mlp"]["dense_4h_to_h"]["bias"],
  }
  if cfg.attention_bias:
    out["attention.query_key_value.bias"] = attn["query_key_value"]["bias"].reshape(3 * d)
    out["attention.dense.bias"] = attn["dense"]["bias"]
  return out


def params_to_hf(backbone_params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """`gpt_neox.`-prefixed Hugging Face tensors of the backbone params."""
  p = hf_io.to_numpy(backbone_params)
  out = {
    "embed_in.weight": p["embed_in"]["embedding"],
    "final_layer_norm.weight": p["final_layer_norm"]["scale"],
    "final_layer_norm.bias": p["final_layer_norm"]["bias"],
  }
  for i in range(cfg.num_layers):
    layer = jax.tree.map(lambda x, i=i: x[i], p["layers"])
    out |= {f"layers.{i}.{k}": v for k, v in _layer_to_hf(layer, cfg).items()}
  return hf_io.with_prefix(out, HF_PREFIX)


def head_params_from_hf(tensors: hf_io.Tensors, cfg: ModelConfig) -> dict[str, Any]:
  return hf_io.score_head_from_hf(tensors, cfg)


def head_params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  return hf_io.score_head_to_hf(params, cfg)


def hf_incompatibility(cfg: ModelConfig) -> str | None:
  return hf_io.last_token_incompatibility(cfg, "GPTNeoXForSequenceClassification")
