"""Mesh construction and the logical-axis rules (pure logic; the 8-device runs are in
test_train_distributed.py)."""

import jax
import pytest
from jax.sharding import Mesh, PartitionSpec

from jaxpref import sharding


def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
  assert sharding.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
  assert sharding.mesh_shape(1, 1, -1, 4) == (1, 1, 4)


@pytest.mark.parametrize("sizes", [(-1, -1, 1), (3, 1, 1), (0, 1, 1), (2, 2, 1)])
def test_mesh_shape_errors_are_one_line(sizes):
  with pytest.raises(sharding.MeshError) as info:
    sharding.mesh_shape(*sizes, 8)
  assert "\n" not in str(info.value) and "mesh" in str(info.value)


class _FakeMesh:
  """Just the `.shape` mapping that the rules read, for a 2x2x2 mesh without 8 devices."""

  shape = {"data": 2, "fsdp": 2, "tensor": 2}


def test_logical_to_mesh_spec_maps_and_replicates_what_does_not_divide():
  mesh = _FakeMesh()
  spec = sharding.logical_to_mesh_spec(PartitionSpec("embed", "mlp"), (64, 256), mesh)
  assert spec == PartitionSpec("fsdp", "tensor")
  # 3 is not divisible by 2: replicated instead of failing.
  spec = sharding.logical_to_mesh_spec(PartitionSpec("embed", "heads"), (64, 3), mesh)
  assert spec == PartitionSpec("fsdp", None)
  spec = sharding.logical_to_mesh_spec(PartitionSpec("batch"), (8, 2, 16), mesh)
  assert spec == PartitionSpec(("data", "fsdp"), None, None)
  # Only one of data x fsdp divides 6 -> the first one is kept.
  spec = sharding.logical_to_mesh_spec(PartitionSpec("batch"), (6,), mesh)
  assert spec == PartitionSpec("data")


def test_a_mesh_axis_is_used_once_per_array():
  mesh = _FakeMesh()
  spec = sharding.logical_to_mesh_spec(PartitionSpec("heads", "mlp"), (4, 4), mesh)
  assert spec == PartitionSpec("tensor", None)


def test_unknown_logical_axis_is_an_error():
  with pytest.raises(sharding.MeshError, match="no entry"):
    sharding.logical_to_mesh_spec(PartitionSpec("bogus"), (4,), _FakeMesh())


def test_make_mesh_on_available_devices():
  mesh = sharding.make_mesh(-1, 1, 1)
  assert isinstance(mesh, Mesh)
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == jax.device_count()
