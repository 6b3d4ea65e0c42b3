"""Do SAELens's own loader and raysae agree on raysae's saved SAEs of every kind?

    benchmarks/saelens_parity/make_venv.sh /work/saelens-venv   # once
    python benchmarks/saelens_load_check.py --saelens-python /work/saelens-venv/bin/python

Trains a short ladder of each registered kind on a planted problem (tests/planted.py), saves
every member in SAELens's layout, writes raysae's encode / decode of held-out inputs beside
them, and runs ``benchmarks/saelens_parity/load_check.py`` in SAELens's venv (SAELens pins
TransformerLens 3, raysae needs 4), which loads each folder with ``SAE.load_from_disk`` and
compares. The default test suite checks the same formulas against an implementation written
in the tests (tests/test_jumprelu.py, tests/test_matryoshka.py), since CI cannot install
SAELens beside raysae.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from planted import planted_batches  # noqa: E402

from raysae.core.config import SAEConfig, TrainConfig  # noqa: E402
from raysae.core.kinds import KINDS  # noqa: E402
from raysae.core.sae import SAE  # noqa: E402
from raysae.core.training import train_ladder  # noqa: E402

D_IN, D_SAE = 16, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saelens-python", required=True, help="python of SAELens's venv")
    parser.add_argument("--kinds", nargs="+", default=sorted(KINDS))
    args = parser.parse_args()
    x = next(planted_batches(D_IN, 32, 4, 2048, seed=9))
    with tempfile.TemporaryDirectory() as tmp:
        root, expected = Path(tmp), {}
        for kind in args.kinds:
            cfg = TrainConfig(sae=SAEConfig(D_IN, D_SAE), kind=kind, total_tokens=256 * 200,
                              batch_size=256, lr=3e-3, log_every=100, seed=1)
            results = train_ladder(cfg, [4.0, 8.0], planted_batches(D_IN, 32, 4, 256, 1, 200))
            for k, res in enumerate(results):
                name = f"{kind}-{k}"
                res.sae.save(root / name)
                sae = SAE.load(root / name)
                with torch.no_grad():
                    x_hat, f = sae(x)
                expected[name] = (x, f, x_hat)
        torch.save(expected, root / "expected.pt")
        done = subprocess.run([args.saelens_python, str(ROOT / "benchmarks" / "saelens_parity"
                                                        / "load_check.py"), str(root)])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
