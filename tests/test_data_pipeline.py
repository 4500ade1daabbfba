"""Multi-task batching: equal per-task counts, epochs, exact resume, process slices, eval."""

from __future__ import annotations

import collections
import json

import grain
import jax
import numpy as np
import pytest

from jaxpref.data import (
  DataConfigError,
  MixingPlan,
  PreferenceItem,
  bucket_length,
  build_eval_batches,
  build_train_pipeline,
  length_buckets,
  read_preferences,
)
from jaxpref.testing import word_tokenizer

SIZES = {"a": 5, "b": 7, "c": 12}


def _tasks(sizes=SIZES, responses=2):
  """Items whose first word names them (`a3`), with lengths varying from 2 to 40 words."""
  rng = np.random.default_rng(0)
  tasks = {}
  for name, n in sizes.items():
    items = []
    for i in range(n):
      texts = tuple(
        f"{name}{i} " + " ".join(["x"] * int(rng.integers(1, 40))) for _ in range(responses)
      )
      scores = tuple(float(responses - r) for r in range(responses))
      items.append(PreferenceItem(texts, scores, prompt=f"{name}{i}", task=name, index=i))
    tasks[name] = items
  return tasks


@pytest.fixture(scope="module")
def tasks():
  return _tasks()


@pytest.fixture(scope="module")
def tokenizer(tasks):
  return word_tokenizer([t for items in tasks.values() for it in items for t in it.texts])


