"""MORE's cost: a jitted train step with `loss.kind=more` over the same step with `multitask`.

Both steps are the trainer's own (`jaxpref.training.step.build_from_config`: forward, backward,
clipped AdamW update) of the same tiny GPT-NeoX reward model on the same batches; they differ
only in the objective, so the ratio is what MORE adds (per-task head gradients, momentum, the
min-norm solve). The two are timed in alternating blocks and the median block is reported.

For comparison it also re-creates the paper's host-side procedure (official code, `trainer.py`):
each step runs the forward pass, copies the pooled embeddings and the head to the host, builds a
CPU torch `nn.Linear` copy of the head, does one backward pass per task, updates the momentum in
numpy, normalises, runs a numpy Frank-Wolfe (1e-5 stopping rule), and then takes the weighted
training step on device. (In PyTorch the forward graph is kept across the host part; a jitted
JAX step cannot pause, so this re-creation runs the forward twice: `host_only` gives the host
part alone.)

Prints a table and, with `--json OUT`, writes the numbers. `--smoke` runs a few steps (CI).

  .venv/bin/python benchmarks/more_overhead.py --json /tmp/more_overhead.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpref.data.batch import PaddedBatch
from jaxpref.evaluation import scoring
from jaxpref.models.config import ModelConfig
from jaxpref.objectives import losses
from jaxpref.objectives import objective as objectives
from jaxpref.training import step as train_step_lib
from jaxpref.training.config import base_config


def make_batches(rng, count, batch_size, num_tasks, seq_len, vocab_size):
  """Random pairs with right padding, ~10% ties, every task present in every batch."""
  batches = []
  for _ in range(count):
    lengths = rng.integers(seq_len // 4, seq_len + 1, size=(batch_size, 2))
    mask = (np.arange(seq_len)[None, None, :] < lengths[..., None]).astype(np.int32)
    ids = rng.integers(0, vocab_size, size=(batch_size, 2, seq_len)).astype(np.int32) * mask
    scores = np.tile(np.array([1.0, 0.0], np.float32), (batch_size, 1))
    scores[rng.random(batch_size) < 0.1] = 0.5
    task_ids = (np.arange(batch_size) % num_tasks).astype(np.int32)
    batches.append(
      {"input_ids": ids, "attention_mask": mask, "scores": scores, "task_ids": task_ids}
    )
  return [jax.device_put(b) for b in batches]


# ------------------------------------------------------------------------------------------------
# The paper's host-side procedure, re-created (numpy / CPU torch)
# ------------------------------------------------------------------------------------------------


def _two_point(v1v1, v1v2, v2v2):
  """min_g ||g x1 + (1 - g) x2||^2 as the official solver does it, corner cases at 0.999/0.001."""
  if v1v2 >= v1v1:
    return 0.999, v1v1
  if v1v2 >= v2v2:
    return 0.001, v2v2
  gamma = -(v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)
  return gamma, v2v2 + gamma * (v1v2 - v2v2)


def paper_frank_wolfe(vectors, max_iter=1000, stop=1e-5):
  """Best pair, then Frank-Wolfe with line search until the weights move by < `stop`."""
  n = len(vectors)
  gram = vectors @ vectors.T
  best = None
  for i in range(n):
    for j in range(i + 1, n):
      c, d = _two_point(gram[i, i], gram[i, j], gram[j, j])
      if best is None or d < best[0]:
        best = (d, i, j, c)
  weights = np.zeros(n)
  _, i, j, c = best
  weights[i], weights[j] = c, 1 - c
  if n < 3:
    return weights
  for _ in range(max_iter):
    t = int(np.argmin(gram @ weights))
    gamma, _ = _two_point(weights @ gram @ weights, weights @ gram[:, t], gram[t, t])
    new = gamma * weights
    new[t] += 1 - gamma
    if np.sum(np.abs(new - weights)) < stop:
      break
    weights = new
  return weights


class PaperHost:
  """Momentum in host memory, one CPU head copy per step, one backward per task."""

  def __init__(self, num_tasks, hidden_size, alpha=0.99):
    import torch  # noqa: PLC0415  (only this comparison needs torch)

    self.torch = torch
    self.head = torch.nn.Linear(hidden_size, 1, bias=False)
    self.momentum = [torch.zeros(hidden_size) for _ in range(num_tasks)]
    self.alpha = alpha

  def _ranking_loss(self, rewards, scores):
    valid = (scores[:, :, None] > scores[:, None, :]) & (scores >= 0)[:, :, None]
    valid = valid & (scores >= 0)[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    pairs = valid.sum()
    total = -(self.torch.nn.functional.logsigmoid(diff) * valid).sum()
    return total / pairs if pairs > 0 else total

  def weights(self, kernel_d1, pooled_bnd, scores_bn, task_ids_b):
    torch = self.torch
    head = copy.deepcopy(self.head)
    with torch.no_grad():
      head.weight.copy_(torch.from_numpy(np.asarray(kernel_d1).T.copy()))
    pooled = torch.from_numpy(np.array(pooled_bnd))
    scores = torch.from_numpy(np.array(scores_bn))
    task_ids = np.asarray(task_ids_b)
    rewards = head(pooled)[..., 0]
    present, task_losses = [], []
    for task in sorted(set(task_ids.tolist())):
      sel = torch.from_numpy(task_ids == task)
      loss = self._ranking_loss(rewards[sel], scores[sel])
      loss.backward(retain_graph=True)
      grad = copy.deepcopy(head.weight.grad.detach().view(-1))
      head.weight.grad.zero_()
      self.momentum[task] = (1 - self.alpha) * self.momentum[task] + self.alpha * grad
      present.append(task)
      task_losses.append(loss.item())
    grads = [self.momentum[t] for t in present]
    norms = [float(torch.linalg.norm(g)) or 1.0 for g in grads]
    vectors = torch.stack([g / n for g, n in zip(grads, norms)]).numpy().astype(np.float64)
    weights = np.zeros(len(self.momentum), np.float32)
    weights[present] = paper_frank_wolfe(vectors) if len(present) > 1 else 1.0
    return weights


def build_program(kind: str, model_cfg: ModelConfig, num_tasks: int):
  """`jaxpref.training.step.build_from_config` for `loss.kind=kind`: constant lr 1e-4, AdamW with
  weight decay 0.01, the trainer's default clipping; one device."""
  config = base_config()
  config.loss.kind = kind
  config.train.learning_rate, config.train.weight_decay = 1e-4, 0.01
  config.train.schedule, config.train.warmup_steps = "constant", 0
  return train_step_lib.build_from_config(
    config, model_cfg, num_tasks=num_tasks, total_steps=1, mesh=None
  )


