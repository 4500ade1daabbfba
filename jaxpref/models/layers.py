"""Building blocks shared by the backbones, with logical axis names on every parameter.

Logical axis names used across jaxpref (mapped onto mesh axes by `jaxpref.sharding.LOGICAL_RULES`):
  "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", and None (replicated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.models.config import ModelConfig


def normal_init(cfg: ModelConfig):
  """Hugging Face's default `_init_weights` for linear and embedding layers."""
  return nn.initializers.normal(stddev=cfg.initializer_range)


def dense(
  cfg: ModelConfig,
  features: int | Sequence[int],
  axes: tuple[str | None, ...],
  *,
  use_bias: bool,
  name: str,
  in_axis: int | Sequence[int] = -1,
) -> nn.DenseGeneral:
  """A DenseGeneral whose kernel (and bias) carry logical axis names.

  Args:
    cfg: model config (dtypes, initializer range).
    features: output feature shape.
    axes: logical names of the kernel axes, input axes first.
    use_bias: whether the layer has a bias (bias axes are the output part of `axes`).
    name: parameter scope name.
    in_axis: contracted input axes.
  """
  n_out = 1 if isinstance(features, int) else len(features)
  return nn.DenseGeneral(
    features=features,
    axis=in_axis,
    use_bias=use_bias,
    dtype=cfg.jnp_dtype,
    param_dtype=cfg.jnp_param_dtype,
    kernel_init=nn.with_logical_partitioning(normal_init(cfg), axes),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-n_out:]),
    name=name,
  )


def embed(cfg: ModelConfig, num_embeddings: int, name: str) -> nn.Embed:
  return nn.Embed(
    num_embeddings=num_embeddings,
    features=cfg.hidden_size,
    dtype=cfg.jnp_dtype,
    param_dtype=cfg.jnp_param_dtype,
    embedding_init=nn.with_logical_partitioning(normal_init(cfg), ("vocab", "embed")),
    name=name,
  )


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=cfg.norm_eps,
    # Two-pass variance, as torch computes it: E[x^2] - E[x]^2 loses precision when |mean| >> std.
    use_fast_variance=False,
    dtype=cfg.jnp_dtype,
    param_dtype=cfg.jnp_param_dtype,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
    name=name,
  )


class RMSNorm(nn.Module):
  """RMSNorm with statistics in float32, as transformers computes it.

  Llama-style (`plus_one=False`): the scale multiplies after casting back to the compute dtype.
  Gemma-style (`plus_one=True`): the weight is stored as an offset (init 0) and `x * (1 + w)` is
  computed in float32 before the cast.
  """

  cfg: ModelConfig
  plus_one: bool = False
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(init, (self.axis_name,)),
      (x.shape[-1],),
      self.cfg.jnp_param_dtype,
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    if self.plus_one:
      return (x32 * (1.0 + scale.astype(jnp.float32))).astype(self.cfg.jnp_dtype)
    return scale.astype(self.cfg.jnp_dtype) * x32.astype(self.cfg.jnp_dtype)


def activation(name: str):
  """Activation functions by their Hugging Face `hidden_act` names."""
  table = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
  }
  if name not in table:
    raise ValueError(f"hidden_act={name!r} is not supported; choose one of {sorted(table)}")
  return table[name]


def positions_from_mask(attention_mask_bl: jax.Array) -> jax.Array:
  """Position ids that ignore padding on either side: 0 at each sequence's first real token.

  Hugging Face decoders default to `arange(L)` whatever the padding, so a left-padded batch gets
  shifted positions there; jaxpref makes rewards independent of the padding side instead (the
  parity tests pass these positions to transformers explicitly).
  """
  return jnp.maximum(jnp.cumsum(attention_mask_bl.astype(jnp.int32), axis=-1) - 1, 0)


def causal_padding_mask(attention_mask_bl: jax.Array) -> jax.Array:
  """Boolean attention mask [B, 1, L, L]: query i sees key j iff j <= i and j is a real token.

  Used with `jax.nn.dot_product_attention`, which fills masked scores with a large finite negative
  number, so a row with no visible key (a padded query, or an all-padding response) stays finite.
  """
  length = attention_mask_bl.shape[-1]
  causal_ll = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal_ll[None, None] & (attention_mask_bl > 0)[:, None, None, :]


