#!/usr/bin/env bash
# One-script GPU proof (issue 14): everything in rexstream that needs a GPU, in at most ~8 minutes, on a host
# with an NVIDIA driver and Python with torch + the CUDA 13 runtime from pip, and no Rust, apt or GStreamer.
#
# Artifacts, built on a CPU machine by scripts/build-device-artifacts.sh (which checks the size budget:
# binaries + PTX at most 60 MiB stripped) into one folder that holds this script:
#   bin/rexbench      rexbench --features cuda
#   bin/cuda_vs_cpu   rexprep CUDA kernels vs the CPU path (test binary, `cargo test --no-run`)
#   bin/model_cuda    tiny checkpoints on CUDA vs the transformers references (test binary)
#   ptx/*.ptx         the PTX those binaries carry (for the driver check)
#   fixtures/         prep, tiny-tied, tiny-untied, tiny-awq, tiny-cases, qwen-tokenizer
#   bench_hf.py       the transformers side of the benchmark
#
#   ./device-check.sh                  # in the artifact folder (or: scripts/device-check.sh DIR)
# Steps: (1) find the GPU, the driver's CUDA version and the CUDA libraries inside the pip packages;
# (2) load every carried PTX with the driver and say whether it can run it; (3) CUDA preprocessing vs CPU
# (max |Δ|, 1080p kernel ms); (4) tiny fixtures token-exact on cuda in f32; (5) rexbench at the real 3B
# config in bf16, batch 1/8/32 (and with drafts when rexbench has them); (6) bench_hf.py on the same
# weights; then one table. On a machine without a usable GPU it prints why it skipped and exits 0.
# Environment: PYTHON (python3), OUT (work folder, default a temp dir), SKIP_HF=1, BATCHES (1,8,32),
# CONCURRENT (1,8,32), OUTPUT_TOKENS (70).
set -uo pipefail
dist="${1:-$(cd "$(dirname "$0")" && pwd)}"
py="${PYTHON:-python3}"
say() { echo "device-check: $*"; }
skip() { say "SKIPPED: $*"; exit 0; }

# ---- (1) a GPU? ------------------------------------------------------------------------------------------
command -v "$py" >/dev/null 2>&1 || skip "no $py on this host (the GPU hosts have Python with torch)."
probe=$("$py" - <<'EOF' 2>&1
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as e:
    print(f"NO no NVIDIA driver (libcuda.so.1 cannot be loaded: {e})"); sys.exit()
if cuda.cuInit(0) != 0:
    print("NO the NVIDIA driver is installed but cuInit failed (no GPU, or CUDA_VISIBLE_DEVICES hides it)"); sys.exit()
n = ctypes.c_int(); cuda.cuDeviceGetCount(ctypes.byref(n))
if n.value == 0:
    print("NO the driver sees no CUDA device"); sys.exit()
v = ctypes.c_int(); cuda.cuDriverGetVersion(ctypes.byref(v))
dev = ctypes.c_int(); cuda.cuDeviceGet(ctypes.byref(dev), 0)
name = ctypes.create_string_buffer(100); cuda.cuDeviceGetName(name, 100, dev)
mj, mn = ctypes.c_int(), ctypes.c_int()
cuda.cuDeviceGetAttribute(ctypes.byref(mj), 75, dev); cuda.cuDeviceGetAttribute(ctypes.byref(mn), 76, dev)
print(f"YES {v.value} {mj.value}{mn.value} {name.value.decode()}")
EOF
)
case "$probe" in
  YES*) ;;
  NO*) skip "${probe#NO }." ;;
  *) skip "the GPU probe failed: $probe" ;;
esac
read -r _ drv_ver sm gpu_name <<<"$probe"
drv_cuda="$((drv_ver / 1000)).$(((drv_ver % 1000) / 10))"
say "GPU 0: $gpu_name (sm_$sm), driver supports CUDA $drv_cuda"
for b in rexbench cuda_vs_cpu model_cuda; do
  [ -x "$dist/bin/$b" ] || { say "FAILED: $dist/bin/$b missing (build with scripts/build-device-artifacts.sh)"; exit 1; }
done

# CUDA libraries from pip (torch's nvidia-* wheels: nvidia/cu13/lib, or nvidia/<lib>/lib for CUDA 12).
libdirs=$("$py" - <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
want = ("libcudart.so", "libcublas.so", "libcublasLt.so", "libcurand.so", "libnvrtc.so")
dirs = []
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)) + [os.path.join(r, "torch", "lib")]:
        if os.path.isdir(d) and any(f.startswith(want) for f in os.listdir(d)) and d not in dirs:
            dirs.append(d)
