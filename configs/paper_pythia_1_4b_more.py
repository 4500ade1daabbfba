"""The paper's pythia-1.4b reward model trained with more on its five datasets.

  python -m jaxpref.train --config=configs/paper_pythia_1_4b_more.py --workdir=DIR \
      --config.model.path=/local/pythia-1.4b --config.data.files=a.jsonl,b.jsonl,...
See `jaxpref.training.paper` for the settings;
`--config=configs/paper_pythia_1_4b_more.py:tiny` runs a tiny CPU variant.
"""

from jaxpref.training.paper import paper_config


def get_config(variant=""):
  return paper_config("pythia-1.4b", "more", variant)
