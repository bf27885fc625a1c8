#!/usr/bin/env bash
# The benchmark run for a GPU host (docs/benchmarks.md): rexbench and HF transformers on the same random
# real-config weights, same frame, prompt and answer length, one after the other on the same machine.
#
# On the GPU host only the CUDA driver, Python with torch + transformers==4.51.3, and these files are needed:
#   rexbench (built here: scripts/cuda-build-check.sh, or `cargo build --release -p rexbench --features cuda`),
#   tests/fixtures/qwen-tokenizer/, tests/reference/bench_hf.py, scripts/bench-gpu.sh.
#
#   scripts/bench-gpu.sh OUT_DIR                       # defaults: cuda:0, bf16, real 3B config
#   DEVICE=cpu CONFIG=crates/rexbench/configs/real-widths-4-layers.json scripts/bench-gpu.sh /tmp/b   # smoke run
#
# Environment: REXBENCH (binary), DEVICE (cuda:0 | cpu), DTYPE (bf16), CONFIG (real | config.json),
# BATCHES (1,4,16,32), CONCURRENT (1,8,32), OUTPUT_TOKENS (70), ITERS (3), PYTHON (python3), SKIP_HF=1.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: scripts/bench-gpu.sh OUT_DIR}"
mkdir -p "$out"
rexbench="${REXBENCH:-$here/target/release/rexbench}"
[ -x "$rexbench" ] || rexbench="$here/target/cuda/debug/rexbench"
[ -x "$rexbench" ] || { echo "bench-gpu: no rexbench binary (set REXBENCH)" >&2; exit 2; }
device="${DEVICE:-cuda:0}"
common=(--dtype "${DTYPE:-bf16}" --image-size "${IMAGE_SIZE:-640x480}" --batches "${BATCHES:-1,4,16,32}"
        --concurrent "${CONCURRENT:-1,8,32}" --output-tokens "${OUTPUT_TOKENS:-70}" --iters "${ITERS:-3}")
tok="$here/tests/fixtures/qwen-tokenizer"

echo "== rexbench ($device)"
"$rexbench" --config "${CONFIG:-real}" --save-checkpoint "$out/checkpoint" --tokenizer "$tok" \
  --device "$device" "${common[@]}" --json "$out/rexbench.json" | tee "$out/rexbench.txt"

py="${PYTHON:-python3}"
if [ "${SKIP_HF:-0}" = 1 ] || ! "$py" -c 'import torch, transformers' 2>/dev/null; then
  echo "== bench_hf.py skipped (SKIP_HF=1 or no torch/transformers for $py)"
  exit 0
fi
hf_device="${device%%:*}"; [ "$hf_device" = cuda ] && hf_device="$device"
echo "== HF transformers ($hf_device)"
"$py" "$here/tests/reference/bench_hf.py" --model "$out/checkpoint" --tokenizer "$tok" --device "$hf_device" \
  "${common[@]}" --json "$out/hf.json" | tee "$out/hf.txt"
