"""Rotary position embeddings (RoPE) as transformers 5 computes them, for GPT-NeoX and Llama.

Supported `rope_scaling` types: `default` (none), `linear`, `dynamic` (NTK) and `llama3`; the
formulas follow `transformers.modeling_rope_utils` (inverse frequencies in float32, cos/sin in
float32, then cast to the compute dtype).

One deliberate difference: `dynamic` scaling in transformers depends on the longest position id
of the whole batch (and on what the module saw before: it caches the largest length). jaxpref
computes it per sequence, from that sequence's own length, so a response's reward does not depend
on what else is in its batch; it equals transformers run on that sequence alone.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpref.models.config import ModelConfig, freeze_rope_scaling

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_REQUIRED_KEYS = {
  "linear": ("factor",),
  "dynamic": ("factor",),
  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_from_hf(
  hf_cfg: dict[str, Any],
  *,
  theta_keys: tuple[str, ...],
  pct_keys: tuple[str, ...],
  default_pct: float,
) -> dict[str, Any]:
  """Reads RoPE settings from a Hugging Face config dict (old or transformers-5 layout).

  transformers 5 stores `rope_parameters` (with `rope_theta` and `partial_rotary_factor` inside);
  older files store `rope_scaling` plus top-level `rope_theta` / `rotary_emb_base` / `rotary_pct`.
  As in transformers, a non-empty `rope_scaling` wins over `rope_parameters`, and values inside the
  dict win over top-level ones.

  Args:
    hf_cfg: the parsed `config.json`.
    theta_keys: top-level keys holding the base, in priority order.
    pct_keys: top-level keys holding the rotary fraction of each head, in priority order.
    default_pct: the fraction when none is given.

  Returns:
    ModelConfig fields `rope_theta`, `rotary_pct` and `rope_scaling`.
  """
  params = dict(hf_cfg.get("rope_scaling") or hf_cfg.get("rope_parameters") or {})
  theta = params.pop("rope_theta", None)
  if theta is None:
    theta = next((hf_cfg[k] for k in theta_keys if hf_cfg.get(k) is not None), 10000.0)
  pct = params.pop("partial_rotary_factor", None)
  if pct is None:
    pct = next((hf_cfg[k] for k in pct_keys if hf_cfg.get(k) is not None), default_pct)
  legacy_type = params.pop("type", None)
  rope_type = params.pop("rope_type", None) or legacy_type or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(
      f"config.json rope_scaling type {rope_type!r} is not supported; jaxpref supports {ROPE_TYPES}"
    )
  scaling = None
  if rope_type != "default":
    if rope_type == "llama3":
      # transformers' `standardize_rope_params` fills this in the same way.
      params.setdefault("original_max_position_embeddings", hf_cfg.get("max_position_embeddings"))
    missing = [k for k in _REQUIRED_KEYS[rope_type] if params.get(k) is None]
    if missing:
      raise ValueError(f"config.json rope_scaling of type {rope_type!r} lacks {missing}")
    scaling = freeze_rope_scaling({"rope_type": rope_type, **params})
  return {"rope_theta": float(theta), "rotary_pct": float(pct), "rope_scaling": scaling}


def rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers-5 `rope_parameters` dict of a config (theta and scaling, no fraction)."""
  params: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  params.update(cfg.rope_scaling_dict or {})
  return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def rope_type(cfg: ModelConfig) -> str:
  scaling = cfg.rope_scaling_dict or {}
  return scaling.get("rope_type", scaling.get("type", "default"))


def rotary_dim(cfg: ModelConfig) -> int:
  """Number of leading head dimensions that are rotated (`int(head_dim * rotary_pct)`)."""
  return int(cfg.dim_per_head * cfg.rotary_pct)


def _exponents(dim: int) -> np.ndarray:
  # `arange(0, dim, 2) / dim` in float32, as torch computes it.
  return np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [ceil(rotary_dim / 2)] for positions within `max_position_embeddings`.

  For `dynamic` scaling these are the unscaled ones; `rotary_angles` rescales per sequence.
  """
  dim = rotary_dim(cfg)
  base = np.float32(cfg.rope_theta)
  inv_freq = (np.float32(1.0) / base ** _exponents(dim)).astype(np.float32)
  kind = rope_type(cfg)
  scaling = cfg.rope_scaling_dict or {}
  if kind == "linear":
    inv_freq = inv_freq / np.float32(scaling["factor"])
  elif kind == "llama3":
    factor = np.float32(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_context_len) / wavelen - np.float32(low_freq_factor)) / np.float32(
      high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  elif kind not in ("default", "dynamic"):
    raise ValueError(
      f"model.rope_scaling type {kind!r} is not supported; choose one of {ROPE_TYPES}"
    )
  return inv_freq.astype(np.float32)


def _dynamic_inv_freq_bk(cfg: ModelConfig, positions_bl: jax.Array) -> jax.Array:
  """NTK-scaled inverse frequencies from each sequence's own length (transformers' formula)."""
  dim = rotary_dim(cfg)
  factor = float(cfg.rope_scaling_dict["factor"])
  max_len = cfg.max_position_embeddings
  seq_len_b = jnp.maximum(jnp.max(positions_bl, axis=-1) + 1, max_len).astype(jnp.float32)
  base_b = cfg.rope_theta * ((factor * seq_len_b / max_len) - (factor - 1)) ** (dim / (dim - 2))
  return 1.0 / base_b[:, None] ** jnp.asarray(_exponents(dim))[None, :]


def rotary_angles(cfg: ModelConfig, positions_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, 2 * ceil(rotary_dim / 2)] in the compute dtype.

  Args:
    cfg: model config (head size, `rotary_pct`, `rope_theta`, `rope_scaling`, dtype).
    positions_bl: int position ids (see `layers.positions_from_mask`).
  """
  if rope_type(cfg) == "dynamic":
    inv_freq_bk = _dynamic_inv_freq_bk(cfg, positions_bl)[:, None, :]
  else:
    inv_freq_bk = jnp.asarray(inv_frequencies(cfg))[None, None, :]
  freqs_blk = positions_bl.astype(jnp.float32)[..., None] * inv_freq_bk
  emb_blr = jnp.concatenate([freqs_blk, freqs_blk], axis=-1)
  dtype = cfg.jnp_dtype
  return jnp.cos(emb_blr).astype(dtype), jnp.sin(emb_blr).astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_blhd: jax.Array, cos_blr: jax.Array, sin_blr: jax.Array) -> jax.Array:
  """Rotates the first `r` dims of each head (GPT-NeoX style halves, not interleaved pairs)."""
  r = cos_blr.shape[-1]
  cos_bl1r, sin_bl1r = cos_blr[:, :, None, :], sin_blr[:, :, None, :]
  x_rot, x_pass = x_blhd[..., :r], x_blhd[..., r:]
  x_rot = x_rot * cos_bl1r + _rotate_half(x_rot) * sin_bl1r
  return jnp.concatenate([x_rot, x_pass], axis=-1) if x_pass.shape[-1] else x_rot