def _ids(batch, tokenizer):
  """(task name, item index) of every row, read back from the row's first token."""
  # A train batch (PaddedBatch) or an eval batch (dict).
  ids = batch["input_ids"] if isinstance(batch, dict) else batch.input_ids
  first = ids[:, 0, 0]  # Right padding: position 0 is the first token.
  words = tokenizer.convert_ids_to_tokens(first.tolist())
  return [(w[0], int(w[1:])) if w[0] in SIZES else None for w in words]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _equal(a, b):
  return type(a) is type(b) and all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def test_resample_batches_hold_equal_task_counts_and_cover_every_item(tasks, tokenizer):
  it = build_train_pipeline(
    tasks, tokenizer, global_batch_size=6, max_length=64, resampling_size=12, num_epochs=2, seed=1
  )
  assert it.num_steps == 12 and it.steps_per_epoch == 6.0 and it.task_names == ["a", "b", "c"]
  seen = collections.defaultdict(collections.Counter)
  for step, batch in enumerate(it):
    ids = _ids(batch, tokenizer)
    # Every batch: exactly 2 items of every task, and task_ids agree with the items.
    assert batch.task_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert [name for name, _ in ids] == ["a", "a", "b", "b", "c", "c"]
    for name, i in ids:
      seen[step // 6][name, i] += 1
  for epoch in (0, 1):
    for name, n in SIZES.items():
      counts = [seen[epoch][name, i] for i in range(n)]
      # R = 12 per task per epoch: every item, q or q + 1 times.
      assert sum(counts) == 12 and min(counts) == 12 // n and max(counts) <= -(-12 // n)


def test_resample_smaller_than_task_rotates_through_all_items():
  plan = MixingPlan([10, 3], 2, resampling_size=4, seed=5)
  a_items = [plan.rows(step)[1][0] for step in range(12)]  # 3 epochs of 4 a-items.
  assert sorted(a_items[:10]) == list(range(10))  # Nothing starved, without replacement.
  b_items = [plan.rows(step)[1][1] for step in range(12)]
  for epoch in range(3):
    assert set(b_items[4 * epoch : 4 * epoch + 4]) == {0, 1, 2}


def test_default_resampling_size_is_largest_task_and_no_shuffle_is_file_order():
  plan = MixingPlan([2, 3], 2, shuffle=False)
  assert plan.resampling_size == 3
  assert [plan.rows(s)[1].tolist() for s in range(3)] == [[0, 0], [1, 1], [0, 2]]


def test_proportional_mixing_sees_each_item_once_per_epoch(tasks, tokenizer):
  it = build_train_pipeline(
    tasks,
    tokenizer,
    global_batch_size=8,
    max_length=64,
    mixing="proportional",
    num_epochs=1,
    seed=2,
  )
  assert it.num_steps == 3
  rows = [row for batch in it for row in _ids(batch, tokenizer)]
  assert sorted(rows) == sorted((n, i) for n, k in SIZES.items() for i in range(k))
  names = {"a": 0, "b": 1, "c": 2}
  batch = it.dataset[0]
  assert batch.task_ids.tolist() == [names[n] for n, _ in _ids(batch, tokenizer)]


def test_batches_are_padded_to_the_bucket_of_their_longest_row(tasks, tokenizer):
  it = build_train_pipeline(
    tasks, tokenizer, global_batch_size=6, max_length=48, buckets=(8, 16, 32, 48), num_steps=6
  )
  for batch in it:
    longest = int(batch.attention_mask.sum(-1).max())
    assert batch.input_ids.shape[-1] == bucket_length(longest, (8, 16, 32, 48))
    assert batch.scores.dtype == np.float32 and batch.task_ids.dtype == np.int32


def test_resume_from_saved_state_gives_the_same_batches(tasks, tokenizer):
  kwargs = dict(global_batch_size=6, max_length=64, resampling_size=9, num_steps=10, seed=4)
  reference = list(build_train_pipeline(tasks, tokenizer, **kwargs))
  first = build_train_pipeline(tasks, tokenizer, **kwargs)
  head = _take(first, 4)
  state = json.loads(json.dumps(first.get_state()))  # JSON round trip, as a checkpoint would.
  _take(first, 2)  # The original moves on; the state must not.
  resumed = build_train_pipeline(tasks, tokenizer, **kwargs)
  resumed.set_state(state)
  tail = list(resumed)
  assert len(head) + len(tail) == len(reference) == 10
  assert all(_equal(x, y) for x, y in zip(head + tail, reference))
  other = build_train_pipeline(tasks, tokenizer, **{**kwargs, "seed": 5})
  assert not all(_equal(x, y) for x, y in zip(list(other), reference))
  with pytest.raises(DataConfigError, match="other data or options"):
    other.set_state(state)


def test_resume_through_grain_orbax_checkpoint_handler(tasks, tokenizer, tmp_path):
  from etils import epath

  kwargs = dict(global_batch_size=3, max_length=64, num_steps=6, seed=0)
  it = build_train_pipeline(tasks, tokenizer, **kwargs)
  _take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  restored = handler.restore(
    epath.Path(tmp_path),
    args=grain.checkpoint.CheckpointRestore(build_train_pipeline(tasks, tokenizer, **kwargs)),
  )
  assert all(_equal(x, y) for x, y in zip(list(restored), list(it)))


def test_process_slices_partition_the_global_batch_with_one_length(tasks, tokenizer):
  kwargs = dict(
    global_batch_size=12, max_length=64, num_steps=5, seed=3, buckets=tuple(range(4, 65, 4))
  )
  whole = list(build_train_pipeline(tasks, tokenizer, **kwargs))
  parts = [
    list(build_train_pipeline(tasks, tokenizer, process_index=p, process_count=2, **kwargs))
    for p in range(2)
  ]
  lengths_differ = False
  for step, batch in enumerate(whole):
    slices = [parts[p][step] for p in range(2)]
    for s in slices:
      assert s.input_ids.shape == (6, 2, batch.input_ids.shape[-1])  # Same bucket.
      assert s.task_ids.tolist() == [0, 0, 1, 1, 2, 2]  # Equal per-task counts per process.
    local = [bucket_length(int(s.attention_mask.sum(-1).max()), kwargs["buckets"]) for s in slices]
    lengths_differ |= local[0] != local[1]
    union = sorted(_ids(slices[0], tokenizer) + _ids(slices[1], tokenizer))
    assert union == sorted(_ids(batch, tokenizer))
  assert lengths_differ  # The test data does exercise the shared-bucket rule.


def test_config_errors_are_clear(tasks, tokenizer):
  with pytest.raises(DataConfigError, match="divisible by the number of tasks"):
    build_train_pipeline(tasks, tokenizer, global_batch_size=7, num_steps=1)
  with pytest.raises(DataConfigError, match="times the number of processes"):
    build_train_pipeline(tasks, tokenizer, global_batch_size=6, num_steps=1, process_count=4)
  with pytest.raises(DataConfigError, match="has no items"):
    build_train_pipeline({"a": tasks["a"], "e": []}, tokenizer, global_batch_size=2, num_steps=1)
  three = _tasks({"d": 3}, responses=3)
  with pytest.raises(DataConfigError, match="has 3 responses but responses_per_item=2"):
    build_train_pipeline(three, tokenizer, global_batch_size=1, num_steps=1)


def test_items_with_fewer_responses_are_padded_on_the_response_axis(tasks, tokenizer):
  mixed = {"a": tasks["a"], "d": _tasks({"d": 4}, responses=3)["d"]}
  tok = word_tokenizer([t for items in mixed.values() for it in items for t in it.texts])
  batch = next(
    build_train_pipeline(mixed, tok, global_batch_size=4, num_steps=1, responses_per_item=3)
  )
  assert batch.scores.shape == (4, 3)
  np.testing.assert_array_equal(batch.scores[:2, 2], [-1, -1])
  assert not batch.attention_mask[:2, 2].any() and batch.attention_mask[2:, 2].any()


def test_eval_batches_cover_items_once_in_order_with_dummy_rows(tasks, tokenizer):
  items = [it for name in ("c", "a") for it in tasks[name]]  # 17 items.
  batches = build_eval_batches(
    items, tokenizer, batch_size=4, max_length=64, task_names=["a", "b", "c"]
  )
  assert len(batches) == 5 and batches.num_items == 17
  out = list(batches)
  index = np.concatenate([b["item_index"] for b in out])
  valid = np.concatenate([b["valid_b"] for b in out])
  assert index[valid].tolist() == list(range(17)) and (index[~valid] == -1).all()
  last = out[-1]
  assert last["valid_b"].tolist() == [True, False, False, False]
  assert (last["scores"][1:] == -1).all() and not last["attention_mask"][1:].any()
  rows = [row for b in out for row, ok in zip(_ids(b, tokenizer), b["valid_b"]) if ok]
  assert [row for b in out for row, ok in zip(_ids(b, tokenizer), b["valid_b"]) if not ok] == [
    None
  ] * 3
  assert rows == [(it.task, it.index) for it in items]
  task_ids = np.concatenate([b["task_ids"] for b in out])[valid]
  assert task_ids.tolist() == [2] * 12 + [0] * 5
  for b in out:
    assert b["input_ids"].shape[-1] in length_buckets(64)
  halves = [
    list(
      build_eval_batches(
        items, tokenizer, batch_size=4, max_length=64, process_index=p, process_count=2
      )
    )
    for p in range(2)
  ]
  for whole, p0, p1 in zip(out, *halves):
    for key in ("input_ids", "scores", "valid_b", "item_index"):
      np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), whole[key])


