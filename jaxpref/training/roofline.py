"""Roofline estimate of a compiled step's time from a chip's peak FLOP/s and memory bandwidth.

A step cannot run faster than its FLOPs at the chip's peak, nor than its bytes moved at the
chip's HBM bandwidth; the larger of the two is the roofline time, and says whether the step is
compute- or memory-bound. Both counts come from XLA's cost analysis of the compiled (per-device)
program, so they include what the compiler added (rematerialisation) and miss what it cannot see
(a Pallas kernel is one opaque custom call: its FLOPs are not counted).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: dense bf16 peak, HBM bandwidth and capacity, TensorCores."""

  name: str
  peak_flops: float  # FLOP/s per chip, bf16, dense (no sparsity)
  hbm_bandwidth: float  # bytes/s per chip
  hbm_bytes: float  # per chip
  cores: int = 1  # TensorCores per chip (a JAX TPU device holds one, or two with megacore)


# Sources (vendors' published per-chip figures):
#   v4:   cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 1,200 GB/s (1228.8 GB/s), 32 GiB, 2 TCs
#   v5e:  cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 819 GB/s, 16 GiB, 1 TC
#   v5p:  cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 2,765 GB/s, 95 GiB, 2 TCs
#   v6e:  cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 1,640 GB/s, 32 GiB, 1 TC
#   H100: NVIDIA H100 Tensor Core GPU datasheet, SXM5: 989 TFLOP/s bf16 dense, 3.35 TB/s, 80 GB
#   H200: NVIDIA H200 Tensor Core GPU datasheet, SXM: 989 TFLOP/s bf16 dense, 4.8 TB/s, 141 GB
CHIPS = {
  "v4": Chip("TPU v4", 275e12, 1228.8e9, 32 * 2**30, cores=2),
  "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * 2**30),
  "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * 2**30, cores=2),
  "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 * 2**30),
  "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 80e9),
  "h200": Chip("NVIDIA H200 SXM", 989e12, 4.8e12, 141e9),
}
# JAX device_kind -> chip (TPU v5e and v6e report themselves as "lite").
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}


def chip_for(name: str) -> Chip | None:
  """A chip by table key, JAX device kind, or a topology / accelerator-type name (`v5e:2x4`,
  `v5p-8`, `v5litepod-16`, `H200`); None where unknown."""
  key = name.strip()
  if key in DEVICE_KINDS:
    return CHIPS[DEVICE_KINDS[key]]
  key = key.lower().split(":")[0].split("-")[0].replace("litepod", "e")
  if key.startswith("nvidia "):
    key = key.split()[1]
  return CHIPS.get(key)


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Per device: the step's counts, the chip's rates, and the time bound they give."""

  chip: str
  peak_flops_per_device: float
  hbm_bandwidth_per_device: float
  compute_s: float  # XLA FLOPs / peak
  memory_s: float  # XLA bytes accessed / bandwidth
  step_s: float  # max of the two
  bound: str  # "compute" or "memory"
  mfu_at_roofline: float | None  # model FLOPs / (peak x step_s)


def estimate(
  chip: Chip,
  *,
  xla_flops: float,
  xla_bytes: float,
  model_flops: float | None,
  cores_per_device: int | None = None,
) -> Roofline:
  """The roofline of one device's program (`xla_*`, `model_flops` per device).

  `cores_per_device`: TensorCores a JAX device holds (TPU `num_cores`: 2 with megacore); default
  a whole chip.
  """
  share = (cores_per_device or chip.cores) / chip.cores
  peak, bandwidth = chip.peak_flops * share, chip.hbm_bandwidth * share
  compute_s, memory_s = xla_flops / peak, xla_bytes / bandwidth
  step_s = max(compute_s, memory_s)
  return Roofline(
    chip=chip.name,
    peak_flops_per_device=peak,
    hbm_bandwidth_per_device=bandwidth,
    compute_s=compute_s,
    memory_s=memory_s,
    step_s=step_s,
    bound="compute" if compute_s >= memory_s else "memory",
    mfu_at_roofline=(model_flops / peak / step_s) if model_flops and step_s > 0 else None,
  )
