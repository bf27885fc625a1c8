#!/usr/bin/env bash
# Compiles and links every CUDA code path without a GPU: candle's kernels (rexomni --features cuda), rexprep's
# kernels (PTX built by nvcc), the rexstream binary, the rexbench binary, and rexprep's tests with
# `--features cuda,candle` (tests/cuda_vs_cpu.rs: the GPU-vs-CPU comparison, otherwise never compiled).
# Nothing is run: everything is linked against stub libraries (scripts/cuda-toolkit.sh) and needs a real
# driver to start. On a GPU host, run the GPU tests with
#   cargo test -p rexprep --features cuda,candle --test cuda_vs_cpu -- --include-ignored
#
#   scripts/cuda-build-check.sh          # ~10-15 min on 2 cores the first time
#
# Uses the CPU build's target dir ($CARGO_TARGET_DIR, else target/; CUDA_TARGET_DIR overrides), so that the
# ~400 dependencies that do not change with `cuda` (GStreamer bindings, tokio, tokenizers, rusqlite, rustls,
# ...) are reused from `cargo test --workspace` instead of being compiled a second time: only candle, cudarc,
# candle-kernels and our crates are rebuilt with the feature on. This is safe: cargo keeps both variants side
# by side under their own hashes, and a later CPU build re-links target/debug/rexstream from its own
# (fresh) artifacts rather than leaving the CUDA binary there.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cuda-toolkit.sh install
eval "$(scripts/cuda-toolkit.sh env)"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}}"
# One package set and one feature set for every cargo call below: cargo resolves features per invocation, and
# a call for rexprep alone (as this script once made) resolved candle-core differently and compiled candle's
# CUDA kernels (nvcc, the longest step of CI) a second time.
pkgs=(-p rexstream -p rexbench -p rexprep)
features=rexstream/cuda,rexbench/cuda,rexprep/cuda,rexprep/candle
cargo build "${pkgs[@]}" --features "$features" --bins --test cuda_vs_cpu
for bin in rexstream rexbench; do
  test -x "$CARGO_TARGET_DIR/debug/$bin" || { echo "cuda-build-check: $bin was not linked" >&2; exit 1; }
done
# rexprep's GPU-vs-CPU test with the CUDA code compiled in (`--no-run`: it needs a GPU to run; built above, so
# this only names it). The `Executable` line is this run's own (a stale binary in deps/ would not count).
# `tee -a`: appending, so a log file on stderr is not overwritten from its start.
built=$(cargo test "${pkgs[@]}" --features "$features" --test cuda_vs_cpu --no-run 2>&1 | tee -a /dev/stderr)
grep -q 'Executable tests/cuda_vs_cpu.rs' <<<"$built" \
  || { echo "cuda-build-check: rexprep's cuda_vs_cpu test was not built" >&2; exit 1; }
echo "cuda-build-check: rexstream and rexbench built and linked, rexprep's tests compiled, with --features cuda"
