"""GPT-NeoX and Llama backbones: shapes, axis names, padding, masking, GQA, remat, RoPE.

Parity with transformers is in tests/test_hf_io.py; here the checks are self-consistency ones
that compare two independent routes to the same number (left vs right padding vs no padding,
GQA vs the equivalent repeated-head MHA, ...). The RoPE tests at the end compare against
transformers' own inverse-frequency functions (parity tier).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.models import reward_model as rm
from jaxpref.models import rope
from jaxpref.models.config import ModelConfig, freeze_rope_scaling

# A large init range makes attention peaked, so that masking and position bugs change outputs.
TINY = dict(
  vocab_size=97,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  intermediate_size=96,
  max_position_embeddings=32,
  initializer_range=0.2,
)
CONFIGS = {
  "gpt_neox": ModelConfig(arch="gpt_neox", rotary_pct=0.25, attention_bias=True, **TINY),
  "llama": ModelConfig(arch="llama", num_kv_heads=2, hidden_act="silu", **TINY),
}


@functools.partial(jax.jit, static_argnums=0, static_argnames="output_hidden_states")
def _apply(cfg, params, ids, mask, output_hidden_states=False):
  return rm.apply(cfg, params, ids, mask, output_hidden_states=output_hidden_states)


_init = jax.jit(rm.init_params, static_argnums=0)


def _batch(lengths, length, *, left: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, TINY["vocab_size"], (len(lengths), length))
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  if left:
    # Same tokens, moved to the end of the row.
    ids = np.stack([np.roll(row, length - n) for row, n in zip(ids, lengths)])
    mask = mask[:, ::-1].copy()
  return jnp.asarray(np.where(mask > 0, ids, 0), jnp.int32), jnp.asarray(mask)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
  cfg = CONFIGS[request.param]
  return cfg, _init(cfg, jax.random.key(1))


def test_param_axes_have_logical_names(model):
  cfg, params = model
  axes = rm.logical_axes(cfg)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  specs = dict(
    (jax.tree_util.keystr(p), s)
    for p, s in jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
  )
  for path, leaf in leaves:
    spec = specs[jax.tree_util.keystr(path)]
    assert len(spec) == leaf.ndim, (path, spec, leaf.shape)
    if "'layers'" in jax.tree_util.keystr(path):
      assert spec[0] == "layers" and leaf.shape[0] == cfg.num_layers, (path, spec)


def test_padding_side_and_no_padding_agree(model):
  cfg, params = model
  lengths, length = [8, 3, 5, 1], 8
  right = _apply(cfg, params, *_batch(lengths, length, left=False), output_hidden_states=True)
  left = _apply(cfg, params, *_batch(lengths, length, left=True), output_hidden_states=True)
  np.testing.assert_allclose(right["rewards"], left["rewards"], atol=2e-5, rtol=1e-5)
  # Row 1 run alone, without any padding.
  ids, _ = _batch(lengths, length, left=False)
  alone = _apply(cfg, params, ids[1:2, :3], jnp.ones((1, 3), jnp.int32), output_hidden_states=True)
  np.testing.assert_allclose(alone["rewards"][0], right["rewards"][1], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(
    alone["hidden_states"][:, 0], right["hidden_states"][:, 1, :3], atol=1e-4, rtol=1e-4
  )
  np.testing.assert_allclose(
    alone["hidden_states"][:, 0], left["hidden_states"][:, 1, -3:], atol=1e-4, rtol=1e-4
  )
  hidden = right["hidden_states"]
  assert hidden.shape == (cfg.num_layers + 1, 4, length, cfg.hidden_size)
  # The last entry is the final-norm output, what `last` pooling reads.
  np.testing.assert_allclose(hidden[-1, 1, 2], right["pooled"][1], atol=1e-6)


def test_remat_grads_match_and_padded_response_is_finite(model):
  cfg, params = model
  # Row 1 is a padded response: an all-zero mask must give finite rewards and gradients.
  ids, mask = _batch([6, 0, 3], 6, left=True)

  def loss(c, p):
    return jnp.sum(rm.apply(c, p, ids, mask)["rewards"])

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  value, grads = grad_fn(cfg, params)
  remat_value, remat_grads = grad_fn(cfg.replace(remat=True), params)
  assert np.isfinite(value) and value == pytest.approx(float(remat_value), abs=1e-5)
  for plain, remat in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
    assert np.isfinite(plain).all()
    np.testing.assert_allclose(plain, remat, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("left", [False, True])
def test_blocked_attention_equals_dense(model, left):
  """Query blocks (7 rows: several, the last one short) vs one dense attention, values and grads."""
  cfg, params = model
  cfg = cfg.replace(max_position_embeddings=32)
  ids, mask = _batch([24, 9, 1, 0, 17], 24, left=left, seed=3)

  def loss(c, p):
    out = rm.apply(c, p, ids, mask, output_hidden_states=True)
    return jnp.sum(out["rewards"] * jnp.arange(1.0, 6.0)), out

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
  (value, dense), dense_grads = grad_fn(cfg.replace(attention="dense"), params)
  (blocked_value, blocked), blocked_grads = grad_fn(
    cfg.replace(attention="blocked", attention_block=7), params
  )
  assert np.isfinite(value) and float(blocked_value) == pytest.approx(float(value), abs=1e-5)
  real = np.asarray(mask, bool)[None, :, :, None]
  np.testing.assert_allclose(
    np.where(real, blocked["hidden_states"], 0),
    np.where(real, dense["hidden_states"], 0),
    atol=1e-5,
    rtol=1e-5,
  )
  for d, b in zip(jax.tree.leaves(dense_grads), jax.tree.leaves(blocked_grads)):
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b, d, atol=2e-5, rtol=1e-4)


def test_bad_attention_settings_name_the_field():
  with pytest.raises(ValueError, match="model.attention='flash'"):
    CONFIGS["llama"].replace(attention="flash")
  with pytest.raises(ValueError, match="model.attention_block=0"):
    CONFIGS["llama"].replace(attention_block=0)


def test_bfloat16_close_to_float32(model):
  cfg, params = model
  ids, mask = _batch([8, 3, 5, 1], 8, left=False)
  want = _apply(cfg, params, ids, mask, output_hidden_states=True)["rewards"]
  cfg16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  got = _apply(cfg16, params16, ids, mask, output_hidden_states=True)["rewards"]
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.1 * float(jnp.abs(want).max()) + 0.02)


def test_gqa_equals_mha_with_repeated_kv_heads():
  cfg = CONFIGS["llama"]
  params = _init(cfg, jax.random.key(2))
  mha_cfg = cfg.replace(num_kv_heads=0)
  repeat = cfg.num_heads // cfg.kv_heads
  mha = jax.tree.map(lambda x: x, params)
  attn = mha["backbone"]["layers"]["self_attn"]
  for name in ("k_proj", "v_proj"):
    # kernel [layers, embed, kv_heads, head_dim]: query head h reads kv head h // repeat.
    attn[name]["kernel"] = jnp.repeat(attn[name]["kernel"], repeat, axis=2)
  ids, mask = _batch([8, 3, 5, 1], 8, left=True)
  np.testing.assert_allclose(
    _apply(cfg, params, ids, mask, output_hidden_states=True)["rewards"],
    _apply(mha_cfg, mha, ids, mask, output_hidden_states=True)["rewards"],
    atol=1e-5,
  )


# ----------------------------------------------------------------------------------------------
# RoPE.
# ----------------------------------------------------------------------------------------------

LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 64,
}


def _rope_cfg(scaling=None, **kw):
  base = dict(
    arch="llama", hidden_size=256, num_heads=2, max_position_embeddings=32, rope_theta=10000.0
  )
  return ModelConfig(**(base | kw), rope_scaling=freeze_rope_scaling(scaling))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3])
def test_rotary_scores_depend_only_on_relative_position(scaling):
  cfg = _rope_cfg(scaling)
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, cfg.dim_per_head)), jnp.float32) for _ in range(2))

  def score(pos_q, pos_k):
    cos, sin = rope.rotary_angles(cfg, jnp.asarray([[pos_q, pos_k]]))
    q_rot = rope.apply_rotary(q, cos[:, :1], sin[:, :1])
    k_rot = rope.apply_rotary(k, cos[:, 1:], sin[:, 1:])
    return float(jnp.sum(q_rot * k_rot))

  assert score(7, 3) == pytest.approx(score(4, 0), rel=1e-4)
  assert score(7, 3) != pytest.approx(score(5, 3), rel=1e-3)


def test_partial_rotary_leaves_the_rest_unchanged():
  cfg = _rope_cfg(arch="gpt_neox", rotary_pct=0.25)
  x = jnp.ones((1, 3, 1, cfg.dim_per_head))
  cos, sin = rope.rotary_angles(cfg, jnp.arange(3)[None])
  assert cos.shape[-1] == rope.rotary_dim(cfg) == cfg.dim_per_head // 4
  out = rope.apply_rotary(x, cos, sin)
  np.testing.assert_array_equal(out[..., rope.rotary_dim(cfg) :], 1.0)
  assert not np.allclose(out[0, 2, 0, : rope.rotary_dim(cfg)], 1.0)


def test_dynamic_rope_is_per_sequence():
  cfg = _rope_cfg({"rope_type": "dynamic", "factor": 2.0})
  plain = _rope_cfg()
  short = jnp.arange(40)[None] * (jnp.arange(40) < 20)[None]  # 20 real positions: <= 32
  long = jnp.arange(40)[None]  # 40 positions: beyond max_position_embeddings
  both = jnp.concatenate([short, long])
  cos, _ = rope.rotary_angles(cfg, both)
  np.testing.assert_allclose(cos[0], rope.rotary_angles(plain, short)[0][0], atol=1e-6)
  np.testing.assert_allclose(cos[1], rope.rotary_angles(cfg, long)[0][0], atol=1e-6)
  assert not np.allclose(cos[1], rope.rotary_angles(plain, long)[0][0], atol=1e-3)


def test_rope_from_hf_reads_old_and_new_layouts():
  old = {
    "rope_theta": 500000.0,
    "max_position_embeddings": 64,
    "rope_scaling": {
      "type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
    },
  }
  new = {"max_position_embeddings": 64, "rope_parameters": LLAMA3 | {"rope_theta": 500000.0}}
  keys = dict(theta_keys=("rope_theta",), pct_keys=(), default_pct=1.0)
  assert rope.rope_from_hf(old, **keys) == rope.rope_from_hf(new, **keys)
  neox = {"rotary_pct": 0.25, "rotary_emb_base": 1000}
  got = rope.rope_from_hf(
    neox, theta_keys=("rotary_emb_base",), pct_keys=("rotary_pct",), default_pct=0.25
  )
  assert got == {"rope_theta": 1000.0, "rotary_pct": 0.25, "rope_scaling": None}
  with pytest.raises(ValueError, match="yarn"):
    rope.rope_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, **keys)
  with pytest.raises(ValueError, match="factor"):
    rope.rope_from_hf({"rope_scaling": {"rope_type": "linear"}}, **keys)


@pytest.mark.parity
@pytest.mark.parametrize(
  "scaling",
  [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3, {"rope_type": "dynamic", "factor": 2.0}],
)
def test_inverse_frequencies_match_transformers(scaling):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg = _rope_cfg(scaling, max_position_embeddings=256)
  hf_cfg = transformers.LlamaConfig(
    hidden_size=cfg.hidden_size,
    num_attention_heads=cfg.num_heads,
    max_position_embeddings=256,
    rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"} | (scaling or {}),
  )
  kind = rope.rope_type(cfg)
  if kind == "default":
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg).inv_freq.numpy()
    np.testing.assert_allclose(rope.inv_frequencies(cfg), want, rtol=1e-6)
    return
  if kind != "dynamic":
    want, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    np.testing.assert_allclose(rope.inv_frequencies(cfg), want.numpy(), rtol=1e-6)
    return
  for seq_len in (100, 256, 300, 1000):
    want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=torch.tensor(seq_len))
    positions = jnp.arange(seq_len)[None]
    got = rope._dynamic_inv_freq_bk(cfg, positions)[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=2e-6)
