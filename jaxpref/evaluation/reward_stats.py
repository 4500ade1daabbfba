"""The mean and standard deviation of a reward model's rewards on held-out data.

PPO implementations normalise rewards with them (OpenRLHF reads `mean` and `std` from the reward
model's `config.json`). jaxpref computes them over every real response of the held-out split at
the end of training (and in `jaxpref.eval`), stores them as `reward_stats.json` next to the run,
writes them into exported checkpoints (`config.json` keys `mean` / `std`, plus
`reward_stats.json` in the export directory), and `jaxpref.score --normalize` applies them:
`(reward - mean) / std`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FILE = "reward_stats.json"
CONFIG_KEYS = ("mean", "std")  # config.json keys, as OpenRLHF names them


def compute(rewards_bn: np.ndarray, scores_bn: np.ndarray, **context: Any) -> dict[str, Any]:
  """Mean, standard deviation and count of the rewards of real responses (score >= 0)."""
  rewards = np.asarray(rewards_bn, np.float64)[np.asarray(scores_bn) >= 0]
  if rewards.size == 0:
    raise ValueError("no rewards to compute statistics from (empty held-out data)")
  return {
    "mean": float(rewards.mean()),
    "std": float(rewards.std()),
    "count": int(rewards.size),
    **context,
  }


def write(directory: str | Path, stats: dict[str, Any]) -> Path:
  path = Path(directory) / FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
  return path


def read(directory: str | Path) -> dict[str, Any] | None:
  """The statistics stored with a workdir or an exported model dir (None if it has none)."""
  directory = Path(directory)
  if (directory / FILE).is_file():
    return json.loads((directory / FILE).read_text())
  config = directory / "config.json"
  if config.is_file():
    fields = json.loads(config.read_text())
    if all(isinstance(fields.get(k), int | float) for k in CONFIG_KEYS):
      return {k: float(fields[k]) for k in CONFIG_KEYS}
  return None


def add_to_hf_config(directory: str | Path, stats: dict[str, Any]) -> None:
  """Writes `mean` / `std` into an exported checkpoint's config.json (and reward_stats.json)."""
  config_path = Path(directory) / "config.json"
  if config_path.is_file():
    config = json.loads(config_path.read_text())
    config |= {k: stats[k] for k in CONFIG_KEYS}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  write(directory, stats)


def normalize(rewards: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
  return (np.asarray(rewards, np.float64) - stats["mean"]) / max(stats["std"], 1e-12)
