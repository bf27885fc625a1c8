#!/usr/bin/env python3
"""Time the HF slow Qwen2VLImageProcessor (Rex-Omni's preprocessing, rex-omni-spec.md §1.1) on the images
`cargo bench -p rexprep --bench prepare` uses (median ms/frame), next to that benchmark's criterion medians
when it has run, with the speed-up. scripts/bench-prep.sh runs both.

Images: tests/fixtures/prep/astronaut_640x480.png, a 1280x720 PIL-BICUBIC resize of astronaut_1920x1080.png
(what the Rust bench builds with its Pillow-exact resize), and astronaut_1920x1080.png.
Pins: pillow==10.4.0, transformers==4.51.3 (tests/reference/requirements-prep.txt).

Usage: python tests/reference/bench_hf_preprocess.py [--criterion-dir target/criterion]
"""
import argparse
import json
import os
import statistics
import time

import PIL
from PIL import Image
import transformers
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "prep")


def median_ms(fn, min_runs=5, budget_s=3.0):
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 200):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser()
    default_dir = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(FIX, "..", "..", "..", "target")),
                               "criterion")
    ap.add_argument("--criterion-dir", default=default_dir,
                    help="where `cargo bench -p rexprep --bench prepare` left its results (default: %(default)s)")
    args = ap.parse_args()

    def rust_ms(kind, key):
        """Criterion's median for prepare/<kind>/<key>, in ms, or None before the Rust bench has run."""
        p = os.path.join(args.criterion_dir, "prepare", kind, key, "new", "estimates.json")
        if not os.path.exists(p):
            return None
        with open(p) as f:
            return json.load(f)["median"]["point_estimate"] / 1e6

    proc = Qwen2VLImageProcessor(min_pixels=16 * 28 * 28, max_pixels=2560 * 28 * 28)
    full = Image.open(os.path.join(FIX, "astronaut_1920x1080.png")).convert("RGB")
    images = [Image.open(os.path.join(FIX, "astronaut_640x480.png")).convert("RGB"),
              full.resize((1280, 720), Image.BICUBIC), full]
    print(f"pillow {PIL.__version__}, transformers {transformers.__version__}, slow Qwen2VLImageProcessor")
    print("| input | resized | HF ms/frame | runs | rexprep RGB ms/frame | speed-up | rexprep NV12 ms/frame |")
    print("|---|---|---|---|---|---|---|")
    for img in images:
        out = proc(images=[img], return_tensors="np")
        g = out["image_grid_thw"][0]
        ms, n = median_ms(lambda: proc(images=[img], return_tensors="np"))
        key = f"{img.width}x{img.height}"
        r, r_nv12 = rust_ms("rgb", key), rust_ms("nv12", key)
        fmt = lambda v: "not run" if v is None else f"{v:.2f}"
        print(f"| {key} | {g[2] * 14}x{g[1] * 14} | {ms:.1f} | {n} | {fmt(r)} | "
              f"{'' if r is None else f'{ms / r:.1f}x'} | {fmt(r_nv12)} |")


if __name__ == "__main__":
    main()
