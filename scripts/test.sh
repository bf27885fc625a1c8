#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): system packages, every Rust test (unit, fixture
# parity against HF transformers outputs, end-to-end against real mosquitto / RTSP / Prometheus on loopback),
# the Prometheus rule tests, and the CUDA build check (compiles and links the CUDA code without a GPU).
#
#   scripts/test.sh                      # everything
#   REXSTREAM_SKIP_CUDA_BUILD=1 scripts/test.sh   # skip the CUDA compile check (it takes ~10 min)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# shellcheck disable=SC1091
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

echo "== cargo test --workspace"
cargo test --workspace --no-fail-fast

if [ -d deploy/prometheus ] && ls deploy/prometheus/*test*.yml >/dev/null 2>&1; then
  echo "== promtool"
  promtool check rules deploy/prometheus/rules.yml
  for t in deploy/prometheus/*test*.yml; do promtool test rules "$t"; done
fi

if [ "${REXSTREAM_SKIP_CUDA_BUILD:-0}" != 1 ] && [ -x scripts/cuda-build-check.sh ]; then
  echo "== CUDA build check (no GPU needed)"
  scripts/cuda-build-check.sh
fi
echo "== all tests passed"
