"""BERT-style encoders (BERT, MiniLM, ...) as a jaxpref backbone, and their Hugging Face conversion.

The network is Hugging Face's `BertModel` without dropout: word + learned absolute position +
token-type (always type 0) embeddings and a LayerNorm, then post-LN layers of biased self-attention
and a GELU MLP. Layers are stacked with `nn.scan`, so every layer parameter has a leading "layers"
axis.

Position ids come from the attention mask (`layers.positions_from_mask`): 0 at each row's first
real token. For right padding this equals Hugging Face's `arange(L)` on every real token; for left
padding it keeps rewards independent of the padding side, where Hugging Face would shift them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import layers
from jaxpref.models.config import ModelConfig
from jaxpref.models.convert import Arch, Taker, Tensor, to_numpy


def _embed(
  cfg: ModelConfig, num_embeddings: int, axes: tuple[str | None, str], name: str
) -> nn.Embed:
  return nn.Embed(
    num_embeddings=num_embeddings,
    features=cfg.hidden_size,
    dtype=cfg.jnp_dtype,
    param_dtype=cfg.jnp_param_dtype,
    embedding_init=nn.with_logical_partitioning(layers.normal_init(cfg), axes),
    name=name,
  )


class BertLayer(nn.Module):
  """One post-LN encoder layer; a `nn.scan` body: `(hidden, mask) -> (hidden, hidden or None)`."""

  cfg: ModelConfig
  emit_hidden: bool = False

  @nn.compact
  def __call__(self, hidden_bld: jax.Array, mask_b11l: jax.Array):
    cfg = self.cfg

    def project(name: str) -> jax.Array:
      return layers.dense(
        cfg,
        (cfg.num_heads, cfg.dim_per_head),
        ("embed", "heads", "head_dim"),
        use_bias=True,
        name=name,
      )(hidden_bld)

    # Scores and softmax run in float32; masked scores get a large finite negative value, so an
    # all-padding row (a padded response) attends uniformly and stays finite.
    context_blhk = jax.nn.dot_product_attention(
      project("query"), project("key"), project("value"), mask=mask_b11l
    )
    attention_bld = layers.dense(
      cfg,
      cfg.hidden_size,
      ("heads", "head_dim", "embed"),
      use_bias=True,
      name="attention_out",
      in_axis=(-2, -1),
    )(context_blhk)
    hidden_bld = layers.layer_norm(cfg, "attention_ln")(hidden_bld + attention_bld)

    mlp_blf = layers.dense(
      cfg, cfg.intermediate_size, ("embed", "mlp"), use_bias=True, name="mlp_in"
    )(hidden_bld)
    mlp_blf = layers.activation(cfg.hidden_act)(mlp_blf)
    mlp_bld = layers.dense(cfg, cfg.hidden_size, ("mlp", "embed"), use_bias=True, name="mlp_out")(
      mlp_blf
    )
    hidden_bld = layers.layer_norm(cfg, "mlp_ln")(hidden_bld + mlp_bld)
    return hidden_bld, (hidden_bld if self.emit_hidden else None)


class Bert(nn.Module):
  """BERT encoder backbone (see `jaxpref.models.reward_model.RewardModel` for the contract).

  BERT has no final norm (its layers are post-LN), so the last layer's output is both the final
  hidden state and the last entry of `hidden_states`, as in Hugging Face.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    output_hidden_states: bool = False,
  ) -> tuple[jax.Array, jax.Array | None]:
    cfg = self.cfg
    length = input_ids_bl.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(
        f"sequence length {length} exceeds model.max_position_embeddings="
        f"{cfg.max_position_embeddings} of this BERT model; truncate inputs to at most that"
      )
    positions_bl = layers.positions_from_mask(attention_mask_bl)
    word_bld = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids_bl)
    type_bld = _embed(cfg, cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(
      jnp.zeros_like(input_ids_bl)
    )
    position_bld = _embed(cfg, cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
      positions_bl
    )
    # Summed in Hugging Face's order: (word + type) + position.
    embedded_bld = layers.layer_norm(cfg, "embeddings_ln")(word_bld + type_bld + position_bld)

    mask_b11l = (attention_mask_bl > 0)[:, None, None, :]
    stack = layers.scan_layers(BertLayer, cfg, num_broadcast=1, emit_hidden=output_hidden_states)
    hidden_bld, per_layer_nbld = stack(embedded_bld, mask_b11l)
    hidden_states = None
    if output_hidden_states:
      hidden_states = jnp.concatenate([embedded_bld[None], per_layer_nbld], axis=0)
    return hidden_bld, hidden_states


# ---------------------------------------------------------------------------------------------
# Hugging Face conversion (the converter interface of `jaxpref.models.hf_io`). Arrays are numpy;
# HF Linear weights are [out, in], our kernels [in, ..., out].
# ---------------------------------------------------------------------------------------------

HF_PREFIX = "bert"
HF_CLASS = "BertForSequenceClassification"

# The converter table (see `jaxpref.models.convert`): HF name under `bert.`, param path, layout.
TABLE = (
  Tensor("embeddings.word_embeddings.weight", "word_embeddings/embedding", "copy"),
  Tensor("embeddings.position_embeddings.weight", "position_embeddings/embedding", "copy"),
  Tensor("embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding", "copy"),
  Tensor("embeddings.LayerNorm.weight", "embeddings_ln/scale", "flat"),
  Tensor("embeddings.LayerNorm.bias", "embeddings_ln/bias", "flat"),
  *(
    Tensor(f"encoder.layer.{{i}}.{hf}.{leaf}", f"layers/{name}/{param}", layout)
    for hf, name, kernel_layout in (
      ("attention.self.query", "query", "linear"),
      ("attention.self.key", "key", "linear"),
      ("attention.self.value", "value", "linear"),
      ("attention.output.dense", "attention_out", "linear2"),
      ("attention.output.LayerNorm", "attention_ln", "flat"),
      ("intermediate.dense", "mlp_in", "linear"),
      ("output.dense", "mlp_out", "linear"),
      ("output.LayerNorm", "mlp_ln", "flat"),
    )
    for leaf, param, layout in (
      ("weight", "scale" if kernel_layout == "flat" else "kernel", kernel_layout),
      ("bias", "bias", "flat"),
    )
  ),
)
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def config_from_hf(hf_cfg: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig fields of a Hugging Face BERT `config.json`.

  A `BertForSequenceClassification` classifies on the pooler output with a biased classifier, so
  it maps to pooling="pooler", head_bias=True. A `BertModel` (e.g. the sentence-transformers
  MiniLM) maps to pooling="mean", head_bias=False: the pooling sentence-transformers trains such
  encoders with. `jaxpref_pooling` / `jaxpref_head_bias`, written by `hf_config_dict`, win.
  """
  position_type = hf_cfg.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(
      f"position_embedding_type={position_type!r}: only 'absolute' BERT position "
      "embeddings are supported"
    )
  if hf_cfg.get("is_decoder") or hf_cfg.get("add_cross_attention"):
    raise ValueError("is_decoder/add_cross_attention is set: only BERT encoders are supported")
  is_classifier = HF_CLASS in (hf_cfg.get("architectures") or ())
  # Defaults are transformers' BertConfig defaults (old config.json files omit some keys).
  return {
    "arch": "bert",
    "vocab_size": hf_cfg.get("vocab_size", 30522),
    "hidden_size": hf_cfg.get("hidden_size", 768),
    "num_layers": hf_cfg.get("num_hidden_layers", 12),
    "num_heads": hf_cfg.get("num_attention_heads", 12),
    "intermediate_size": hf_cfg.get("intermediate_size", 3072),
    "max_position_embeddings": hf_cfg.get("max_position_embeddings", 512),
    "norm_eps": hf_cfg.get("layer_norm_eps", 1e-12),
    "hidden_act": hf_cfg.get("hidden_act", "gelu"),
    "initializer_range": hf_cfg.get("initializer_range", 0.02),
    "type_vocab_size": hf_cfg.get("type_vocab_size", 2),
    "pad_token_id": hf_cfg.get("pad_token_id", 0),
    "pooling": hf_cfg.get("jaxpref_pooling", "pooler" if is_classifier else "mean"),
    "head_bias": hf_cfg.get("jaxpref_head_bias", is_classifier),
  }


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The architecture fields of a `BertForSequenceClassification` config.json."""
  return {
    "model_type": "bert",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.intermediate_size,
    "hidden_act": cfg.hidden_act,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": cfg.max_position_embeddings,
    "type_vocab_size": cfg.type_vocab_size,
    "initializer_range": cfg.initializer_range,
    "layer_norm_eps": cfg.norm_eps,
    "position_embedding_type": "absolute",
  }


def hf_incompatibility(cfg: ModelConfig) -> str | None:
  """Why transformers would score an exported `cfg` differently (None if it would not)."""
  if cfg.pooling != "pooler":
    return f"{HF_CLASS} classifies the pooler output, but model.pooling={cfg.pooling!r}"
  if cfg.head_dim and cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    return f"{HF_CLASS} needs head_dim * num_heads == hidden_size"
  return None


def _num_checkpoint_layers(tensors: Mapping[str, Any]) -> int:
  found = [int(m.group(1)) for key in tensors if (m := _LAYER_KEY.search(key))]
  return max(found, default=-1) + 1


def check_tensors(tensors: Mapping[str, Any], cfg: ModelConfig) -> None:
  """Only the first `cfg.num_layers` encoder layers are read: fewer truncates the encoder."""
  available = _num_checkpoint_layers(tensors)
  if not 1 <= cfg.num_layers <= available:
    raise ValueError(
      f"model.num_layers={cfg.num_layers} but the checkpoint has {available} encoder layers"
    )


def head_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """The `pooler` (used only if cfg.pooling == "pooler") and `score` params a checkpoint has.

  `bert.pooler.dense.*` -> params["pooler"], `classifier.*` -> params["score"]; what the
  checkpoint lacks (a `BertModel` has no classifier) is left for `load_hf` to initialise.
  """
  take = Taker(tensors, HF_PREFIX, cfg)
  d = cfg.hidden_size
  head: dict[str, Any] = {}
  if cfg.pooling == "pooler" and any(
    k in tensors for k in ("bert.pooler.dense.weight", "pooler.dense.weight")
  ):
    head["pooler"] = {
      "kernel": take("pooler.dense.weight", (d, d)).T,
      "bias": take("pooler.dense.bias", (d,)),
    }
  if "classifier.weight" in tensors:
    head["score"] = {"kernel": take("classifier.weight", (1, d)).T}
    if cfg.head_bias:
      head["score"]["bias"] = take("classifier.bias", (1,))
  return head


def head_params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The `pooler` and `score` params as HF tensors (a head without bias exports a zero bias)."""
  head = to_numpy({k: params[k] for k in ("pooler", "score") if k in params})
  out = {}
  if "pooler" in head:
    out["bert.pooler.dense.weight"] = head["pooler"]["kernel"].T
    out["bert.pooler.dense.bias"] = head["pooler"]["bias"]
  out["classifier.weight"] = head["score"]["kernel"].T
  out["classifier.bias"] = head["score"].get("bias", np.zeros((1,), np.float32))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


ARCH = Arch(
  name="bert",
  backbone=lambda cfg, name: Bert(cfg, name=name),
  model_types=("bert",),
  classes=("BertModel", HF_CLASS),
  hf_prefix=HF_PREFIX,
  config_from_hf=config_from_hf,
  config_to_hf=config_to_hf,
  table=lambda cfg: TABLE,
  decoder=False,
  head_from_hf=head_params_from_hf,
  head_to_hf=head_params_to_hf,
  incompatibility=hf_incompatibility,
  check_tensors=check_tensors,
  export_float32=True,
)
