"""What a resumed run must share with its checkpoint, and the records each run segment leaves.

A run resumed in the same workdir continues the saved optimisation, so settings that change what
the checkpoint means are refused unless `resume.force=True`: the objective (`loss.*`), the model
(`model.*` but compute dtype and remat) and the data (`data.*` but padding buckets and packing,
`train.batch_size`, `train.seed`). A different parameter shape is refused even with force: the
checkpoint cannot be restored into it. Every other change (more steps, eval cadence, learning
rate...) is allowed, logged, and recorded as `config.<step>.json`, the config of the segment that
starts at that step (`config.json` is the first segment's). Data content is checked separately,
by the data iterator (a hash of every task's token ids and scores).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

# Changes that would silently turn the checkpoint into another experiment.
MEANING_PREFIXES = ("model.", "loss.", "data.", "train.batch_size", "train.seed")
# ...except these: numerics of the same computation, padding, and paths (content is hashed).
HARMLESS = {
  "model.dtype",
  "model.remat",
  "model.path",
  "data.files",
  "data.tokenizer",
  "data.min_bucket",
  "data.bucket_multiple",
  "data.packing",
  "data.shared_prompts",
}
NOT_COMPARED = ("resume.",)


class ResumeConfigError(ValueError):
  """A resumed run's config changes what its checkpoint means; the message says what and how."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (what config.json holds)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def changes(saved: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`{key: (saved value, new value)}` for every key that differs."""
  old, new = _flat(saved), _flat(config)
  return {
    key: (old.get(key), new.get(key))
    for key in sorted(set(old) | set(new))
    if old.get(key) != new.get(key) and not key.startswith(NOT_COMPARED)
  }


def meaningful(key: str) -> bool:
  return key.startswith(MEANING_PREFIXES) and key not in HARMLESS


def segment_configs(workdir: str | Path) -> dict[int, Path]:
  """`{first step: config file}` of every run segment recorded in `workdir`."""
  workdir = Path(workdir)
  found = {0: workdir / "config.json"} if (workdir / "config.json").is_file() else {}
  for path in workdir.glob("config.*.json"):
    middle = path.name[len("config.") : -len(".json")]
    if middle.isdigit():
      found[int(middle)] = path
  return dict(sorted(found.items()))


def config_at(workdir: str | Path, step: int) -> dict[str, Any] | None:
  """The config of the segment that wrote the checkpoint of `step` (None: no record)."""
  candidates = [(s, p) for s, p in segment_configs(workdir).items() if s <= max(step - 1, 0)]
  return json.loads(candidates[-1][1].read_text()) if candidates else None


def check_resume(
  workdir: str | Path, step: int, config: ml_collections.ConfigDict
) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the config that wrote checkpoint `step`; returns the changes.

  Raises:
    ResumeConfigError: a change of meaning (see the module docstring) without `resume.force`.
  """
  saved = config_at(workdir, step)
  if saved is None:
    return {}
  changed = changes(saved, config_dict(config))
  # A key the saved config lacks was added by a newer jaxpref: recorded, never refused.
  known = _flat(saved)
  refused = {k: v for k, v in changed.items() if meaningful(k) and k in known}
  if refused and not config.resume.force:
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:4])
    more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
    raise ResumeConfigError(
      f"resuming {workdir} at step {step} with a config that changes what its checkpoint means "
      f"({shown}{more}); use a new --workdir, or --config.resume.force=True to continue anyway"
    )
  return changed


def check_shapes(saved_abstract: Any, new_abstract: Any, workdir: str | Path) -> None:
  """Refuses (even with force) parameters whose shapes differ from the checkpoint's."""
  old = {
    jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(saved_abstract)
  }
  new = {
    jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(new_abstract)
  }
  if old == new:
    return
  differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  first = differ[0]
  raise ResumeConfigError(
    f"the model of this config has other parameter shapes than the checkpoint in {workdir} "
    f"({len(differ)} differ, e.g. {first}: {old.get(first)} -> {new.get(first)}); a checkpoint "
    "cannot be restored into another model shape: use a new --workdir"
  )


def record_segment(workdir: str | Path, step: int, config: ml_collections.ConfigDict) -> None:
  """Writes the config of a run segment: `config.json` from step 0, else `config.<step>.json`."""
  if jax.process_index() != 0:
    return
  name = "config.json" if step == 0 else f"config.{step}.json"
  (Path(workdir) / name).write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def drop_metrics_after(workdir: str | Path, step: int) -> int:
  """Removes `metrics.jsonl` rows of steps after `step` (replayed by a resume); returns how many."""
  path = Path(workdir) / "metrics.jsonl"
  if jax.process_index() != 0 or not path.is_file():
    return 0
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      keep = int(json.loads(line)["step"]) <= step
    except (ValueError, KeyError, TypeError):
      keep = False  # A line cut short by a kill: never complete, drop it.
    if keep:
      kept.append(line)
  if len(kept) != len(lines):
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)
  return len(lines) - len(kept)
