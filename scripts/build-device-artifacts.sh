#!/usr/bin/env bash
# Builds what scripts/device-check.sh runs on a GPU host, into one folder (default dist/device), stripped:
#
#   bin/rexbench        rexbench --features cuda (real-config benchmark, saves the weights for bench_hf.py)
#   bin/cuda_vs_cpu     rexprep's CUDA-vs-CPU test binary (cargo test --no-run, features cuda,candle)
#   bin/model_cuda      rexomni's tiny fixtures on CUDA test binary (cargo test --no-run, feature cuda)
#   ptx/*.ptx           the PTX the binaries carry (rexprep's prep.ptx, candle's kernels), for the driver check
#   fixtures/           tests/fixtures/{prep,tiny-tied,tiny-untied,tiny-awq,tiny-cases,qwen-tokenizer}
#   bench_hf.py, device-check.sh
#
#   scripts/build-device-artifacts.sh [OUT_DIR]     # then copy OUT_DIR to the GPU host and run
#                                                   #   OUT_DIR/device-check.sh
# Toolkit: scripts/cuda-toolkit.sh (nvcc 13.0 from PyPI + link-time stubs), as scripts/cuda-build-check.sh.
# Target dir target/cuda (shared with cuda-build-check.sh, so a finished check makes this one quick);
# PROFILE=release for an optimised build (a second full dependency build: 25+ min on 2 cores).
# Fails when the binaries and PTX together exceed 60 MiB (the budget in issue 14).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist/device}"
profile="${PROFILE:-dev}"
scripts/cuda-toolkit.sh install
eval "$(scripts/cuda-toolkit.sh env)"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$PWD/target/cuda}"
prof_args=(); prof_dir=debug
if [ "$profile" = release ]; then prof_args=(--release); prof_dir=release; fi

cargo build "${prof_args[@]}" -p rexbench --features rexbench/cuda --bin rexbench
# `--message-format json` gives the test executables' paths (their names carry a hash).
test_exe() { # package features test-name
  cargo test "${prof_args[@]}" -p "$1" --features "$2" --test "$3" --no-run --message-format json \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$3" | tail -1
}
prep_test=$(test_exe rexprep cuda,candle cuda_vs_cpu)
model_test=$(test_exe rexomni cuda model_cuda)
[ -x "$prep_test" ] && [ -x "$model_test" ] || { echo "build-device-artifacts: test binaries not found" >&2; exit 1; }

rm -rf "$out"; mkdir -p "$out/bin" "$out/ptx" "$out/fixtures"
cp "$CARGO_TARGET_DIR/$prof_dir/rexbench" "$out/bin/rexbench"
cp "$prep_test" "$out/bin/cuda_vs_cpu"
cp "$model_test" "$out/bin/model_cuda"
strip "$out"/bin/*
# The PTX as compiled into the binaries (build-script outputs of this profile).
cp "$(ls -t "$CARGO_TARGET_DIR/$prof_dir"/build/rexprep-*/out/prep.ptx | head -1)" "$out/ptx/"
for k in affine unary quantized; do
  f=$(ls -t "$CARGO_TARGET_DIR/$prof_dir"/build/candle-kernels-*/out/$k.ptx 2>/dev/null | head -1 || true)
  [ -n "$f" ] && cp "$f" "$out/ptx/candle_$k.ptx"
done
for d in prep tiny-tied tiny-untied tiny-awq tiny-cases qwen-tokenizer; do
  cp -rL "tests/fixtures/$d" "$out/fixtures/$d"   # -L: the tiny checkpoints link to shared files
done
cp tests/reference/bench_hf.py scripts/device-check.sh "$out/"

size=$(du -cb "$out"/bin/* "$out"/ptx/* | tail -1 | cut -f1)
echo "build-device-artifacts: $out: binaries + PTX $((size / 1048576)) MiB (budget 60 MiB); fixtures $(du -sh "$out/fixtures" | cut -f1)"
du -h "$out"/bin/* "$out"/ptx/*
[ "$size" -le $((60 * 1048576)) ] || { echo "build-device-artifacts: over the 60 MiB budget" >&2; exit 1; }
