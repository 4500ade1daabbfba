"""A training workdir's checkpoint to a Hugging Face directory (what `python -m jaxpref.export`
does): merged weights or a PEFT adapter, the run's tokenizer configured with its input contract,
its temperature and reward statistics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from jaxpref.evaluation import reward_stats


def _base_model_path(workdir: Path) -> str:
  """The Hugging Face checkpoint a run started from (`model.path` of its config.json)."""
  config_path = workdir / "config.json"
  path = json.loads(config_path.read_text()).get("model", {}).get("path", "")
  if not path:
    from jaxpref.models.hf_io import CheckpointError

    raise CheckpointError(
      f"--adapter: {workdir} did not start from a Hugging Face checkpoint (model.path is empty "
      "in its config.json), so there is no base for the adapter; export merged weights instead"
    )
  return path


def export(
  workdir: str | Path,
  output: str | Path,
  step: int | None = None,
  *,
  strict: bool = True,
  adapter: bool = False,
) -> int:
  """Exports a checkpoint of `workdir` to `output`; returns the exported step.

  LoRA runs are exported with the adapters merged into the weights (a plain checkpoint), or with
  `adapter=True` as a PEFT adapter directory for the run's base checkpoint. The run's held-out
  reward statistics (`reward_stats.json`, if any) go into the export.
  """
  import jax

  from jaxpref.data import contract as input_contract
  from jaxpref.models import hf_io, lora, peft_io, registry
  from jaxpref.models.source import load_for_inference, load_tokenizer_and_contract

  workdir = Path(workdir)
  cfg, params, _, step = load_for_inference(workdir=str(workdir), step=step)
  reason = registry.get(cfg.arch).why_incompatible(cfg)
  if strict and reason:
    fix = "model.pooling=pooler" if cfg.arch == "bert" else "model.pooling=last"
    raise hf_io.CheckpointError(
      f"{reason}: transformers would give other rewards. Train with --config.{fix} for a "
      "checkpoint transformers reproduces, or pass --nostrict to export one that only jaxpref "
      "scores faithfully (jaxpref.score --model=OUTPUT)"
    )
  tokenizer, contract = load_tokenizer_and_contract(cfg, workdir=str(workdir))
  cfg = cfg.replace(pad_token_id=contract.pad_id)
  if adapter:
    if cfg.lora is None:
      raise hf_io.CheckpointError(f"--adapter: {workdir} is not a LoRA run (lora.rank=0)")
    peft_io.save_adapter(output, cfg, params, base_model=_base_model_path(workdir))
  else:
    # save_hf gathers sharded (also multi-process) arrays itself; process 0 writes the files.
    cfg, params = lora.merge(cfg, params)  # LoRA: adapters folded into the kernels.
    hf_io.save_hf(output, cfg, params, None, pad_token_id=contract.pad_id, strict=strict)
  if jax.process_index() == 0:
    input_contract.save_tokenizer(tokenizer, output, contract)
    for name in ("temperature.json",):
      if (workdir / name).is_file():
        shutil.copy(workdir / name, Path(output) / name)
    stats = reward_stats.read(workdir)
    if stats is not None:
      reward_stats.add_to_hf_config(output, stats)
  return step
