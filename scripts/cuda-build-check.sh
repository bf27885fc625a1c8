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
# ONE cargo call for everything: cargo resolves features per invocation, and a second call (rexprep's tests
# alone, or even `cargo test` after `cargo build` with the same packages) resolved some dependencies differently
# and compiled candle's CUDA kernels (nvcc, the longest step of CI) and tokenizers a second time.
pkgs=(-p rexstream -p rexbench -p rexprep)
features=rexstream/cuda,rexbench/cuda,rexprep/cuda,rexprep/candle
# Compiler messages go to stderr as usual; stdout carries cargo's JSON artifact lines, which name what this
# call built (or found fresh), so a stale binary left in deps/ by another call cannot count.
artifacts=$(cargo build "${pkgs[@]}" --features "$features" --bins --test cuda_vs_cpu \
  --message-format=json-render-diagnostics)
for bin in rexstream rexbench; do
  test -x "$CARGO_TARGET_DIR/debug/$bin" || { echo "cuda-build-check: $bin was not linked" >&2; exit 1; }
done
# rexprep's GPU-vs-CPU test with the CUDA code compiled in (it needs a GPU to run).
grep -q '"executable":"[^"]*/cuda_vs_cpu-[^"]*"' <<<"$artifacts" \
  || { echo "cuda-build-check: rexprep's cuda_vs_cpu test was not built" >&2; exit 1; }
echo "cuda-build-check: rexstream and rexbench built and linked, rexprep's tests compiled, with --features cuda"
