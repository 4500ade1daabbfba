"""Runs one jaxpref program on many argument lists in ONE process, as `python -m` runs it once.

`python tests/program_runner.py score CASES.json` reads a JSON list of argv lists and prints a
JSON list of `{"code", "stderr", "stdout"}`: each case goes through the program's own flags parser
(`cli.parse_flags_or_exit`) and `cli.run_main`, exactly what its `__main__` block does, without
paying an interpreter and JAX start per case. A traceback that escapes is printed into the
case's stderr, so a test sees it as a user would.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback


def run_many(program: str, argvs: list[list[str]]) -> list[dict]:
  from absl import flags

  from jaxpref import cli

  module = importlib.import_module(f"jaxpref.{program}")
  if hasattr(module, "define_flags"):
    module.define_flags()
  extra_help = getattr(module, "config_help", None)
  name = f"jaxpref.{program}"
  results = []
  for argv in argvs:
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      try:
        for flag_name in [n for n in flags.FLAGS if n.startswith("config.")]:
          delattr(flags.FLAGS, flag_name)  # The previous case's `--config.x` override flags.
        flags.FLAGS.unparse_flags()
        sys.argv = [name, *argv]  # ml_collections reads `--config.x=...` overrides from here.
        rest = cli.parse_flags_or_exit(name, extra_help=extra_help)([name, *argv])
        cli.run_main(name, module.main, rest)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
      except BaseException:  # noqa: BLE001 - shown to the test as a user would see it.
        traceback.print_exc()
        code = 1
    results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
  return results


if __name__ == "__main__":
  with open(sys.argv[2], encoding="utf-8") as f:
    cases = json.load(f)
  print(json.dumps(run_many(sys.argv[1], cases)))
