"""Causal self-attention of the decoders, per backend: which implementation runs, and what it reads.

`model.attention` names the implementation:

  auto     the fastest exact one for the backend the step is compiled for: `cudnn` on GPU,
           `splash` on TPU, `blocked` on CPU.
  blocked  XLA, queries in blocks of `attention_block` rows, upper-triangle blocks skipped and each
           block rematerialised (`layers.causal_attention`; tuned for the CPU).
  dense    XLA, one `jax.nn.dot_product_attention` over all of L.
  cudnn    `jax.nn.dot_product_attention(..., implementation="cudnn")`: cuDNN's fused (flash)
           attention on NVIDIA GPUs; causal, the rest of the mask (padding, packed segments,
           shared-prompt branches, sliding windows) given as a bias.
  splash   the Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`):
           causal (or local, for sliding windows) block-sparse mask plus segment ids (padded rows:
           1 on real tokens; packed rows: their segments); shared prompts as two splash calls
           combined by their log-sum-exp (`_splash_cascade`). Off TPU it runs in Pallas
           interpret mode (slow; for tests).

A kernel that cannot express a case falls back to `blocked` for that call, the same way every
time, with one log line saying why: cuDNN needs bf16/fp16, a head dim that is a multiple of 8 (at
most 128, 256 on Hopper), an even length and no logit soft-cap; splash cannot express a sliding
window in packed rows (it measures windows in indices, jaxpref in positions), and on several
devices it runs only per shard, inside a `kernel_mesh` (the train step traces under its mesh).

What a query may see travels through the decoder as one `Visibility`: the dense [B, 1, L, L] mask
for the XLA and cuDNN paths, segment ids for splash; building the mask is skipped where no path
reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxpref.models import layers
from jaxpref.models.config import ModelConfig

# What `auto` becomes on each backend (anything else: `blocked`).
AUTO = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "blocked", "tpu": "splash", "cpu": "blocked"}
KERNELS = ("cudnn", "splash")

_logged: set[str] = set()
_mesh_stack: list[jax.sharding.Mesh] = []


def _log_once(message: str) -> None:
  if message not in _logged:
    _logged.add(message)
    logging.info("%s", message)


@contextlib.contextmanager
def kernel_mesh(mesh: jax.sharding.Mesh | None) -> Iterator[None]:
  """While tracing under this, kernels run per shard of `mesh` (`jax.shard_map`) and `auto`
  resolves for its devices' platform (a TPU topology compiled ahead of time on a CPU host)."""
  if mesh is None:
    yield
    return
  _mesh_stack.append(mesh)
  try:
    yield
  finally:
    _mesh_stack.pop()


def platform() -> str:
  """The platform the code being traced is compiled for: the kernel mesh's devices, else the
  default backend."""
  if _mesh_stack:
    return _mesh_stack[-1].devices.flat[0].platform
  return jax.default_backend()


def resolve(name: str, backend: str | None = None) -> str:
  """`auto` -> the implementation for `backend` (default: `platform()`); other names unchanged."""
  if name != "auto":
    return name
  return AUTO.get(backend or platform(), "blocked")


def _cudnn_head_dim_limit() -> int:
  try:
    major = int(str(jax.devices()[0].compute_capability).split(".")[0])
  except (AttributeError, ValueError, IndexError, RuntimeError):
    return 128
  return 256 if major >= 9 else 128


def why_not(cfg: ModelConfig, kernel: str, *, length: int) -> str | None:
  """Why `kernel` cannot compute this call exactly, or None when it can."""
  if kernel == "cudnn":
    if cfg.dtype not in ("bfloat16", "float16"):
      return f"cuDNN attention needs bfloat16 or float16 (model.dtype={cfg.dtype})"
    limit = _cudnn_head_dim_limit()
    if cfg.dim_per_head % 8 or cfg.dim_per_head > limit:
      return f"cuDNN attention needs a head dim that is a multiple of 8 and <= {limit}"
    if cfg.attn_logit_softcap:
      return "cuDNN attention has no logit soft-cap"
    if length % 2:
      return f"cuDNN attention with a mask needs an even length (got {length})"
  return None