def test_real_files_multi_task_epoch(preferences_dir, gpt2_tokenizer_file):
  from jaxpref.data import load_tokenizer

  helpful, _ = read_preferences(preferences_dir / "helpful.json")
  webgpt, _ = read_preferences(preferences_dir / "webgpt.json", on_tie="skip")
  tasks = {"helpful": helpful[:60], "webgpt": webgpt[:40]}
  it = build_train_pipeline(
    tasks,
    load_tokenizer(gpt2_tokenizer_file),
    global_batch_size=8,
    max_length=128,
    resampling_size=60,
    num_epochs=1,
  )
  assert it.num_steps == 15
  scores = collections.defaultdict(list)
  for batch in it:
    assert batch.task_ids.tolist() == [0] * 4 + [1] * 4
    for t, s in zip(batch.task_ids, batch.scores):
      scores[int(t)].append(tuple(s.tolist()))
  assert collections.Counter(scores[0]) == {(1.0, 0.0): 60}
  expected = collections.Counter(it.scores for it in webgpt[:40])
  assert set(collections.Counter(scores[1])) == set(expected)
  assert it.truncated_by_task["helpful"] > 0


def test_swapped_preferences_are_refused_naming_the_task_unless_forced(tasks, tokenizer):
  """Same lengths and scores, other content (chosen and rejected swapped): a changed dataset."""
  kwargs = dict(global_batch_size=6, max_length=64, resampling_size=9, num_steps=10, seed=4)
  first = build_train_pipeline(tasks, tokenizer, **kwargs)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  swapped = dict(tasks)
  swapped["b"] = [
    PreferenceItem(it.texts[::-1], it.scores, prompt=it.prompt, task="b", index=it.index)
    for it in tasks["b"]
  ]
  changed = build_train_pipeline(swapped, tokenizer, **kwargs)
  with pytest.raises(DataConfigError, match="task 'b' differs from the checkpoint"):
    changed.set_state(state)
  changed.set_state(state, force=True)  # The user says they mean it: resumes at the same step.
  assert changed.get_state()["next_index"] == 3


