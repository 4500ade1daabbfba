"""Model FLOPs of a reward-model train step, and model FLOPs utilisation (MFU).

Counted from the config, the way MFU is usually reported (PaLM, MaxText): every matmul of the
forward pass is 2 FLOPs per multiply-add, the backward pass twice the forward, so a token costs
6 N FLOPs for the N parameters in matmuls (the embedding table is a lookup and the reward head
has one output, so neither counts). Attention (QK^T and PV) adds 6 * layers * heads * head_dim
* T^2 per sequence of T tokens over the three passes of a causal decoder (half of the full T x T
product; MaxText also counts causal attention as half), twice that for a bidirectional encoder
(BERT). Padding, remat recomputation and packing do not change the count: it is the work the
model needs, not the work done, so that the ratio to the hardware's peak says how well the step
uses the chip.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from jaxpref.models.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,  # v6e (Trillium)
  "TPU v6e": 918e12,
  "NVIDIA H100 80GB HBM3": 989e12,  # SXM
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100-SXM4-80GB": 312e12,
  "NVIDIA A100-SXM4-40GB": 312e12,
  "NVIDIA A100 80GB PCIe": 312e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (embeddings and the 1-output head excluded)."""
  d, heads, kv, head_dim = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  attention = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o; k, v.
  if cfg.num_experts:  # the router, and the chosen experts' gated MLPs
    mlp = d * cfg.num_experts + cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size
  else:
    gated = cfg.arch not in ("gpt_neox", "bert")  # SwiGLU / GeGLU: gate, up and down
    mlp = d * cfg.intermediate_size * (3 if gated else 2)
  pooler = d * d if cfg.pooling == "pooler" else 0
  return cfg.num_layers * (attention + mlp) + pooler


def forward_flops(cfg: ModelConfig, lengths: Iterable[int], *, causal_half: bool = True) -> float:
  """Model FLOPs of a forward pass over sequences of these lengths.

  Decoders count half of the T x T attention products (causal); BERT, or `causal_half=False`
  (what dense attention computes), counts all of them.
  """
  lengths = np.asarray(list(lengths), np.float64)
  dense = 2.0 * matmul_params(cfg) * lengths.sum()
  per_t2 = 2.0 if causal_half and cfg.arch != "bert" else 4.0
  attention = per_t2 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * (lengths**2).sum()
  return float(dense + attention)


def train_flops(cfg: ModelConfig, lengths: Iterable[int]) -> float:
  """Model FLOPs of one training step (forward and backward: three forwards)."""
  return 3.0 * forward_flops(cfg, lengths)


def peak_flops(device_kind: str) -> float | None:
  """The device's dense bf16 peak FLOP/s, or None where unknown (CPUs)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  matches = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(flops: float, seconds: float, device_kind: str, num_devices: int = 1) -> float | None:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (None if unknown)."""
  peak = peak_flops(device_kind)
  if peak is None or seconds <= 0:
    return None
  return flops / seconds / (peak * num_devices)
