"""`python -m jaxpref.aot --config=configs/X.py --topology=v4-8`: a memory plan before renting TPUs.

Compiles the same jitted train step as `jaxpref.training.trainer` (same optimizer, state
shardings, batch sharding and donation) ahead of time for a TPU topology, on this CPU-only machine,
from abstract shapes only (`jax.eval_shape`: no weights are read or created), and reports per
device the bytes of the parameters, the optimizer state and XLA's memory analysis (temp /
argument / output bytes).

Compiling for a TPU topology needs `libtpu` importable. Without it the tool says so in one line and
compiles for the local devices instead (with `--num_cpu_devices=N`, N forced host CPU devices), on
the same mesh: the sharded bytes are the same, XLA's temp bytes are the CPU compiler's.
Shapes come from `model.preset` when set (no checkpoint needed), else from the `model.*` fields.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file from configs/.", lock_config=True)
flags.DEFINE_string(
  "topology",
  "v4-8",
  "TPU topology name, e.g. v4-8, v4-32 or v5e:2x4 (what get_topology_desc accepts).",
)
flags.DEFINE_string("chip_config", "default", "Chip config name for get_topology_desc.")
flags.DEFINE_integer(
  "num_cpu_devices",
  0,
  "Fallback without libtpu: force this many host CPU devices (0 = as many as "
  "the name vX-N says, else the local devices).",
)
flags.DEFINE_string("json_out", None, "Also write the report as JSON to this file.")
flags.DEFINE_boolean("force_cpu", False, "Skip the TPU topology even if libtpu is importable.")

LIBTPU_MISSING = (
  "jaxpref.aot: libtpu is not importable, so no TPU topology can be compiled for; "
  "compiling for {n} local CPU devices with the same mesh instead "
  "(pip install libtpu for the real TPU plan)."
)


@dataclass
class Plan:
  """The numbers of one AOT compilation (bytes are per device unless named `total`)."""

  target: str
  num_devices: int
  mesh: dict[str, int]
  param_count: int
  trainable_param_count: int
  param_bytes_total: int
  param_bytes_per_device: int
  opt_state_bytes_total: int
  opt_state_bytes_per_device: int
  temp_bytes: int | None
  argument_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None
  generated_code_bytes: int | None

  def to_dict(self) -> dict[str, Any]:
    return dict(self.__dict__)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(topology: str) -> int | None:
  """Devices in a `vX-N` name: `get_topology_desc("v4-8")` has 8 (one per TensorCore)."""
  head, _, tail = topology.rpartition("-")
  return int(tail) if head and tail.isdigit() else None


def _nbytes(leaf) -> int:
  return math.prod(leaf.shape) * leaf.dtype.itemsize


def _bytes_per_device(leaf, sharding) -> int:
  shard_shape = sharding.shard_shape(leaf.shape)
  return math.prod(shard_shape) * leaf.dtype.itemsize


def _tree_bytes(abstract_tree, shardings_tree) -> tuple[int, int]:
  import jax

  leaves = jax.tree.leaves(abstract_tree)
  shardings = jax.tree.leaves(shardings_tree)
  total = sum(_nbytes(x) for x in leaves)
  per_device = sum(_bytes_per_device(x, s) for x, s in zip(leaves, shardings, strict=True))
  return total, per_device


def num_tasks_of(config) -> int:
  """Tasks the step is compiled for (without reading the data: a domain-specific file, which
  gives several tasks, counts as one unless `data.tasks` names them)."""
  if config.data.get("tasks"):
    return len([t for t in config.data.tasks.split(",") if t.strip()])
  if config.data.task_names:
    return len([t for t in config.data.task_names.split(",") if t])
  from jaxpref.training.data import split_files

  return max(1, len(split_files(config.data.files)))


def plan(config, devices, target: str) -> Plan:
  """Lowers and compiles the train step for `devices` from abstract inputs; returns the numbers."""
  import jax
  import jax.numpy as jnp

  from jaxpref import sharding
  from jaxpref.data.batch import PaddedBatch
  from jaxpref.models import lora
  from jaxpref.models.source import model_config_from_config
  from jaxpref.training import step as train_step_lib

  # LoRA (lora.rank > 0): adapters added, optimizer state only for what trains.
  model_cfg = model_config_from_config(config.model).replace(lora=lora.from_config(config.lora))
  mesh = sharding.make_mesh(
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=list(devices)
  )
  # The trainer's own step (same builder). The schedule's length changes no shape; any positive
  # step count compiles the same program.
  program = train_step_lib.build_from_config(
    config,
    model_cfg,
    num_tasks=num_tasks_of(config),
    total_steps=max(1, config.train.steps),
    mesh=mesh,
  )
  abstract_state, state_shardings = program.abstract_state, program.state_shardings

  b, length = config.train.batch_size, config.data.max_length
  n = config.data.get("responses_per_item") or 2  # 0 = the data's largest; pairs without data.
  shapes = {
    "input_ids": ((b, n, length), jnp.int32),
    "attention_mask": ((b, n, length), jnp.int32),
    "scores": ((b, n), jnp.float32),
    "task_ids": ((b,), jnp.int32),
  }
  abstract_batch = PaddedBatch(
    **{
      name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, shape))
      for name, (shape, dtype) in shapes.items()
    }
  )
  step_fn = program.step_fn
  compiled = step_fn.lower(program.abstract_sharded_state(), abstract_batch).compile()
  memory = compiled.memory_analysis()
  get = lambda name: None if memory is None else int(getattr(memory, name, 0) or 0)

  param_total, param_per_device = _tree_bytes(abstract_state.params, state_shardings.params)
  opt_total, opt_per_device = _tree_bytes(abstract_state.opt_state, state_shardings.opt_state)
  return Plan(
    target=target,
    num_devices=len(devices),
    mesh={k: int(v) for k, v in mesh.shape.items()},
    param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)),
    trainable_param_count=lora.count_trainable(model_cfg, abstract_state.params)[0],
    param_bytes_total=param_total,
    param_bytes_per_device=param_per_device,
    opt_state_bytes_total=opt_total,
    opt_state_bytes_per_device=opt_per_device,
    temp_bytes=get("temp_size_in_bytes"),
    argument_bytes=get("argument_size_in_bytes"),
    output_bytes=get("output_size_in_bytes"),
    alias_bytes=get("alias_size_in_bytes"),
    generated_code_bytes=get("generated_code_size_in_bytes"),
  )


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.3f} GiB ({n:,} B)"


def markdown(p: Plan) -> str:
  rows = [
    ("target", p.target),
    ("devices", str(p.num_devices)),
    ("mesh", str(p.mesh)),
    ("parameters", f"{p.param_count:,}"),
    ("trainable parameters", f"{p.trainable_param_count:,}"),
    ("params total", _gib(p.param_bytes_total)),
    ("params / device", _gib(p.param_bytes_per_device)),
    ("optimizer state / device", _gib(p.opt_state_bytes_per_device)),
    ("XLA argument / device", _gib(p.argument_bytes)),
    ("XLA output / device", _gib(p.output_bytes)),
    ("XLA alias (donated) / device", _gib(p.alias_bytes)),
    ("XLA temp / device", _gib(p.temp_bytes)),
  ]
  return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required")
  from jaxpref.training import config as train_config

  train_config.validate(FLAGS.config)
  use_tpu = libtpu_available() and not FLAGS.force_cpu
  if not use_tpu:
    n = FLAGS.num_cpu_devices or topology_devices(FLAGS.topology) or 0
    if n and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      # Must be set before jax starts its CPU backend (jax is imported lazily for this reason).
      os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
      ).strip()
  import jax

  if use_tpu:
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
      FLAGS.topology, "tpu", chip_config_name=FLAGS.chip_config
    )
    devices, target = topology.devices, f"tpu {FLAGS.topology}"
  else:
    devices = jax.devices("cpu")
    if not libtpu_available():
      print(LIBTPU_MISSING.format(n=len(devices)), file=sys.stderr)
    target = f"cpu x{len(devices)} (stand-in for {FLAGS.topology})"
  result = plan(FLAGS.config, devices, target)
  print(markdown(result))
  text = json.dumps(result.to_dict(), indent=2)
  print(text)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  from jaxpref import cli

  app.run(
    lambda argv: cli.run_main("jaxpref.aot", main, argv),
    flags_parser=cli.parse_flags_or_exit("jaxpref.aot"),
  )
