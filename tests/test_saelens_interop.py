"""raysae's saved SAEs of every registered kind, loaded by the real SAELens.

SAELens pins TransformerLens 3 and raysae needs 4, so they cannot share an environment: this
test makes SAELens's own virtual environment (benchmarks/saelens_parity/make_venv.sh: CPU
torch, then sae-lens from the package registry; kept between runs under the raysae cache,
or taken from $RAYSAE_SAELENS_PYTHON) and runs benchmarks/saelens_load_check.py, which saves
a short ladder of each kind in SAELens's layout and has ``sae_lens.SAE.load_from_disk`` encode
and decode the same inputs there. Every kind must load as its SAELens class with encode and
decode within 1e-5 of raysae's and the same active set. Needs the package registry once.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raysae.core.kinds import KINDS
from raysae.lm.local_model import cache_dir

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAELENS_SPEC = "sae-lens==6.54.*"
"""The SAELens release raysae's layout is checked against (the one its parity notes name)."""


def saelens_python() -> Path:
    """A python with SAELens: $RAYSAE_SAELENS_PYTHON, else a venv made once in the cache."""
    given = os.environ.get("RAYSAE_SAELENS_PYTHON")
    if given:
        return Path(given)
    venv = cache_dir() / "saelens-venv" / re.sub(r"[^A-Za-z0-9.]+", "-", SAELENS_SPEC)
    python = venv / "bin" / "python"
    ready = venv / ".complete"
    if not ready.exists():
        subprocess.run(["bash", str(ROOT / "benchmarks" / "saelens_parity" / "make_venv.sh"),
                        str(venv), SAELENS_SPEC], check=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=1800)
        ready.touch()
    return python


def test_every_kind_loads_in_saelens_and_encodes_and_decodes_as_raysae_does():
    python = saelens_python()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "saelens_load_check.py"),
                           "--saelens-python", str(python)], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out = done.stdout + done.stderr
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(\w+)-\d+: SAELens .*$", out, re.M)}
    assert set(lines) == set(KINDS), (sorted(lines), sorted(KINDS), out[-3000:])
    bad = [line for line in re.findall(r"^\w+-\d+: SAELens .*$", out, re.M)
           if not line.endswith("-> ok")]
    assert not bad and done.returncode == 0, out[-3000:]