def causal_segment_mask(
  segment_ids_bl: jax.Array, branch_ids_bl: jax.Array | None = None
) -> jax.Array:
  """[B, 1, L, L] for packed rows: query i sees key j iff j <= i and both are in its segment.

  Segments are numbered from 1 within a row; 0 marks unused slots, which see nothing. With
  `branch_ids_bl` (shared prompts, `jaxpref.data.packing`), a segment is one item: its shared
  prefix (branch 0) followed by each response's own tokens (branches 1, 2, ...); a query also
  needs the key to be in the prefix or in its own branch, so every response sees the prefix and
  itself only, exactly as when it is scored whole.
  """
  length = segment_ids_bl.shape[-1]
  causal_ll = jnp.tril(jnp.ones((length, length), dtype=bool))
  visible_bll = segment_ids_bl[:, :, None] == segment_ids_bl[:, None, :]
  visible_bll &= (segment_ids_bl > 0)[:, None, :]
  if branch_ids_bl is not None:
    same_branch_bll = branch_ids_bl[:, :, None] == branch_ids_bl[:, None, :]
    visible_bll &= same_branch_bll | (branch_ids_bl == 0)[:, None, :]
  return causal_ll[None, None] & visible_bll[:, None]


def decoder_positions_and_mask(
  attention_mask_bl: jax.Array,
  segment_ids_bl: jax.Array | None,
  positions_bl: jax.Array | None,
  branch_ids_bl: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Position ids and the [B, 1, L, L] attention mask of padded or packed (segmented) rows."""
  if segment_ids_bl is None:
    return positions_from_mask(attention_mask_bl), causal_padding_mask(attention_mask_bl)
  if positions_bl is None:
    raise ValueError("packed rows (segment ids) need their positions too")
  return positions_bl, causal_segment_mask(segment_ids_bl, branch_ids_bl)


def sliding_window_mask(mask_b1ll: jax.Array, positions_bl: jax.Array, window: int) -> jax.Array:
  """`mask_b1ll` restricted to the `window` latest keys of each query (the query included).

  transformers tests `kv_idx > q_idx - window` on indices; within one sequence (padded on either
  side, or one segment of a packed row) indices and positions differ by a constant, so positions
  give the same mask and also hold for packed rows and for a response after a shared prompt
  (its positions continue from the prompt's).
  """
  distance_bll = positions_bl[:, :, None] - positions_bl[:, None, :]
  return mask_b1ll & (distance_bll < window)[:, None]


def _attend(
  cfg: ModelConfig,
  query_bqhd: jax.Array,
  key_bkgd: jax.Array,
  value_bkgd: jax.Array,
  mask_b1qk: jax.Array,
) -> jax.Array:
  """Softmax attention with the config's score scale and optional logit soft-cap."""
  scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None
  if not cfg.attn_logit_softcap:
    return jax.nn.dot_product_attention(
      query_bqhd, key_bkgd, value_bkgd, mask=mask_b1qk, scale=scale
    )
  # Gemma-2: cap * tanh(scores / cap) before masking and softmax; not offered by
  # `jax.nn.dot_product_attention`, so written out (scores and softmax in float32).
  b, q, h, d = query_bqhd.shape
  kv = key_bkgd.shape[2]
  query_bqkgd = query_bqhd.reshape(b, q, kv, h // kv, d)
  scores_bkgqs = jnp.einsum(
    "bqkgd,bskd->bkgqs", query_bqkgd, key_bkgd, preferred_element_type=jnp.float32
  )
  scores_bkgqs = scores_bkgqs * (scale if scale is not None else d**-0.5)
  cap = cfg.attn_logit_softcap
  scores_bkgqs = cap * jnp.tanh(scores_bkgqs / cap)
  # A large finite negative (not -inf), as `dot_product_attention`: all-masked rows stay finite.
  scores_bkgqs = jnp.where(mask_b1qk[:, :, None], scores_bkgqs, jnp.finfo(jnp.float32).min)
  probs_bkgqs = jax.nn.softmax(scores_bkgqs, axis=-1).astype(value_bkgd.dtype)
  out_bqkgd = jnp.einsum("bkgqs,bskd->bqkgd", probs_bkgqs, value_bkgd)
  return out_bqkgd.reshape(b, q, h, d)


def causal_attention(
  cfg: ModelConfig,
  query_blhd: jax.Array,
  key_blkd: jax.Array,
  value_blkd: jax.Array,
  mask_b1ll: jax.Array,
) -> jax.Array:
  """Causal self-attention [B, L, H, D] under `mask_b1ll`, dense or in query blocks.

  `cfg.attention == "blocked"` computes query rows [s, e) against keys [0, e) only: the blocks
  above the diagonal are all masked, so skipping them changes nothing but the work. Each block is
  rematerialised, so the backward pass keeps q, k, v instead of every layer's [B, H, L, L]
  probabilities (on CPU, writing and re-reading those was most of the step time). Key/value heads
  may be fewer than query heads (grouped-query attention), as `jax.nn.dot_product_attention`
  allows. Sliding windows live in the mask; soft-capping and the score scale in `_attend`, so
  every path (dense, blocked, packed) applies them.
  """
  length, block = query_blhd.shape[1], cfg.attention_block
  if cfg.attention == "dense" or length <= block:
    return _attend(cfg, query_blhd, key_blkd, value_blkd, mask_b1ll)

  @jax.checkpoint
  def block_attention(q_bqhd, k_bkhd, v_bkhd, mask_b1qk):
    return _attend(cfg, q_bqhd, k_bkhd, v_bkhd, mask_b1qk)

  out_blocks = []
  for start in range(0, length, block):
    end = min(start + block, length)
    out_blocks.append(
      block_attention(
        query_blhd[:, start:end],
        key_blkd[:, :end],
        value_blkd[:, :end],
        mask_b1ll[:, :, start:end, :end],
      )
    )
  return jnp.concatenate(out_blocks, axis=1)


_unroll = [False]


@contextlib.contextmanager
def unrolled_layers() -> Iterator[None]:
  """Models built under this unroll their layer scan (same numbers, no loop): XLA's cost
  analysis counts a loop body once, so `jaxpref.aot` measures per-layer costs this way."""
  _unroll.append(True)
  try:
    yield
  finally:
    _unroll.pop()


def scan_layers(
  layer_cls: type[nn.Module],
  cfg: ModelConfig,
  *,
  num_broadcast: int,
  num_scanned: int = 0,
  name: str = "layers",
  **layer_kwargs,
) -> nn.Module:
  """`cfg.num_layers` copies of `layer_cls` stacked with `nn.scan` (rematerialised if `cfg.remat`).

  The layer is called as `layer(carry, *broadcast_args) -> (carry, per_layer_output)`; every
  parameter gets a leading "layers" axis (logical name "layers").

  Args:
    layer_cls: a linen Module class with a `cfg` attribute.
    cfg: model config (`num_layers`, `remat`).
    num_broadcast: number of arguments after the carry (and the scanned ones), shared by all
      layers.
    num_scanned: number of arguments right after the carry with one entry per layer (leading
      axis of size `cfg.num_layers`).
    name: parameter scope name.
    **layer_kwargs: further attributes of the layer (e.g. whether to emit hidden states).
  """
  if cfg.remat:
    # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE across steps.
    layer_cls = nn.remat(layer_cls, prevent_cse=False)
  scanned = nn.scan(
    layer_cls,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},  # LoRA dropout differs per layer
    in_axes=(0,) * num_scanned + (nn.broadcast,) * num_broadcast,
    length=cfg.num_layers,
    unroll=cfg.num_layers if _unroll[-1] else 1,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  return scanned(cfg=cfg, name=name, **layer_kwargs)


def stack_hidden_states(
  embedded_bld: jax.Array, per_layer_nbld: jax.Array, final_bld: jax.Array
) -> jax.Array:
  """Hugging Face's `output_hidden_states` of a pre-norm decoder as one array [N + 1, B, L, D].

  transformers 5 returns the embeddings, then each layer's output, with the last one replaced by
  the final-norm output (`last_hidden_state`).
  """
  return jnp.concatenate([embedded_bld[None], per_layer_nbld[:-1], final_bld[None]], axis=0)
