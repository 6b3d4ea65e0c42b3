"""Run in SAELens's venv: load each SAE folder with ``sae_lens.SAE.load_from_disk`` and compare
its encode / decode with raysae's on the same inputs (saved beside them by
benchmarks/saelens_load_check.py). Prints one line per SAE and exits 1 on a mismatch."""

import sys
from pathlib import Path

import torch
from sae_lens import SAE

root = Path(sys.argv[1])
data = torch.load(root / "expected.pt")
bad = 0
for name, (x, f_ref, x_hat_ref) in data.items():
    sae = SAE.load_from_disk(root / name)
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    df, dx = (f - f_ref).abs().max().item(), (x_hat - x_hat_ref).abs().max().item()
    ok = df <= 1e-5 and dx <= 1e-5 and torch.equal(f > 0, f_ref > 0)
    bad += not ok
    print(f"{name}: SAELens {type(sae).__name__} ({sae.cfg.architecture()}), max |f diff| "
          f"{df:.2e}, max |x_hat diff| {dx:.2e}, same active set {torch.equal(f > 0, f_ref > 0)}"
          f" -> {'ok' if ok else 'MISMATCH'}")
sys.exit(1 if bad else 0)
