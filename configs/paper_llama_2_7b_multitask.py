"""The paper's llama-2-7b reward model trained with multitask on its five datasets.

  python -m jaxpref.train --config=configs/paper_llama_2_7b_multitask.py --workdir=DIR \
      --config.model.path=/local/llama-2-7b --config.data.files=a.jsonl,b.jsonl,...
See `jaxpref.training.paper` for the settings;
`--config=configs/paper_llama_2_7b_multitask.py:tiny` runs a tiny CPU variant.
"""

from jaxpref.training.paper import paper_config


def get_config(variant=""):
  return paper_config("llama-2-7b", "multitask", variant)