def choose(cfg: ModelConfig, *, length: int, packed: bool, log: bool = True) -> str:
  """The implementation that runs this call: `model.attention` resolved, or `blocked` (logged
  once; `log=False` for traces that compute nothing, such as parameter initialisation) where
  the kernel cannot express the case."""
  impl = resolve(cfg.attention)
  if cfg.attention == "auto" and log:
    _log_once(f"model.attention=auto: {impl} on {platform()}")
  reason = why_not(cfg, impl, length=length)
  if reason is None and impl == "splash" and packed and any(cfg.sliding_layers):
    reason = "splash attention measures sliding windows in indices, not packed positions"
  if reason is None and impl == "splash" and not _mesh_stack and jax.device_count() > 1:
    # XLA cannot partition a Pallas kernel: without shard_map every device would gather and
    # compute every row. Callers that shard a batch trace under `kernel_mesh(mesh)`.
    reason = f"splash attention on {jax.device_count()} devices needs a kernel mesh"
  if reason is not None:
    if log:
      _log_once(f"model.attention={impl}: falling back to blocked ({reason})")
    return "blocked"
  return impl


@flax.struct.dataclass
class Visibility:
  """What each query may see, in the form that `impl` reads.

  Attributes:
    mask_b1ll: bool [B, 1, L, L] (XLA and cuDNN paths), or None.
    segment_ids_bl: int32 [B, L] (splash): a query sees the earlier keys of its segment.
    sliding: traced bool scalar, or None: per-layer choice between the full and the sliding
      window (splash on mixed layers; the mask paths select their mask instead).
    branch_ids_bl: int32 [B, L] (splash, shared prompts): see `_splash_cascade`.
    impl: the implementation that runs ("blocked", "dense", "cudnn", "splash").
    window: splash's sliding window (0: none; with `sliding`, applies where it is true).
  """

  mask_b1ll: jax.Array | None
  segment_ids_bl: jax.Array | None
  sliding: jax.Array | None = None
  branch_ids_bl: jax.Array | None = None
  impl: str = flax.struct.field(pytree_node=False, default="blocked")
  window: int = flax.struct.field(pytree_node=False, default=0)


def visibility(
  cfg: ModelConfig,
  attention_mask_bl: jax.Array,
  segment_ids_bl: jax.Array | None,
  positions_bl: jax.Array | None,
  branch_ids_bl: jax.Array | None,
  *,
  log: bool = True,
) -> tuple[jax.Array, Visibility, Visibility]:
  """Positions, and what full-attention and sliding-window layers see, for padded or packed rows."""
  length = attention_mask_bl.shape[-1]
  packed = segment_ids_bl is not None
  impl = choose(cfg, length=length, packed=packed, log=log)
  if impl != "splash":
    positions_bl, mask_b1ll = layers.decoder_positions_and_mask(
      attention_mask_bl, segment_ids_bl, positions_bl, branch_ids_bl
    )
    full = Visibility(mask_b1ll, None, impl=impl)
    sliding = full
    if any(cfg.sliding_layers):
      sliding_mask = layers.sliding_window_mask(mask_b1ll, positions_bl, cfg.sliding_window)
      sliding = Visibility(sliding_mask, None, impl=impl)
    return positions_bl, full, sliding
  if packed:
    if positions_bl is None:
      raise ValueError("packed rows (segment ids) need their positions too")
  else:
    positions_bl = layers.positions_from_mask(attention_mask_bl)
    # Padding is segment 0, real tokens segment 1: a real query never sees a padding key (and a
    # padding query sees padding only: never read, and never an empty softmax row).
    segment_ids_bl = (attention_mask_bl > 0).astype(jnp.int32)
  branch_ids_bl = None if branch_ids_bl is None else branch_ids_bl.astype(jnp.int32)
  full = Visibility(None, segment_ids_bl.astype(jnp.int32), branch_ids_bl=branch_ids_bl, impl=impl)
  return positions_bl, full, full.replace(window=cfg.sliding_window)


def select(sliding: jax.Array, full: Visibility, sliding_vis: Visibility) -> Visibility:
  """One layer's visibility in a scan whose layers mix full and sliding attention."""
  if full.impl == "splash":
    return sliding_vis.replace(sliding=sliding)
  return full.replace(mask_b1ll=jnp.where(sliding, sliding_vis.mask_b1ll, full.mask_b1ll))


def attend(
  cfg: ModelConfig,
  query_blhd: jax.Array,
  key_blkd: jax.Array,
  value_blkd: jax.Array,
  vis: Visibility,
) -> jax.Array:
  """Causal self-attention [B, L, H, D] by `vis.impl` (grouped-query heads allowed)."""
  if vis.impl == "cudnn":
    return _cudnn(cfg, query_blhd, key_blkd, value_blkd, vis.mask_b1ll)
  if vis.impl == "splash":
    return _splash(cfg, query_blhd, key_blkd, value_blkd, vis)
  # "auto"/"cudnn"/"splash" configs that fell back run the blocked path; "dense" stays dense.
  return layers.causal_attention(cfg, query_blhd, key_blkd, value_blkd, vis.mask_b1ll)


def _scale(cfg: ModelConfig) -> float:
  return (cfg.query_pre_attn_scalar or cfg.dim_per_head) ** -0.5


