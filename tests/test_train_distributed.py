"""The same training losses on 1 device, on 8 forced CPU devices as a 2x2x2 mesh, and as 2 JAX
processes on localhost (jax.distributed, each process feeding its slice of the global batch)."""

import numpy as np
import pytest
import train_helpers as th

pytestmark = pytest.mark.usefixtures("shared_dir")

# 12 items = 4 per task: divisible by data x fsdp = 4 and by 2 processes x 3 tasks.
OVERRIDES = ("--config.train.batch_size=12", "--config.train.steps=3",
             "--config.checkpoint.every_steps=3", "--config.eval.final=False")


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  th.run_train(workdir, *OVERRIDES, "--config.mesh.data=1")
  return {step: v[0] for step, v in th.losses_by_step(workdir).items()}


def _assert_close(losses, reference):
  assert sorted(losses) == sorted(reference) == [1, 2, 3]
  for step, values in losses.items():
    np.testing.assert_allclose(values[0], reference[step], rtol=2e-5, err_msg=f"step {step}")


def test_mesh_2x2x2_on_8_devices_matches_one_device(tmp_path, reference_losses):
  th.run_train(tmp_path, *OVERRIDES, "--config.mesh.data=2", "--config.mesh.fsdp=2",
               "--config.mesh.tensor=2", devices=8)
  _assert_close(th.losses_by_step(tmp_path), reference_losses)


@pytest.mark.multiprocess
def test_two_processes_match_one_device(tmp_path, reference_losses):
  results = th.run_train_multiprocess(tmp_path, *OVERRIDES, "--config.mesh.data=-1")
  assert "process 1 of 2" in results[1].stderr or "process 1 of 2" in results[0].stderr
  _assert_close(th.losses_by_step(tmp_path), reference_losses)
