"""The same training losses on 1 device, on 8 forced CPU devices as a 2x2x2 mesh, and as 2 JAX
processes on localhost (jax.distributed, each process feeding its slice of the global batch)."""

import numpy as np
import pytest
import train_helpers as th

pytestmark = pytest.mark.usefixtures("shared_dir")

# 12 items = 4 per task: divisible by data x fsdp = 4 and by 2 processes x 3 tasks.
# 256 tokens leave room for padding, which packing removes.
OVERRIDES = (
  "--config.train.batch_size=12",
  "--config.train.steps=3",
  "--config.checkpoint.every_steps=3",
  "--config.eval.final=False",
  "--config.data.max_length=256",
)
# The reference is padded; packing with shared prompts (the default) gives the same losses to
# float rounding (the pooled states come out of a different contraction).
PADDED = ("--config.data.packing=False",)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_device")
  th.run_train(workdir, *OVERRIDES, *PADDED, "--config.mesh.data=1")
  return workdir


@pytest.fixture(scope="module")
def reference_losses(reference_run):
  return {step: v[0] for step, v in th.losses_by_step(reference_run).items()}


def _assert_close(losses, reference, rtol=2e-5):
  assert sorted(losses) == sorted(reference) == [1, 2, 3]
  for step, values in losses.items():
    np.testing.assert_allclose(values[0], reference[step], rtol=rtol, err_msg=f"step {step}")


def test_mesh_2x2x2_on_8_devices_matches_one_device(tmp_path, reference_losses):
  th.run_train(
    tmp_path,
    *OVERRIDES,
    *PADDED,
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    devices=8,
  )
  _assert_close(th.losses_by_step(tmp_path), reference_losses)


@pytest.mark.multiprocess
def test_two_processes_match_one_device(tmp_path, reference_losses):
  # The default layout: packed with shared prompts, each process packing its own items.
  results = th.run_train_multiprocess(tmp_path, *OVERRIDES, "--config.mesh.data=-1")
  assert "process 1 of 2" in results[1].stderr or "process 1 of 2" in results[0].stderr
  _assert_close(th.losses_by_step(tmp_path), reference_losses, rtol=1e-4)


# Packing moves the responses into rows of max_length tokens; the losses stay those of the padded
# run (to float rounding: the pooled states come out of a different contraction).
PACKED = ("--config.data.packing=True",)


def _positions(workdir):
  return th.metric_by_step(workdir, "positions")


def test_packed_on_8_devices_matches_padded_one_device(tmp_path, reference_run, reference_losses):
  th.run_train(
    tmp_path,
    *OVERRIDES,
    *PACKED,
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    devices=8,
  )
  # Fewer positions computed than padded, in a multiple of data x fsdp = 4 rows of 256 tokens.
  packed, padded = _positions(tmp_path), _positions(reference_run)
  assert len(packed) == len(padded) == 3 and sum(packed) < sum(padded), (packed, padded)
  assert all(p <= q and p % (4 * 256) == 0 for p, q in zip(packed, padded)), (packed, padded)
  losses = th.losses_by_step(tmp_path)
  assert sorted(losses) == [1, 2, 3]
  for step, values in losses.items():
    np.testing.assert_allclose(values[0], reference_losses[step], rtol=1e-4, err_msg=f"{step}")


# Slow: packing with shared prompts on 8 devices and on 2 processes run by default; the
# pipeline's cross-process row agreement is tested in tests/test_data_pipeline.py.
@pytest.mark.slow
@pytest.mark.multiprocess
def test_packed_two_processes_match_padded_one_device(tmp_path, reference_losses):
  th.run_train_multiprocess(
    tmp_path, *OVERRIDES, *PACKED, "--config.data.shared_prompts=False", "--config.mesh.data=-1"
  )
  losses = th.losses_by_step(tmp_path)
  assert sorted(losses) == [1, 2, 3]
  for step, values in losses.items():
    np.testing.assert_allclose(values[0], reference_losses[step], rtol=1e-4, err_msg=f"{step}")


def test_throughput_metrics_are_logged(reference_run):
  tflops = th.metric_by_step(reference_run, "model_tflops_per_s")
  tokens, positions = th.metric_by_step(reference_run, "tokens"), _positions(reference_run)
  assert len(tflops) == 3 and all(t > 0 for t in tflops)
  # Real tokens never exceed the positions computed; no MFU without a known peak (CPU).
  assert all(0 < t <= p for t, p in zip(tokens, positions))
  assert th.metric_by_step(reference_run, "mfu") == []
