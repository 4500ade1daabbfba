"""The README's lint command, run by CI through the test command."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _ruff():
  exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
  if exe is None:
    pytest.skip("ruff is not installed (it is in the test extra)")
  return exe


@pytest.mark.parametrize(
  "args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"]
)
def test_ruff(args):
  proc = subprocess.run([_ruff(), *args], cwd=REPO_ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, f"ruff {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
