#!/usr/bin/env bash
# Preprocessing side by side (issue 4): the rexprep CPU path (criterion, `cargo bench -p rexprep --bench
# prepare`) and the HF slow Qwen2VLImageProcessor on the same three images, then one table with the ratio.
#
#   scripts/bench-prep.sh            # ~2 min of Rust benches + ~30 s of Python on 2 cores
#
# Python: $PYTHON when set, else a venv in .venv/prep made from tests/reference/requirements-prep.txt
# (pillow 10.4.0 and transformers 4.51.3, no torch). Run on an otherwise idle machine: both sides are timed.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  venv=.venv/prep
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r tests/reference/requirements-prep.txt
  fi
  py="$venv/bin/python"
fi
cargo bench -p rexprep --bench prepare
"$py" tests/reference/bench_hf_preprocess.py --criterion-dir "${CARGO_TARGET_DIR:-target}/criterion"
