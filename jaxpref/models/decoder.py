"""One decoder skeleton for every causal-LM family (GPT-NeoX, Llama, Mistral, Qwen2/3, Gemma-2/3,
Qwen3-MoE).

A family is a `Family`: the Hugging Face names of its modules (kept as parameter names, so the
converter table is a list of renames) and the few structural choices that differ between them
(LayerNorm or RMSNorm, fused QKV, gated MLP, q/k norms, Gemma's sandwich norms and embedding
scale). What a checkpoint sets (sizes, biases, RoPE, sliding windows, soft-caps, experts) is in
`ModelConfig`. The network equals transformers' `*Model` in eval mode; layers are stacked with
`nn.scan` (leading "layers" axis on every layer parameter).

Layers that differ by kind (Gemma's alternating sliding / full attention, with their own RoPE
bases on Gemma-3) stay one scan: each layer gets a per-layer flag that selects its mask and its
rotary angles, both computed once per batch.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpref.models import attention, layers, rope
from jaxpref.models.config import ModelConfig
from jaxpref.models.convert import Tensor


@dataclasses.dataclass(frozen=True)
class Family:
  """Module names and structural choices of one decoder family (hashable: a module attribute)."""

  embed: str = "embed_tokens"
  final_norm: str = "norm"
  attn: str = "self_attn"
  qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # one name: a fused QKV (GPT-NeoX)
  out: str = "o_proj"
  mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # two names: no gate
  norm: str = "rms"  # "rms" (Llama), "rms_plus_one" (Gemma: x * (1 + w)), "layer" (GPT-NeoX)
  # (q/k/v bias, output bias) fixed by the family (Qwen2: True, False); None: cfg.attention_bias.
  attention_bias: tuple[bool, bool] | None = None
  mlp_bias: bool | None = None  # None: cfg.mlp_bias
  qk_norm: bool = False  # RMSNorm over head_dim of queries and keys, before RoPE (Qwen3, Gemma-3)
  sandwich_norms: bool = False  # Gemma: norms after attention and around the MLP too
  embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
  parallel_residual: bool = False  # GPT-NeoX: honour cfg.use_parallel_residual


def _norm(cfg: ModelConfig, family: Family, name: str, axis_name: str = "embed") -> nn.Module:
  if family.norm == "layer":
    return layers.layer_norm(cfg, name)
  return layers.RMSNorm(cfg, plus_one=family.norm == "rms_plus_one", axis_name=axis_name, name=name)


def _biases(cfg: ModelConfig, family: Family) -> tuple[bool, bool]:
  if family.attention_bias is not None:
    return family.attention_bias
  return cfg.attention_bias, cfg.attention_bias


class Attention(nn.Module):
  cfg: ModelConfig
  family: Family

  @nn.compact
  def __call__(
    self, x_bld: jax.Array, vis: attention.Visibility, cos_blr: jax.Array, sin_blr: jax.Array
  ) -> jax.Array:
    cfg, family = self.cfg, self.family
    head_dim = cfg.dim_per_head
    qkv_bias, out_bias = _biases(cfg, family)
    if len(family.qkv) == 1:
      # GPT-NeoX: one kernel [embed, heads, 3, head_dim] (HF rows are (head, q/k/v, head_dim)).
      qkv_blhtd = layers.dense(
        cfg,
        (cfg.num_heads, 3, head_dim),
        ("embed", "heads", None, "head_dim"),
        use_bias=qkv_bias,
        name=family.qkv[0],
      )(x_bld)
      query, key, value = (qkv_blhtd[..., i, :] for i in range(3))
    else:

      def project(name: str, heads: int, axis: str) -> jax.Array:
        return layers.dense(
          cfg, (heads, head_dim), ("embed", axis, "head_dim"), use_bias=qkv_bias, name=name
        )(x_bld)

      query = project(family.qkv[0], cfg.num_heads, "heads")
      key = project(family.qkv[1], cfg.kv_heads, "kv_heads")
      value = project(family.qkv[2], cfg.kv_heads, "kv_heads")
    if family.qk_norm:
      query = _norm(cfg, family, "q_norm", "head_dim")(query)
      key = _norm(cfg, family, "k_norm", "head_dim")(key)
    query = rope.apply_rotary(query, cos_blr, sin_blr)
    key = rope.apply_rotary(key, cos_blr, sin_blr)
    # Query heads are grouped onto kv heads the way `repeat_kv` does.
    out_blhd = attention.attend(cfg, query, key, value, vis)
    return layers.dense(
      cfg,
      cfg.hidden_size,
      ("heads", "head_dim", "embed"),
      use_bias=out_bias,
      name=family.out,
      in_axis=(-2, -1),
    )(out_blhd)


class MLP(nn.Module):
  """Gated (`down(act(gate(x)) * up(x))`) or plain (`down(act(up(x)))`) feed-forward."""

  cfg: ModelConfig
  family: Family

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    cfg, names = self.cfg, self.family.mlp
    bias = cfg.mlp_bias if self.family.mlp_bias is None else self.family.mlp_bias

    def up(name: str) -> jax.Array:
      return layers.dense(cfg, cfg.intermediate_size, ("embed", "mlp"), use_bias=bias, name=name)(
        x_bld
      )

    act = layers.activation(cfg.hidden_act)
    h_blf = act(up(names[0])) * up(names[1]) if len(names) == 3 else act(up(names[0]))
    return layers.dense(cfg, cfg.hidden_size, ("mlp", "embed"), use_bias=bias, name=names[-1])(
      h_blf
    )


class Experts(nn.Module):
  """The stacked expert kernels [experts, embed, mlp] x 2 and [experts, mlp, embed]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    cfg = self.cfg
    e, f, d = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size

    def kernel(name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
      init = nn.with_logical_partitioning(layers.normal_init(cfg), axes)
      return self.param(name, init, shape, cfg.jnp_param_dtype).astype(cfg.jnp_dtype)

    return (
      kernel("gate_proj", (e, d, f), ("experts", "embed", "mlp")),
      kernel("up_proj", (e, d, f), ("experts", "embed", "mlp")),
      kernel("down_proj", (e, f, d), ("experts", "mlp", "embed")),
    )


class MoE(nn.Module):
  """Qwen3-MoE's sparse block: a softmax router picks `num_experts_per_tok` gated-MLP experts.

  Computed densely (every expert on every token, weighted by a routing weight that is 0 for the
  experts not chosen): exact, simple to shard (experts on their own logical axis), and
  `num_experts / num_experts_per_tok` times the FLOPs of a grouped (sparse) dispatch.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_bld: jax.Array) -> jax.Array:
    cfg = self.cfg
    e = cfg.num_experts
    logits_ble = layers.dense(cfg, e, ("embed", None), use_bias=False, name="gate")(x_bld)
    probs_ble = jax.nn.softmax(logits_ble.astype(jnp.float32), axis=-1)
    top_blk, index_blk = jax.lax.top_k(probs_ble, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
      top_blk = top_blk / jnp.sum(top_blk, axis=-1, keepdims=True)
    weights_ble = jnp.sum(jax.nn.one_hot(index_blk, e) * top_blk[..., None], axis=-2)
    weights_ble = weights_ble.astype(cfg.jnp_dtype)

    gate_edf, up_edf, down_efd = Experts(cfg, name="experts")()
    act = layers.activation(cfg.hidden_act)
    h_blef = act(jnp.einsum("bld,edf->blef", x_bld, gate_edf)) * jnp.einsum(
      "bld,edf->blef", x_bld, up_edf
    )
    out_bled = jnp.einsum("blef,efd->bled", h_blef, down_efd)
    return jnp.einsum("bled,ble->bld", out_bled, weights_ble)


class DecoderLayer(nn.Module):
  """One layer; a `nn.scan` body
  `(hidden, sliding, vis, sliding_vis, cos, sin, local_cos, local_sin) -> (hidden, emitted)`.

  With `mixed`, the scanned flag `sliding` selects the sliding window's visibility and the local
  rotary angles; otherwise `vis`, `cos` and `sin` are already this (every) layer's.
  """

  cfg: ModelConfig
  family: Family
  mixed: bool = False
  emit_hidden: bool = False

  @nn.compact
  def __call__(self, hidden_bld, sliding, vis, sliding_vis, cos, sin, cos_l, sin_l):
    cfg, family = self.cfg, self.family
    if self.mixed:
      vis = attention.select(sliding, vis, sliding_vis)
      cos, sin = jnp.where(sliding, cos_l, cos), jnp.where(sliding, sin_l, sin)
    attn = Attention(cfg, family, name=family.attn)
    mlp = MoE(cfg, name="mlp") if cfg.num_experts else MLP(cfg, family, name="mlp")
    attn_bld = attn(_norm(cfg, family, "input_layernorm")(hidden_bld), vis, cos, sin)
    if family.sandwich_norms:
      attn_bld = _norm(cfg, family, "post_attention_layernorm")(attn_bld)
      hidden_bld = hidden_bld + attn_bld
      mlp_bld = mlp(_norm(cfg, family, "pre_feedforward_layernorm")(hidden_bld))
      out_bld = hidden_bld + _norm(cfg, family, "post_feedforward_layernorm")(mlp_bld)
    elif family.parallel_residual and cfg.use_parallel_residual:
      out_bld = mlp(_norm(cfg, family, "post_attention_layernorm")(hidden_bld)) + attn_bld
      out_bld = out_bld + hidden_bld
    else:
      hidden_bld = hidden_bld + attn_bld
      out_bld = hidden_bld + mlp(_norm(cfg, family, "post_attention_layernorm")(hidden_bld))
    return out_bld, (out_bld if self.emit_hidden else None)


def _local_rope_cfg(cfg: ModelConfig) -> ModelConfig:
  """RoPE of the sliding layers: Gemma-3's local base without scaling, else the global one."""
  if not cfg.rope_local_theta:
    return cfg
  return cfg.replace(rope_theta=cfg.rope_local_theta, rope_scaling=None)


class Decoder(nn.Module):
  """A decoder backbone: `(input_ids_bl, attention_mask_bl) -> (hidden_bld, hidden_states)`.

  With `segment_ids_bl` and `positions_bl` (packed rows) each segment attends only to itself;
  with `branch_ids_bl` too (shared prompts), each response to its segment's prompt and itself.
  """

  cfg: ModelConfig
  family: Family

  @nn.compact
  def __call__(
    self,
    input_ids_bl: jax.Array,
    attention_mask_bl: jax.Array,
    *,
    output_hidden_states: bool = False,
    segment_ids_bl: jax.Array | None = None,
    positions_bl: jax.Array | None = None,
    branch_ids_bl: jax.Array | None = None,
  ):
    cfg, family = self.cfg, self.family
    embedded_bld = layers.embed(cfg, cfg.vocab_size, family.embed)(input_ids_bl)
    if family.embed_scale:
      embedded_bld = embedded_bld * jnp.asarray(math.sqrt(cfg.hidden_size), cfg.jnp_dtype)
    # Masks or segment ids, as the attention implementation for this backend and case reads them.
    positions_bl, vis, sliding_vis = attention.visibility(
      cfg,
      attention_mask_bl,
      segment_ids_bl,
      positions_bl,
      branch_ids_bl,
      log=not self.is_initializing(),
    )
    cos_blr, sin_blr = rope.rotary_angles(cfg, positions_bl)
    sliding_n = cfg.sliding_layers
    cos_l, sin_l = cos_blr, sin_blr
    if any(sliding_n) and cfg.rope_local_theta:
      cos_l, sin_l = rope.rotary_angles(_local_rope_cfg(cfg), positions_bl)
    mixed = len(set(sliding_n)) == 2
    if all(sliding_n):  # every layer slides: give them the sliding window and angles directly
      vis, cos_blr, sin_blr = sliding_vis, cos_l, sin_l
    stack = layers.scan_layers(
      DecoderLayer,
      cfg,
      num_scanned=1,
      num_broadcast=6,
      family=family,
      mixed=mixed,
      emit_hidden=output_hidden_states,
    )
    last_bld, per_layer = stack(
      embedded_bld,
      jnp.asarray(sliding_n),
      vis,
      sliding_vis,
      cos_blr,
      sin_blr,
      cos_l,
      sin_l,
    )
    hidden_bld = _norm(cfg, family, family.final_norm)(last_bld)
    if not output_hidden_states:
      return hidden_bld, None
    return hidden_bld, layers.stack_hidden_states(embedded_bld, per_layer, hidden_bld)


_LAYER_NORMS = (
  "input_layernorm",
  "post_attention_layernorm",
  "pre_feedforward_layernorm",
  "post_feedforward_layernorm",
)


def hf_table(family: Family) -> tuple[Tensor, ...]:
  """The converter table of a family: parameter names are the Hugging Face module names.

  Lists every tensor any config of the family may have; `convert` skips the rows whose parameter
  a config lacks (biases, q/k norms, experts).
  """
  rows = [Tensor(f"{family.embed}.weight", f"{family.embed}/embedding", "copy")]

  def module(hf: str, path: str, layout: str) -> list[Tensor]:
    weight = "scale" if layout == "norm" else "kernel"
    layout = "flat" if layout == "norm" else layout
    return [
      Tensor(f"{hf}.weight", f"{path}/{weight}", layout),
      Tensor(f"{hf}.bias", f"{path}/bias", "flat"),
    ]

  rows += module(family.final_norm, family.final_norm, "norm")
  for name in _LAYER_NORMS:
    rows += module(f"layers.{{i}}.{name}", f"layers/{name}", "norm")
  attn = family.attn
  for name in family.qkv:
    rows += module(f"layers.{{i}}.{attn}.{name}", f"layers/{attn}/{name}", "linear")
  for name in ("q_norm", "k_norm"):
    rows += module(f"layers.{{i}}.{attn}.{name}", f"layers/{attn}/{name}", "norm")
  rows += module(f"layers.{{i}}.{attn}.{family.out}", f"layers/{attn}/{family.out}", "linear2")
  for name in family.mlp:
    rows += module(f"layers.{{i}}.mlp.{name}", f"layers/mlp/{name}", "linear")
  rows += module("layers.{i}.mlp.gate", "layers/mlp/gate", "linear")
  for name in ("gate_proj", "up_proj", "down_proj"):
    rows.append(
      Tensor(
        f"layers.{{i}}.mlp.experts.{{e}}.{name}.weight", f"layers/mlp/experts/{name}", "linear"
      )
    )
  return tuple(rows)
