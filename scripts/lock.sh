#!/usr/bin/env bash
# Refresh constraints.txt: resolve intentrec's dependencies afresh (newest releases within
# pyproject.toml's ranges) in a throw-away virtualenv and pin every package it installed.
# Run it on purpose (`make lock`), run `make test` on the result, and commit both together.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
. "$tmp/venv/bin/activate"
bash scripts/install_torch.sh
echo "[lock] resolving intentrec[dev] without constraints"
pip install -q -e ".[dev]"
{
  echo "# Every package \`make setup\` installs, at the release CI last tested (scripts/lock.sh wrote"
  echo "# this from a fresh resolve of pyproject.toml; refresh it with \`make lock\`, then \`make test\`)."
  echo "# torch is not here: scripts/install_torch.sh installs it first, as a CPU or a CUDA build."
  pip freeze --exclude-editable | grep -v -i -E '^(torch|triton)==|^nvidia-' | LC_ALL=C sort -f
} > constraints.txt
echo "[lock] wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