def weighted_train_step(state, batch, weights_t, *, model_cfg, optimizer, num_tasks):
  """The train step with task weights given from outside (the paper's second half)."""

  def loss_fn(params):
    rewards_bn, _ = scoring.score_fn(model_cfg, params, batch["input_ids"], batch["attention_mask"])
    terms_bnn, valid_bnn = losses.pair_terms(rewards_bn, batch["scores"])
    onehot_bt = (batch["task_ids"][:, None] == jnp.arange(num_tasks)).astype(jnp.float32)
    sums_t = onehot_bt.T @ jnp.sum(terms_bnn, axis=(1, 2))
    pairs_t = onehot_bt.T @ jnp.sum(valid_bnn, axis=(1, 2), dtype=jnp.float32)
    present = jnp.sum(pairs_t > 0)
    return present * jnp.sum(weights_t * sums_t) / jnp.maximum(jnp.sum(pairs_t), 1.0)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss


def time_objectives(batch, params, model_cfg, num_tasks, repeats, calls):
  """Microseconds per call of the jitted objective alone (value and gradient w.r.t. rewards) on
  the model's real rewards and embeddings: the part of the step that differs between kinds."""
  rewards_bn, pooled_bnd = jax.jit(functools.partial(scoring.score_fn, model_cfg))(
    params, batch["input_ids"], batch["attention_mask"]
  )
  state = objectives.init_objective_state(num_tasks, model_cfg.hidden_size)
  out = {}
  for kind in objectives.KINDS:
    cfg = objectives.LossConfig(kind=kind)
    fn = jax.jit(
      jax.value_and_grad(
        lambda r, st, cfg=cfg: objectives.objective_loss(
          cfg, st, r, batch["scores"], batch["task_ids"], pooled_bnd, num_tasks=num_tasks
        ),
        has_aux=True,
      )
    )
    jax.block_until_ready(fn(rewards_bn, state))
    best = float("inf")
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(calls):
        result = fn(rewards_bn, state)
      jax.block_until_ready(result)
      best = min(best, (time.perf_counter() - start) / calls)
    out[kind] = 1e6 * best
  return out


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=16, help="preference items per step")
  parser.add_argument("--num_tasks", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--hidden_size", type=int, default=64)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
  parser.add_argument("--blocks", type=int, default=15, help="timed blocks per variant")
  parser.add_argument("--smoke", action="store_true", help="3 steps x 2 blocks (CI)")
  parser.add_argument("--json", type=Path, default=None, help="write the results here")
  args = parser.parse_args(argv)
  steps, blocks = (3, 2) if args.smoke else (args.steps, args.blocks)

  model_cfg = ModelConfig(
    arch="gpt_neox",
    vocab_size=512,
    hidden_size=args.hidden_size,
    num_layers=args.num_layers,
    num_heads=4,
    intermediate_size=4 * args.hidden_size,
    rotary_pct=0.25,
  )
  batches = make_batches(
    np.random.default_rng(0), 4, args.batch_size, args.num_tasks, args.seq_len, 512
  )
  # The trainer's own step (its builder, AdamW chain and clipping), once per objective.
  programs = {
    kind: build_program(kind, model_cfg, args.num_tasks) for kind in ("multitask", "more")
  }
  optimizer = programs["multitask"].optimizer
  state0 = programs["multitask"].init(jax.random.PRNGKey(0))

  def fresh_state():
    return jax.tree.map(jnp.copy, state0)

  runners = {kind: {"fn": p.step_fn, "state": fresh_state()} for kind, p in programs.items()}

  forward = jax.jit(
    lambda params, batch: scoring.score_fn(
      model_cfg, params, batch["input_ids"], batch["attention_mask"]
    )
  )
  weighted = jax.jit(
    functools.partial(
      weighted_train_step, model_cfg=model_cfg, optimizer=optimizer, num_tasks=args.num_tasks
    ),
    donate_argnums=0,
  )
  paper = PaperHost(args.num_tasks, args.hidden_size)
  paper_state = {"state": fresh_state(), "host_s": 0.0}

  def run_device(kind, count, offset):
    runner = runners[kind]
    metrics = None
    for k in range(count):
      batch = PaddedBatch.from_dict(batches[(offset + k) % len(batches)])
      runner["state"], metrics = runner["fn"](runner["state"], batch)
    jax.block_until_ready((runner["state"], metrics))

  def run_paper(count, offset):
    # Each phase waits for the previous one, as in the official code: the host needs the
    # embeddings, and the device step needs the weights.
    state = paper_state["state"]
    for k in range(count):
      batch = batches[(offset + k) % len(batches)]
      _, pooled_bnd = forward(state.params, batch)
      pooled_bnd = jax.block_until_ready(pooled_bnd)
      start = time.perf_counter()
      kernel, pooled, scores, task_ids = jax.device_get(
        (state.params["score"]["kernel"], pooled_bnd, batch["scores"], batch["task_ids"])
      )
      weights_t = paper.weights(kernel, pooled, scores, task_ids)
      paper_state["host_s"] += time.perf_counter() - start
      state, loss = weighted(state, batch, jnp.asarray(weights_t))
      jax.block_until_ready((state, loss))
    paper_state["state"] = state

  variants = {
    "multitask": functools.partial(run_device, "multitask"),
    "more": functools.partial(run_device, "more"),
    "paper_host": run_paper,
  }
  for run in variants.values():  # compile and warm up
    run(2, 0)
  times = {name: [] for name in variants}
  host_times = []
  for block in range(blocks):
    # Alternate the order so drifts in machine load hit every variant alike.
    order = list(variants) if block % 2 == 0 else list(reversed(variants))
    for name in order:
      paper_state["host_s"] = 0.0
      start = time.perf_counter()
      variants[name](steps, block * steps)
      times[name].append((time.perf_counter() - start) / steps)
      if name == "paper_host":
        host_times.append(paper_state["host_s"] / steps)

  objective_us = time_objectives(
    batches[0],
    state0.params,
    model_cfg,
    args.num_tasks,
    2 if args.smoke else 5,
    10 if args.smoke else 200,
  )
  median = {name: statistics.median(values) for name, values in times.items()}
  block_ratios = [m / b for m, b in zip(times["more"], times["multitask"])]
  result = {
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "jax": jax.__version__,
    "model": {
      "arch": "gpt_neox",
      "hidden_size": args.hidden_size,
      "num_layers": args.num_layers,
      "params": sum(x.size for x in jax.tree.leaves(state0.params)),
    },
    "batch": {
      "items": args.batch_size,
      "responses": 2,
      "seq_len": args.seq_len,
      "num_tasks": args.num_tasks,
    },
    "steps_per_block": steps,
    "blocks": blocks,
    "step_ms_median": {name: 1e3 * value for name, value in median.items()},
    "step_ms_blocks": {name: [1e3 * v for v in values] for name, values in times.items()},
    "paper_host_only_ms_median": 1e3 * statistics.median(host_times),
    "objective_only_us_min": objective_us,
    "more_objective_overhead_fraction_of_step": (
      (objective_us["more"] - objective_us["multitask"]) * 1e-6 / median["multitask"]
    ),
    "ratio_more_over_multitask": median["more"] / median["multitask"],
    "ratio_more_over_multitask_blocks": block_ratios,
    "ratio_paper_host_over_multitask": median["paper_host"] / median["multitask"],
    "ratio_multitask_plus_host_over_multitask": (
      (median["multitask"] + statistics.median(host_times)) / median["multitask"]
    ),
  }
  print(f"device: {result['device']}  model: {result['model']}  batch: {result['batch']}")
  print(f"{'variant':<24}{'ms/step (median)':>18}{'min':>10}{'/ multitask':>14}")
  for name, values in times.items():
    print(
      f"{name:<24}{1e3 * median[name]:>18.3f}{1e3 * min(values):>10.3f}"
      f"{median[name] / median['multitask']:>14.3f}"
    )
  print(f"{'  of which host part':<24}{result['paper_host_only_ms_median']:>18.3f}")
  print(
    f"MORE / MultiTask = {result['ratio_more_over_multitask']:.3f} "
    f"(blocks: {', '.join(f'{r:.3f}' for r in block_ratios)})"
  )
  print(
    "objective alone (value and grad, us/call, best of blocks): "
    + ", ".join(f"{kind} {us:.1f}" for kind, us in objective_us.items())
  )
  print(
    f"MORE's extra objective time = {100 * result['more_objective_overhead_fraction_of_step']:.2f}"
    "% of a MultiTask step"
  )
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()
