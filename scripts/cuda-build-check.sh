#!/usr/bin/env bash
# Compiles and links every CUDA code path without a GPU: candle's kernels (rexomni --features cuda), rexprep's
# kernels (PTX built by nvcc), the rexstream binary and the rexbench binary. Nothing is run: the binaries are
# linked against stub libraries (scripts/cuda-toolkit.sh) and need a real driver to start.
#
#   scripts/cuda-build-check.sh          # ~10-15 min on 2 cores the first time
#
# Uses its own target dir (target/cuda) so that it never invalidates the CPU build's artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cuda-toolkit.sh install
eval "$(scripts/cuda-toolkit.sh env)"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$PWD/target/cuda}"
cargo build -p rexstream -p rexbench --features rexstream/cuda,rexbench/cuda --bins
for bin in rexstream rexbench; do
  test -x "$CARGO_TARGET_DIR/debug/$bin" || { echo "cuda-build-check: $bin was not linked" >&2; exit 1; }
done
echo "cuda-build-check: rexstream and rexbench built and linked with --features cuda"