def test_state_of_process_0_resumes_every_process_at_the_train_step(tasks, tokenizer):
  """What multi-process resume relies on: one saved state, the position taken from the step."""
  kwargs = dict(global_batch_size=6, max_length=64, resampling_size=9, num_steps=8, seed=1)
  p0 = build_train_pipeline(tasks, tokenizer, process_index=0, process_count=2, **kwargs)
  _take(p0, 2)
  state = json.loads(json.dumps(p0.get_state()))
  reference = list(
    build_train_pipeline(tasks, tokenizer, process_index=1, process_count=2, **kwargs)
  )
  p1 = build_train_pipeline(tasks, tokenizer, process_index=1, process_count=2, **kwargs)
  p1.set_state({**state, "next_index": 0}, step=5)  # The train state's step wins.
  assert all(_equal(x, y) for x, y in zip(list(p1), reference[5:]))
  # Another process layout of the same run: the same fingerprint (a step's items do not change).
  single = build_train_pipeline(tasks, tokenizer, **kwargs)
  single.set_state(state, step=2)


def test_packed_pipeline_agrees_on_rows_across_processes(tasks, tokenizer):
  """Each process packs its own items into the same number of rows, computed without any
  collective, and its last-token indices point into its block of the global rows."""
  kwargs = dict(global_batch_size=12, max_length=64, num_steps=4, seed=3)
  padded = [
    list(build_train_pipeline(tasks, tokenizer, process_index=p, process_count=2, **kwargs))
    for p in range(2)
  ]
  packed = [
    list(
      build_train_pipeline(
        tasks,
        tokenizer,
        process_index=p,
        process_count=2,
        packing_row_length=64,
        packing_row_multiple=2,
        **kwargs,
      )
    )
    for p in range(2)
  ]
  for step in range(kwargs["num_steps"]):
    rows = {packed[p][step].input_ids.shape[0] for p in range(2)}
    assert len(rows) == 1 and rows.pop() % 2 == 0
    num_rows = packed[0][step].input_ids.shape[0]
    global_ids = np.concatenate([packed[p][step].input_ids for p in range(2)]).ravel()
    for p in range(2):
      want, got = padded[p][step], packed[p][step]
      np.testing.assert_array_equal(got.lengths, want.attention_mask.sum(-1))
      np.testing.assert_array_equal(got.scores, want.scores)
      last = got.last_index.reshape(got.lengths.shape)
      real = got.lengths > 0
      assert ((last[real] // 64) // num_rows == p).all()  # In this process's block of rows.
      # The last token of every response is where its index says, in the global array.
      ids_bnl, mask_bnl = want.input_ids, want.attention_mask
      for b, n in zip(*np.nonzero(real)):
        assert global_ids[last[b, n]] == ids_bnl[b, n][mask_bnl[b, n] > 0][-1]
