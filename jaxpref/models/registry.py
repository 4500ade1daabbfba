"""The one registry of architectures: `ModelConfig.arch` -> `convert.Arch`.

Adding an architecture: a `decoder.Family` (or a new backbone), its config.json reader and
writer, and its row here. Imports go one way: registry -> architectures -> decoder / convert /
layers -> config; `reward_model` and `hf_io` read this registry.
"""

from __future__ import annotations

from typing import Any

from jaxpref.models import bert, gemma, gpt_neox, llama
from jaxpref.models.config import ARCHS as ARCH_NAMES
from jaxpref.models.convert import Arch, CheckpointError

ARCHS: dict[str, Arch] = {
  arch.name: arch for arch in (gpt_neox.ARCH, *llama.ARCHS, *gemma.ARCHS, bert.ARCH)
}
assert tuple(sorted(ARCHS)) == tuple(sorted(ARCH_NAMES)), "config.ARCHS and the registry differ"


def get(name: str) -> Arch:
  if name not in ARCHS:
    raise ValueError(f"model.arch={name!r} is not supported; choose one of {sorted(ARCHS)}")
  return ARCHS[name]


def supported_classes() -> list[str]:
  return [c for arch in ARCHS.values() for c in arch.classes]


def resolve(hf_cfg: dict[str, Any], where: str) -> tuple[Arch, str | None]:
  """The architecture of a parsed config.json and its class name (if it names one)."""
  model_type = hf_cfg.get("model_type")
  class_name = (hf_cfg.get("architectures") or [None])[0]
  for arch in ARCHS.values():
    if model_type in arch.model_types:
      if class_name is not None and class_name not in arch.classes:
        break
      return arch, class_name
  raise CheckpointError(
    f"{where}: unsupported architecture {class_name or model_type!r} "
    f"(model_type={model_type!r}); supported: {supported_classes()}"
  )
