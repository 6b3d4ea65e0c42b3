#!/usr/bin/env bash
# Create a separate venv for SAELens (it pins transformer-lens 3.x; raysae needs 4.x).
# Usage: benchmarks/saelens_parity/make_venv.sh VENV_DIR [SAE_LENS_SPEC]
# torch is installed first (CPU wheel 2.13.0) and pinned by a constraint file, so
# resolving sae-lens never swaps it for a multi-gigabyte CUDA build.
set -euo pipefail
VENV=${1:?usage: make_venv.sh VENV_DIR [SAE_LENS_SPEC]}
SPEC=${2:-sae-lens==6.54.*}
TORCH=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
CONSTRAINTS="$VENV/constraints.txt"
echo "$TORCH" > "$CONSTRAINTS"
"$VENV/bin/python" -m pip install "$TORCH"
"$VENV/bin/python" -m pip install -c "$CONSTRAINTS" "$SPEC"
"$VENV/bin/python" -c "import sae_lens, torch; print('sae_lens', sae_lens.__version__, 'torch', torch.__version__)"