print(":".join(dirs))
EOF
)
[ -n "$libdirs" ] || say "no CUDA libraries found in the pip packages of $py; relying on the system loader path"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(for b in "$dist"/bin/*; do ldd "$b" 2>/dev/null | grep "not found"; done | sort -u | awk '{print $1}' | tr '\n' ' ')
if [ -n "$missing" ]; then say "FAILED: libraries not found for the binaries: $missing(searched: $libdirs)"; exit 1; fi
say "CUDA libraries: $(echo "$libdirs" | tr ':' '\n' | wc -l) folders from pip packages, every binary resolves its libraries"

# ---- (2) can the driver run the PTX we carry? ------------------------------------------------------------
ptx_report=$("$py" - "$dist/ptx" <<'EOF'
import ctypes, glob, os, re, sys
cuda = ctypes.CDLL("libcuda.so.1"); cuda.cuInit(0)
dev = ctypes.c_int(); cuda.cuDeviceGet(ctypes.byref(dev), 0)
ctx = ctypes.c_void_p(); cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev); cuda.cuCtxSetCurrent(ctx)
ok = True
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.ptx"))):
    data = open(f, "rb").read()
    isa = re.search(rb"\.version\s+([0-9.]+)", data); target = re.search(rb"\.target\s+(\w+)", data)
    mod = ctypes.c_void_p()
    rc = cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(data + b"\0"))
    isa = isa.group(1).decode() if isa else "?"; target = target.group(1).decode() if target else "?"
    if rc == 0:
        print(f"  {os.path.basename(f)}: PTX ISA {isa} for {target}: the driver compiled and loaded it")
        cuda.cuModuleUnload(mod)
    else:
        why = {222: "the PTX is newer than this driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): update the driver or build with an older nvcc",
               218: "the driver's PTX JIT failed (CUDA_ERROR_INVALID_PTX)", 209: "no kernel image for this GPU"}.get(rc, f"CUresult {rc}")
        print(f"  {os.path.basename(f)}: PTX ISA {isa} for {target}: CANNOT run: {why}"); ok = False
print("PTX_OK" if ok else "PTX_FAILED")
EOF
)
echo "$ptx_report" | grep -v '^PTX_'
ptx_ok=no; echo "$ptx_report" | grep -q '^PTX_OK' && ptx_ok=yes
if [ "$ptx_ok" = yes ]; then
  say "the driver (CUDA $drv_cuda) can run every PTX module the binaries carry"
else
  say "FAILED: the driver (CUDA $drv_cuda) cannot run some of the PTX (see above); the GPU checks below would fail"
fi

work="${OUT:-$(mktemp -d /tmp/device-check.XXXXXX)}"; mkdir -p "$work"
declare -a rows
row() { rows+=("$(printf '| %-44s | %-8s | %s |' "$1" "$2" "$3")"); }
row "driver runs the carried PTX" "$ptx_ok" "$gpu_name sm_$sm, driver CUDA $drv_cuda"

# ---- (3) preprocessing kernels vs CPU --------------------------------------------------------------------
say "CUDA preprocessing vs CPU ..."
REXPREP_FIXTURES="$dist/fixtures/prep" timeout 120 "$dist/bin/cuda_vs_cpu" --nocapture --test-threads 1 >"$work/prep.txt" 2>&1
rc=$?
maxd=$(grep -oE 'pixel_values max \|d\| [0-9.e+-]+' "$work/prep.txt" | awk '{print $NF}' | sort -g | tail -1)
ms=$(grep -E '^1080p (RGB|NV12): device frame' "$work/prep.txt" | sed -E 's/^1080p (\w+): device frame -> pixel_values ([0-9.]+) ms.*/\1 \2 ms/' | tr '\n' ' ')
row "preprocessing CUDA vs CPU (all fixtures)" "$([ $rc = 0 ] && echo pass || echo FAIL)" "max |Δ| ${maxd:-?}; 1080p kernels: ${ms:-?}"
grep -q SKIPPED "$work/prep.txt" && row "  (preprocessing test reported SKIPPED)" "FAIL" "$(grep SKIPPED "$work/prep.txt" | head -1)"

# ---- (4) tiny fixtures token-exact on cuda ---------------------------------------------------------------
say "tiny checkpoints on cuda ..."
REXOMNI_FIXTURES="$dist/fixtures" timeout 180 "$dist/bin/model_cuda" --nocapture --test-threads 1 >"$work/model.txt" 2>&1
rc=$?
exact=$(grep -E '^MODEL_CUDA .* weights=bf16' "$work/model.txt" | sed -E 's/^MODEL_CUDA (\S+) f32 weights=bf16: ([0-9]+\/[0-9]+).*/\1 \2/' | tr '\n' ';')
quant=$(grep -E '^MODEL_CUDA .* weights=q' "$work/model.txt" | sed -E 's/^MODEL_CUDA (\S+) f32 weights=(q[48]): ([0-9]+\/[0-9]+).*/\1 \2 \3/' | tr '\n' ';')
row "tiny fixtures f32 token-exact vs transformers" "$([ $rc = 0 ] && echo pass || echo FAIL)" "${exact:-see $work/model.txt}"
row "  q8/q4 cases token-exact (informative)" "-" "${quant:-?}"

# ---- (5) rexbench, real config, bf16 ---------------------------------------------------------------------
batches="${BATCHES:-1,8,32}"; conc="${CONCURRENT:-1,8,32}"; toks="${OUTPUT_TOKENS:-70}"
say "rexbench, real 3B config, bf16, batches $batches ..."
timeout 240 "$dist/bin/rexbench" --config real --device cuda:0 --dtype bf16 --batches "$batches" \
  --concurrent "$conc" --output-tokens "$toks" --iters 3 --tokenizer "$dist/fixtures/qwen-tokenizer" \
  --save-checkpoint "$work/checkpoint" --json "$work/rexbench.json" >"$work/rexbench.txt" 2>&1
rb_rc=$?
[ $rb_rc = 0 ] || row "rexbench real bf16" "FAIL" "exit $rb_rc, see $work/rexbench.txt"
if [ $rb_rc = 0 ] && "$dist/bin/rexbench" --help 2>/dev/null | grep -q -- '--drafts'; then
  timeout 120 "$dist/bin/rexbench" --model "$work/checkpoint" --device cuda:0 --dtype bf16 --drafts \
    --batches "$batches" --concurrent 1 --output-tokens "$toks" --iters 2 --tokenizer "$dist/fixtures/qwen-tokenizer" \
    --json "$work/rexbench-drafts.json" >"$work/rexbench-drafts.txt" 2>&1 || row "rexbench with drafts" "FAIL" "see $work/rexbench-drafts.txt"
fi

# ---- (6) transformers on the same weights ----------------------------------------------------------------
hf_ok=no
if [ "${SKIP_HF:-0}" != 1 ] && [ $rb_rc = 0 ] && "$py" -c 'import torch, transformers' 2>/dev/null; then
  say "bench_hf.py on the same weights ..."
  timeout 240 "$py" "$dist/bench_hf.py" --model "$work/checkpoint" --tokenizer "$dist/fixtures/qwen-tokenizer" \
    --device cuda:0 --dtype bf16 --batches "$batches" --concurrent "$conc" --output-tokens "$toks" --iters 3 \
    --json "$work/hf.json" >"$work/hf.txt" 2>&1 && hf_ok=yes || row "bench_hf.py" "FAIL" "see $work/hf.txt"
fi

"$py" - "$work" <<'EOF' > "$work/bench_rows.txt"
import json, os, sys
w = sys.argv[1]
def load(n):
    p = os.path.join(w, n)
    return json.load(open(p)) if os.path.exists(p) else None
rb, hf, dr = load("rexbench.json"), load("hf.json"), load("rexbench-drafts.json")
def fmt(x, unit): return "-" if x is None else f"{x:.1f} {unit}"
def ratio(a, b, higher_better):
    if a is None or b is None or a == 0 or b == 0: return ""
    return f" ({(a / b if higher_better else b / a):.2f}x transformers)"
if rb:
    hv = hf and hf.get("vision_ms"); hp = hf and hf.get("prefill_ms")
    print(f"vision (ms/image)|{fmt(rb['vision_ms'], 'ms')} vs {fmt(hv, 'ms')}{ratio(rb['vision_ms'], hv, False)}")
    print(f"prefill (ms, {rb['prompt_tokens']} tokens)|{fmt(rb['prefill_ms'], 'ms')} vs {fmt(hp, 'ms')}{ratio(rb['prefill_ms'], hp, False)}")
    hd = {d["batch"]: d for d in (hf or {}).get("decode", [])}
    dd = {d["batch"]: d for d in (dr or {}).get("decode", [])}
    for d in rb["decode"]:
        h = hd.get(d["batch"], {}).get("tokens_per_s"); x = dd.get(d["batch"], {}).get("tokens_per_s")
        extra = f"; with drafts {x:.1f} tok/s" if x else ""
        print(f"decode batch {d['batch']} (tokens/s)|{d['tokens_per_s']:.1f} vs {fmt(h, '')}{ratio(d['tokens_per_s'], h, True)}{extra}")
    hfr = {f["concurrent"]: f for f in (hf or {}).get("frames", [])}
    for f in rb["frames"]:
        h = hfr.get(f["concurrent"], {}).get("frames_per_s")
        print(f"{f['concurrent']} concurrent frames (frames/s)|{f['frames_per_s']:.2f} vs {fmt(h, '')}{ratio(f['frames_per_s'], h, True)}")
EOF
while IFS='|' read -r what val; do row "rexbench vs transformers: $what" "bf16" "$val"; done <"$work/bench_rows.txt"

echo
echo "| check                                        | result   | numbers |"
echo "|----------------------------------------------|----------|---------|"
printf '%s\n' "${rows[@]}"
echo
say "logs and JSON in $work"
printf '%s\n' "${rows[@]}" | grep -q '| FAIL' && exit 1
[ "$ptx_ok" = yes ] || exit 1
exit 0
