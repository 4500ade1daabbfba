"""Device meshes and the one table that maps logical axis names onto mesh axes.

Parameters carry logical names (`embed`, `mlp`, `heads`, ...; see `jaxpref.models.layers`);
activations and batches use `batch`. `LOGICAL_RULES` maps each name onto the `(data, fsdp,
tensor)` mesh. A dimension that a mesh axis does not divide evenly stays replicated rather than
failing, so tiny test models run on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes it is split over (None: replicated). Parameters are split over `fsdp`
# along `embed` (ZeRO-3 style) and over `tensor` along heads / mlp / vocab (Megatron style).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  # Mixture-of-experts kernels [experts, embed, mlp]: experts split over `tensor` (expert
  # parallelism); their `mlp` axis then stays whole, as a mesh axis is used once per array.
  ("experts", "tensor"),
  ("head_dim", None),
  ("layers", None),
  ("length", None),
)


class MeshError(ValueError):
  pass


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 entry to "all remaining devices" and checks the product."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh.data/fsdp/tensor={sizes}: at most one of them may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh.data/fsdp/tensor={sizes}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"mesh {sizes} does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
      f"mesh.data x mesh.fsdp x mesh.tensor = {math.prod(sizes)} but there are {num_devices} "
      "devices; use -1 for one axis to take the remaining devices"
    )
  return tuple(sizes)


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over all (or the given) devices."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  if devices == list(jax.devices()):
    try:
      device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      device_array = np.asarray(devices).reshape(shape)
  else:
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
  if name is None:
    return ()
  for logical, mesh_axes in rules:
    if logical == name:
      if mesh_axes is None:
        return ()
      return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
  raise MeshError(f"logical axis {name!r} has no entry in the sharding rules")


def logical_to_mesh_spec(
  logical_spec: PartitionSpec | Sequence[str | None],
  shape: Sequence[int],
  mesh: Mesh,
  rules=LOGICAL_RULES,
) -> PartitionSpec:
  """Maps one array's logical axis names to a mesh PartitionSpec, replicating what does not divide.

  A mesh axis is used at most once per array (the first logical axis that claims it wins).
  """
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
    axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used and mesh.shape[a] > 1)
    # Drop trailing mesh axes until the product divides the dimension.
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def tree_shardings(abstract_tree, logical_specs_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given its logical specs."""
  return jax.tree.map(
    lambda x, spec: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
    abstract_tree,
    logical_specs_tree,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Leading (item) axis split over `data` x `fsdp` (as far as it divides); the rest replicated."""
  return NamedSharding(mesh, logical_to_mesh_spec(("batch",), shape, mesh))


def global_batch_size_multiple(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]
