"""Model FLOPs from the config vs XLA's own count of the compiled forward pass."""

import jax
import jax.numpy as jnp
import pytest

from jaxpref.models import reward_model
from jaxpref.models.config import ModelConfig
from jaxpref.training import flops

# One layer: XLA's cost analysis counts the body of the layer scan (a while loop) once.
SIZE = dict(
  vocab_size=128,
  hidden_size=256,
  num_layers=1,
  num_heads=4,
  intermediate_size=1024,
  max_position_embeddings=128,
)


@pytest.mark.parametrize(
  "cfg",
  [
    ModelConfig(arch="gpt_neox", rotary_pct=0.25, attention="dense", **SIZE),
    ModelConfig(arch="llama", num_kv_heads=2, hidden_act="silu", attention="dense", **SIZE),
  ],
  ids=["gpt_neox", "llama_gqa"],
)
def test_forward_flops_match_xla_cost_analysis(cfg):
  batch, length = 4, 64
  params = jax.eval_shape(lambda: reward_model.init_params(cfg, jax.random.key(0)))
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = (
    jax.jit(lambda p, i, m: reward_model.apply(cfg, p, i, m)["rewards"])
    .lower(params, ids, ids)
    .compile()
  )
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  # Dense attention computes the full T x T product, as XLA counts it; elementwise work (norms,
  # softmax, activations) is what XLA adds on top, a few percent at this width.
  want = flops.forward_flops(cfg, [length] * batch, causal_half=False)
  assert want <= analysis["flops"] <= 1.1 * want, (want, analysis["flops"])


def test_train_flops_is_three_forwards_and_mfu_uses_the_peak():
  cfg = ModelConfig(arch="gpt_neox", **SIZE)
  lengths = [10, 64, 33]
  assert flops.train_flops(cfg, lengths) == pytest.approx(3 * flops.forward_flops(cfg, lengths))
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("cpu") is None and flops.mfu(1e12, 1.0, "cpu") is None
  assert flops.mfu(197e12, 2.0, "TPU v5 lite", num_devices=4) == pytest.approx(0.125)
