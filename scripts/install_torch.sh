#!/usr/bin/env bash
# Install torch before anything else: resolved through another package, an unpinned torch pulls
# a multi-GB CUDA build on x86-64 Linux. By default the CPU build of torch==2.13.0 from
# PyTorch's own CPU wheel index, or from the configured indexes (PyPI, a mirror, local wheels)
# when that index cannot be reached. INTENTREC_TORCH names another requirement instead (a CUDA
# build: INTENTREC_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
if [ -n "${INTENTREC_TORCH:-}" ]; then
  echo "[setup] installing ${INTENTREC_TORCH} first"
  # shellcheck disable=SC2086  # the variable may carry pip options
  pip install -q ${INTENTREC_TORCH}
  exit 0
fi
echo "[setup] installing torch==2.13.0 (CPU) first"
if ! pip install -q --retries 0 --timeout 20 "torch==2.13.0" \
    --index-url https://download.pytorch.org/whl/cpu 2>/dev/null; then
  echo "[setup] torch==2.13.0 did not install from PyTorch's CPU index (out of reach, or no such wheel there); installing it from the configured indexes"
  pip install -q "torch==2.13.0"
fi
