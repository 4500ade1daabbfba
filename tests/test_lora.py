"""LoRA reward models: adapters, frozen base, merged and PEFT exports, reward statistics."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers as th
from flax import traverse_util

from jaxpref import aot
from jaxpref.data.batch import PaddedBatch
from jaxpref.evaluation import reward_stats
from jaxpref.models import hf_export as export
from jaxpref.models import lora, reward_model
from jaxpref.models.config import ModelConfig
from jaxpref.objectives import objective as objectives
from jaxpref.training import step as train_step_lib
from jaxpref.training import trainable

GPT2_EOS = 50256


def _cfg(arch: str, **changes) -> ModelConfig:
  base = dict(arch=arch, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4)
  base["intermediate_size"] = 64
  if arch == "llama":
    base |= dict(num_kv_heads=2, hidden_act="silu")
  return ModelConfig(**(base | changes))


def _tokens(b=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 64, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  mask[1, 8:] = 0
  return jnp.asarray(ids), jnp.asarray(mask)


def _flat(params):
  return {
    "/".join(k): np.array(v, copy=True) for k, v in traverse_util.flatten_dict(params).items()
  }


def test_adapters_start_at_the_base_model_and_merge_exactly(arch="gpt_neox"):
  # GPT-NeoX's fused QKV kernel [embed, heads, 3, head_dim] is the awkward shape; Llama's merge is
  # covered end to end below (merged export and PEFT against the unmerged rewards).
  base_cfg = _cfg(arch)
  cfg = base_cfg.replace(lora=lora.LoraConfig(rank=4, alpha=8.0))
  params = reward_model.init_params(cfg, jax.random.key(0))
  ids, mask = _tokens()
  # B = 0 at initialisation: the adapted model is the base model.
  base_rewards = reward_model.apply(base_cfg, lora.without_adapters(params), ids, mask)["rewards"]
  np.testing.assert_array_equal(reward_model.apply(cfg, params, ids, mask)["rewards"], base_rewards)
  # Every attention and MLP dense layer got adapters; the embeddings and the head did not.
  adapted = sorted("/".join(path) for path, _ in lora.adapter_modules(params))
  expected = {
    "llama": ["self_attn/" + n for n in ("k_proj", "o_proj", "q_proj", "v_proj")]
    + ["mlp/" + n for n in ("down_proj", "gate_proj", "up_proj")],
    "gpt_neox": ["attention/dense", "attention/query_key_value"]
    + ["mlp/dense_4h_to_h", "mlp/dense_h_to_4h"],
  }[arch]
  assert adapted == sorted(f"backbone/layers/{n}" for n in expected)
  # The adapters shard like the kernels they adapt (input axes for A, output axes for B).
  axes = {
    "/".join(k): tuple(v)
    for k, v in traverse_util.flatten_dict(reward_model.logical_axes(cfg)).items()
  }
  name = "self_attn/q_proj" if arch == "llama" else "attention/query_key_value"
  assert axes[f"backbone/layers/{name}/lora_a"][:2] == ("layers", "embed")
  # Trained adapters: the unmerged forward pass equals the merged plain model.
  trained = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 * (p[-1].key == "lora_b"), params
  )
  merged_cfg, merged = lora.merge(cfg, trained)
  assert merged_cfg.lora is None and set(_flat(merged)) == set(_flat(lora.without_adapters(params)))
  ours = reward_model.apply(cfg, trained, ids, mask)["rewards"]
  assert not np.allclose(ours, base_rewards, atol=1e-4)
  np.testing.assert_allclose(
    reward_model.apply(merged_cfg, merged, ids, mask)["rewards"], ours, atol=1e-5
  )


def test_targets_by_name_and_clear_errors():
  cfg = _cfg("gpt_neox", lora=lora.LoraConfig(rank=2, targets=("attention.dense",)))
  params = reward_model.abstract_params(cfg)
  assert [p for p, _ in lora.adapter_modules(params)] == [
    ("backbone", "layers", "attention", "dense")
  ]
  cfg = _cfg("llama", lora=lora.LoraConfig(rank=2, targets=("q_proj", "wq")))
  with pytest.raises(ValueError, match=r"wq matches no dense layer of model.arch='llama'"):
    reward_model.abstract_params(cfg)
  # A mixture-of-experts MLP: the router stays frozen (its experts are not dense layers).
  moe = _cfg("llama", lora=lora.LoraConfig(rank=2)).replace(
    arch="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16
  )
  adapted = {path[-1] for path, _ in lora.adapter_modules(reward_model.abstract_params(moe))}
  assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
  with pytest.raises(ValueError, match="lora.rank"):
    lora.LoraConfig(rank=0)


def _batch(b=4, n=2, length=8, seed=0):
  rng = np.random.default_rng(seed)
  return PaddedBatch(
    input_ids=jnp.asarray(rng.integers(1, 64, (b, n, length)), jnp.int32),
    attention_mask=jnp.ones((b, n, length), jnp.int32),
    scores=jnp.asarray(np.tile([1.0, 0.0], (b, 1)), jnp.float32),
    task_ids=jnp.zeros((b,), jnp.int32),
  )


def test_train_step_changes_only_adapters_and_head():
  # bf16 base with remat, dropout, gradient accumulation and MORE (float32 runs end to end below).
  cfg = _cfg(
    "llama",
    lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1),
    param_dtype="bfloat16",
    dtype="bfloat16",
    remat=True,
  )
  program = train_step_lib.build_train_step(
    cfg,
    loss_cfg=objectives.LossConfig(kind="more"),
    optimizer=optax.adam(1e-2),
    schedule=optax.constant_schedule(1e-2),
    num_tasks=1,
    grad_accum_steps=2,
  )
  state = program.init(jax.random.key(0))
  before = _flat(state.params)
  # No optimizer state for the frozen base: Adam's moments cover the trainable part only.
  trained_count, total = lora.count_trainable(cfg, state.params)
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert moments == 2 * trained_count < total
  for i in range(2):
    state, metrics = program.step_fn(state, _batch(seed=i))
  assert np.isfinite(float(metrics["loss"]))
  after = _flat(state.params)
  for path, value in before.items():
    if lora.is_trainable(tuple(path.split("/"))):
      if path.endswith("lora_b") or path.startswith("score"):
        assert not np.array_equal(after[path], value), path
      assert after[path].dtype == (np.float32 if "lora" in path else value.dtype)
    else:
      np.testing.assert_array_equal(after[path], value, err_msg=path)  # bit-identical
  # The trainable part is what `trainable.split` says, and it joins back to the same tree.
  part, frozen = trainable.split(cfg, state.params)
  assert set(_flat(part)) == {p for p in before if lora.is_trainable(tuple(p.split("/")))}
  assert set(_flat(trainable.join(part, frozen))) == set(before)


def test_aot_plan_counts_only_trainable_optimizer_state():
  config = th.tiny_config(lock=False, lora__rank=4)
  config.data.max_length = 32
  config.train.batch_size = 2
  plan = aot.plan(config, jax.devices()[:1], "cpu")
  assert 0 < plan.trainable_param_count < plan.param_count / 100
  # AdamW's two float32 moments for the adapters and the head only (plus scalar counts).
  assert 0 <= plan.opt_state_bytes_total - 8 * plan.trainable_param_count < 64


def test_reward_stats_round_trip(tmp_path):
  stats = reward_stats.compute(np.array([[1.0, 3.0], [5.0, 99.0]]), np.array([[1, 0], [1, -1]]))
  assert stats == {"mean": 3.0, "std": pytest.approx(np.std([1, 3, 5])), "count": 3}
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  reward_stats.add_to_hf_config(tmp_path, stats)
  assert json.loads((tmp_path / "config.json").read_text())["mean"] == 3.0
  (tmp_path / reward_stats.FILE).unlink()
  assert reward_stats.read(tmp_path) == {"mean": 3.0, "std": stats["std"]}
  np.testing.assert_allclose(reward_stats.normalize(np.array([3.0, 5.0]), stats)[0], 0.0)


# ---------------------------------------------------------------------------------------------
# End to end: a tiny Hugging Face Llama base, LoRA training, merged and PEFT exports.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama_base(torch, tmp_path_factory):
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=50304,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=GPT2_EOS,
    eos_token_id=GPT2_EOS,
    bos_token_id=GPT2_EOS,
  )
  path = tmp_path_factory.mktemp("llama_base")
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def _run(*args):
  proc = subprocess.run(
    [sys.executable, "-m", *args],
    env=th.env_with(),
    cwd=th.REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _lora_flags(base, *extra):
  return (
    f"--config.model.path={base}",
    "--config.lora.rank=4",
    "--config.lora.alpha=8",
    "--config.train.learning_rate=0.01",
    "--config.data.eval_fraction=0.05",
    *extra,
  )


TEXTS = [
  "Human: hi\n\nAssistant: hello there",
  "Human: why is the sky blue?\n\nAssistant: because of Rayleigh scattering",
]


def _hf_rewards(torch, model, tokenizer):
  # One text per call: the exported tokenizer's plain call, no padding (the input contract).
  with torch.no_grad():
    return np.array([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in TEXTS])


def test_lora_run_exports_merged_and_peft_adapter(torch, llama_base, tmp_path):
  import peft
  import transformers

  from jaxpref.evaluation.scoring import score_fn
  from jaxpref.models import hf_io
  from jaxpref.models.source import load_for_inference

  workdir = tmp_path / "run"
  # Packing, remat and MORE together with LoRA.
  th.run_train(
    workdir,
    *_lora_flags(
      llama_base,
      "--config.train.steps=2",
      "--config.data.packing=True",
      "--config.model.remat=True",
      "--config.loss.kind=more",
    ),
  )
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  counts = next(r for r in records if "trainable_params" in r)
  assert 0 < counts["trainable_params"] < counts["total_params"] / 100
  stats = json.loads((workdir / reward_stats.FILE).read_text())
  assert stats["count"] > 0 and stats["std"] > 0 and stats["step"] == 2

  # The base weights are bit-identical to the checkpoint's; the adapters moved.
  cfg, params, _, _ = load_for_inference(workdir=str(workdir))
  assert cfg.lora == lora.LoraConfig(rank=4, alpha=8.0)
  _, base_params = hf_io.load_hf(llama_base)
  ours_flat, base_flat = _flat(params), _flat(base_params)
  for path, value in base_flat.items():
    if path.startswith("backbone"):
      np.testing.assert_array_equal(ours_flat[path], value, err_msg=path)
  assert any(np.abs(v).max() > 0 for p, v in ours_flat.items() if p.endswith("lora_b"))

  # Merged: a plain checkpoint that transformers reads, with the reward statistics in its config.
  merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
  export.export(workdir, merged_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
  ours = []
  for text in TEXTS:
    enc = tokenizer(text, return_tensors="np")
    ours.append(np.asarray(score_fn(cfg, params, enc["input_ids"], enc["attention_mask"])[0])[0])
  ours = np.array(ours)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
  np.testing.assert_allclose(_hf_rewards(torch, merged, tokenizer), ours, atol=1e-4)
  config = json.loads((merged_dir / "config.json").read_text())
  assert (config["mean"], config["std"]) == (stats["mean"], stats["std"])

  # Adapter: PEFT on the untouched base gives the same rewards; the head came along.
  _run("jaxpref.export", f"--workdir={workdir}", f"--output={adapter_dir}", "--adapter")
  assert json.loads((adapter_dir / reward_stats.FILE).read_text())["mean"] == stats["mean"]
  adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
  assert adapter_config["modules_to_save"] == ["score"] and adapter_config["r"] == 4
  # The base's config.json says pad = EOS; the run's input contract pads with another token, so
  # transformers must be told (else it skips the EOS the contract appends and pools one earlier).
  base = transformers.AutoModelForSequenceClassification.from_pretrained(
    llama_base, num_labels=1, pad_token_id=tokenizer.pad_token_id
  )
  model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  np.testing.assert_allclose(_hf_rewards(torch, model, tokenizer), ours, atol=1e-4)

  # jaxpref.score reads the adapter dir (base + adapters + head) and normalises with its stats.
  data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  _run(
    "jaxpref.score", f"--model={adapter_dir}", f"--data={data}", f"--output={out}", "--normalize"
  )
  normalised = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
  np.testing.assert_allclose(normalised, (ours - stats["mean"]) / stats["std"], atol=1e-4)


@pytest.mark.slow
def test_lora_resume_is_exact_on_an_fsdp_mesh(llama_base, tmp_path):
  flags = _lora_flags(
    llama_base,
    "--config.checkpoint.every_steps=1",
    "--config.eval.final=False",
    "--config.train.schedule=constant",  # the same learning rates whatever train.steps says
    "--config.lora.dropout=0.1",
    "--config.mesh.fsdp=2",
  )
  th.run_train(tmp_path / "straight", *flags, "--config.train.steps=3", devices=2)
  th.run_train(tmp_path / "resumed", *flags, "--config.train.steps=2", devices=2)
  second = th.run_train(tmp_path / "resumed", *flags, "--config.train.steps=3", devices=2)
  assert "Resuming from the checkpoint of step 2" in second.stderr
  # Step 3's loss and gradient norm are computed from the restored adapters, head, optimizer
  # state and dropout key: equal to the last bit when the resume is exact.
  for name in ("loss", "grad_norm"):
    straight = th.metric_by_step(tmp_path / "straight", name)
    resumed = th.metric_by_step(tmp_path / "resumed", name)
    assert straight == resumed, name