def _cudnn(cfg, query_blhd, key_blkd, value_blkd, mask_b1ll):
  # Causal lets cuDNN skip the blocks above the diagonal; the mask (padding, segments, branches,
  # sliding windows) becomes an additive bias that cuDNN reads block by block.
  return jax.nn.dot_product_attention(
    query_blhd,
    key_blkd,
    value_blkd,
    mask=mask_b1ll,
    scale=_scale(cfg),
    is_causal=True,
    implementation="cudnn",
  )


def _block(length: int) -> int:
  return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_kernel(length: int, groups: int, window: int, softcap: float, interpret: bool):
  """One kv head's splash kernel over its `groups` query heads (multi-query form).

  Made anew at each trace (not cached): the kernel holds its block mask as arrays, which would
  leak from one trace into the next.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  if window:
    head_mask = sa.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  else:
    head_mask = sa.CausalMask((length, length))
  block = _block(length)
  sizes = sa.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return sa.make_splash_mqa(
    sa.MultiHeadMask([head_mask] * groups),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    attn_logits_soft_cap=softcap or None,
    interpret=interpret,
  )


def _splash_local(
  cfg, window, interpret, query_blhd, key_blkd, value_blkd, segment_bl, sliding, branch_bl
):
  """Splash on this device's rows: [b, L, H, D] -> [b, L, H, D]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b, length, h, d = query_blhd.shape
  kv = key_blkd.shape[2]
  # Lengths padded to whole 128-lane blocks; the padding is its own segment (-1), seen by no
  # real query (and after every real key, so causally hidden too).
  padded = -(-length // 128) * 128
  pad = padded - length
  query_bkgld = (query_blhd * jnp.asarray(_scale(cfg), query_blhd.dtype)).reshape(
    b, length, kv, h // kv, d
  )
  query_bkgld = jnp.pad(query_bkgld.transpose(0, 2, 3, 1, 4), ((0, 0),) * 3 + ((0, pad), (0, 0)))
  key_bkld = jnp.pad(key_blkd.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
  value_bkld = jnp.pad(value_blkd.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
  segment_bl = jnp.pad(segment_bl, ((0, 0), (0, pad)), constant_values=-1)

  def run(win: int) -> jax.Array:
    kernel = _splash_kernel(padded, h // kv, win, float(cfg.attn_logit_softcap), interpret)
    if branch_bl is not None:
      branches = jnp.pad(branch_bl, ((0, 0), (0, pad)))
      return _splash_cascade(kernel, query_bkgld, key_bkld, value_bkld, segment_bl, branches)
    per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over kv heads
    per_row = jax.vmap(lambda q, k, v, s: per_head(q, k, v, sa.SegmentIds(s, s)))
    return per_row(query_bkgld, key_bkld, value_bkld, segment_bl)

  if not window:
    out_bkgld = run(0)
  elif sliding is None:
    out_bkgld = run(window)
  else:
    out_bkgld = jax.lax.cond(sliding, lambda: run(window), lambda: run(0))
  out_bkgld = out_bkgld[:, :, :, :length]
  return out_bkgld.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)


def _cascade_segments(segment_bl: jax.Array, branch_bl: jax.Array):
  """Segment ids of the two halves of a shared-prompt attention (`_splash_cascade`).

  A: queries by segment, keys only on prompts (branch 0); B: queries and keys by (segment,
  branch >= 1). A query sees in A its segment's prompt, in B its own response: together what
  `layers.causal_segment_mask` allows. Prompt queries have no key in B, responses without a
  prompt none in A: such rows come out with a log-sum-exp near the mask value, weight 0 below.
  Unused slots (0) and the 128-block tail (-1) see themselves in A, so no row is empty in both.
  """
  real, length = segment_bl > 0, segment_bl.shape[-1]
  response = real & (branch_bl > 0)
  q_a = jnp.where(real, segment_bl, jnp.where(segment_bl == 0, 0, -2))
  kv_a = jnp.where(response, -1, q_a)  # -1: never a query's id
  own_b = segment_bl * (length + 1) + branch_bl
  return (q_a, kv_a), (jnp.where(response, own_b, -3), jnp.where(response, own_b, -4))


def _splash_cascade(kernel, query_bkgld, key_bkld, value_bkld, segment_bl, branch_bl):
  """Shared-prompt attention as two splash calls combined by their log-sum-exp (Hydragen /
  cascade style): each response sees its prompt (call A) and itself (call B), exactly.

  The backward pass runs splash's own backward kernel for each call with the *combined* output
  and log-sum-exp as residuals, which gives each call's share of the exact gradient (the
  probabilities exp(s - lse) and D = rowsum(dO * O) are the combined ones); the two shares add.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  (q_a, kv_a), (q_b, kv_b) = _cascade_segments(segment_bl, branch_bl)
  static = _CascadeStatic.of(kernel)
  infos = (kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info)
  per_head = jax.vmap(_cascade, in_axes=(None, None, 0, 0, 0, None, None))  # over kv heads
  per_row = jax.vmap(
    lambda q, k, v, qa, ka, qb, kb: per_head(
      static, infos, q, k, v, SegmentIds(qa, ka), SegmentIds(qb, kb)
    ),
  )
  return per_row(query_bkgld, key_bkld, value_bkld, q_a, kv_a, q_b, kv_b)


@dataclasses.dataclass(frozen=True)
class _CascadeStatic:
  """The splash kernel's static settings (hashable: a custom_vjp non-differentiable argument)."""

  block_sizes: object
  mask_function: object
  softcap: float | None
  interpret: bool
  mask_value: float

  @classmethod
  def of(cls, kernel) -> _CascadeStatic:
    kw = kernel.kwargs
    return cls(
      kw["block_sizes"],
      kw["mask_function"],
      kw["attn_logits_soft_cap"],
      kw["interpret"],
      kw["mask_value"],
    )


def _cascade_half(static: _CascadeStatic, fwd_info, q, k, v, segment_ids):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  out, (lse,) = sk._splash_attention_forward(
    fwd_info,
    q,
    k,
    v,
    segment_ids,
    None,
    mask_value=static.mask_value,
    is_mqa=True,
    block_sizes=static.block_sizes,
    residual_checkpoint_name=None,
    save_residuals=True,
    mask_function=static.mask_function,
    attn_logits_soft_cap=static.softcap,
    interpret=static.interpret,
  )
  return out.astype(jnp.float32), lse.astype(jnp.float32)


def _cascade_fwd(static, infos, q, k, v, seg_a, seg_b):
  out_a, lse_a = _cascade_half(static, infos[0], q, k, v, seg_a)
  out_b, lse_b = _cascade_half(static, infos[0], q, k, v, seg_b)
  lse = jnp.logaddexp(lse_a, lse_b)
  out = jnp.exp(lse_a - lse)[..., None] * out_a + jnp.exp(lse_b - lse)[..., None] * out_b
  out = out.astype(q.dtype)
  return out, (infos, q, k, v, seg_a, seg_b, out, lse)


def _cascade_bwd(static, residuals, d_out):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  infos, q, k, v, seg_a, seg_b, out, lse = residuals
  grads = []
  for segment_ids in (seg_a, seg_b):
    res = (q, k, v, segment_ids, None, out, lse, infos[1], infos[2])
    grads.append(
      sk._splash_attention_bwd(
        False,
        static.mask_value,
        True,
        static.block_sizes,
        None,
        static.mask_function,
        static.softcap,
        static.interpret,
        res,
        d_out,
      )[3:6]
    )
  (dq_a, dk_a, dv_a), (dq_b, dk_b, dv_b) = grads
  return None, dq_a + dq_b, dk_a + dk_b, dv_a + dv_b, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cascade(static, infos, q, k, v, seg_a, seg_b):
  return _cascade_fwd(static, infos, q, k, v, seg_a, seg_b)[0]


_cascade.defvjp(_cascade_fwd, _cascade_bwd)


def _splash(cfg, query_blhd, key_blkd, value_blkd, vis: Visibility):
  interpret = platform() != "tpu"
  run = functools.partial(_splash_local, cfg, vis.window, interpret)
  args = (query_blhd, key_blkd, value_blkd, vis.segment_ids_bl, vis.sliding, vis.branch_ids_bl)
  if not _mesh_stack or _mesh_stack[-1].size == 1:
    return run(*args)
  # A Pallas kernel is opaque to XLA's partitioner: run it per shard, rows split like the batch
  # and heads like the `tensor` axis (where they divide), so no device gathers another's rows.
  mesh = _mesh_stack[-1]
  batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
  rows = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
  batch = batch_axes if batch_axes and query_blhd.shape[0] % rows == 0 else None
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and key_blkd.shape[2] % tensor == 0 else None
  P = jax.sharding.PartitionSpec
  qkv_spec = P(batch, None, heads, None)
  return jax.shard_map(
    run,
    mesh=mesh,
    in_specs=(
      qkv_spec,
      qkv_spec,
      qkv_spec,
      P(batch, None),
      None if vis.sliding is None else P(),
      None if vis.branch_ids_bl is None else P(batch, None),
    ),
    out_specs=qkv_spec,
    check_vma=False,
  )(*args)
