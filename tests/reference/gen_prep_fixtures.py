#!/usr/bin/env python3
"""Preprocessing fixtures for crates/rexprep (rex-omni-spec.md §1).

Writes tests/fixtures/prep/:
  manifest.json             one entry per case (see CASES); the Rust tests read only this folder.
  <case>.png                input RGB image (a real photo from scikit-image, cropped/scaled to the size)
  <case>.resized.png        Pillow 10.4 BICUBIC output at the smart_resize size (what the HF processor feeds on)
  <case>.pv.f32             pixel_values from the HF slow Qwen2VLImageProcessor, raw little-endian f32:
                            all rows for small cases, `pv_rows` (a sample of rows) for the others
  yuv/<case>.<colorimetry>.{nv12,i420}  raw planes written by GStreamer `videoconvert` (strides/offsets in the manifest)
  yuv/<that file>.rgb.png   GStreamer `videoconvert` of those planes back to RGB (the NV12/I420 reference);
                            the manifest records the chroma-site GStreamer put on the caps of that conversion

Pinned (requirements-prep.txt): pillow==10.4.0 (Pillow 13's bicubic differs, spec §1.4), transformers==4.51.3,
numpy, scikit-image; gst-launch-1.0 (GStreamer 1.22) on PATH.

Usage: /work/venv/bin/python tests/reference/gen_prep_fixtures.py [out_dir]
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import PIL
from PIL import Image
import skimage.data
import transformers
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

assert PIL.__version__ == "10.4.0", f"need pillow==10.4.0 (spec §1.4), got {PIL.__version__}"
assert transformers.__version__ == "4.51.3", f"need transformers==4.51.3, got {transformers.__version__}"

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "fixtures", "prep")
MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 2560 * 28 * 28  # Rex-Omni's bounds (spec §1.1)
FULL_PV_MAX_ROWS = 96  # store every row up to this many (≤ 0.45 MB each); sample above
SAMPLED_ROWS = 8

# (case, photo, width, height, why)
CASES = [
    ("astronaut_50x50", "astronaut", 50, 50, "upscale branch (min_pixels)"),
    ("coffee_70x42", "coffee", 70, 42, "upscale branch, both sides ties (1.5, 2.5)"),
    ("chelsea_100x100", "chelsea", 100, 100, "upscale branch"),
    ("rocket_120x250", "rocket", 120, 250, "portrait, plain branch"),
    ("astronaut_640x480", "astronaut", 640, 480, "VGA: width grows, height shrinks"),
    ("chelsea_500x375", "chelsea", 500, 375, "spec table"),
    ("astronaut_1920x1080", "astronaut", 1920, 1080, "1080p, max_pixels branch"),
    ("rocket_5900x30", "rocket", 5900, 30, "aspect ratio 196.7 (limit 200), wide"),
    ("coffee_31x6000", "coffee", 31, 6000, "aspect ratio 193.5, tall"),
    ("chelsea_2500x40", "chelsea", 2500, 40, "wide strip"),
]

# NV12/I420 cases: (source case, format, GStreamer colorimetry string). Kept small: the fixture folder
# stays under ~8 MB (720p is not stored; tests/reference/bench_hf_preprocess.py derives it from 1080p).
YUV_CASES = [
    ("astronaut_640x480", "nv12", "bt601"),
    ("chelsea_500x375", "i420", "bt601"),
    ("chelsea_500x375", "nv12", "bt709"),  # caps say BT.709 on an SD frame: the caps win
    ("rocket_120x250", "i420", "bt601"),  # width 120: I420 chroma stride 60 → padded to 60 (already 4-aligned)
    ("rocket_120x250", "nv12", "1:4:0:0"),  # full-range BT.601 (JPEG); GStreamer has no name for it
    ("chelsea_100x100", "i420", "1:4:0:0"),  # the same through the I420 fast path
    ("coffee_70x42", "nv12", "bt601"),  # 70: Y stride padded to 72 by GStreamer
    ("coffee_31x6000", "nv12", "bt709"),  # over 576 lines: chroma-site mpeg2 (co-sited); odd width
]


def photo(name, w, h):
    """A real photo cropped to aspect w:h around its centre, then scaled (LANCZOS) to w×h."""
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    sw, sh = img.size
    if sw * h > sh * w:  # too wide: crop width
        cw, ch = max(1, round(sh * w / h)), sh
    else:
        cw, ch = sw, max(1, round(sw * h / w))
    x0, y0 = (sw - cw) // 2, (sh - ch) // 2
    return img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.LANCZOS)


def patchify_np(resized):
    """Spec §1.5-1.6 in numpy: used to check that the stored resized image IS what HF normalised."""
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    x = ((x - mean) / std).transpose(2, 0, 1)[None]  # 1,3,H,W
    x = np.concatenate([x, x], 0)  # T=2
    _, c, h, w = x.shape
    gh, gw = h // 14, w // 14
    x = x.reshape(1, 2, c, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * 2 * 14 * 14)


def round4(n):
    return (n + 3) // 4 * 4


def yuv_layout(fmt, w, h):
    """GStreamer 1.22 default plane strides/offsets (gst_video_info_set_format: rows 4-byte aligned)."""
    cw, ch = (w + 1) // 2, (h + 1) // 2
    sy = round4(w)
    if fmt == "nv12":
        suv = round4(cw * 2)
        off_uv = sy * round(h + (h & 1))  # luma height rounded up to even
        return [sy, suv, 0], [0, off_uv, 0], off_uv + suv * ch
    su = round4(cw)
    off_u = sy * (h + (h & 1))
    off_v = off_u + su * ch
    return [sy, su, su], [0, off_u, off_v], off_v + su * ch


def gst(*args):
    subprocess.run(["gst-launch-1.0", "-q", *args], check=True, stdout=subprocess.DEVNULL)


def gst_caps_field(element, field, *args):
    """Run a pipeline verbosely and return `field` of the caps on `element`'s src pad."""
    out = subprocess.run(["gst-launch-1.0", "-v", *args], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f"{element}.GstPad:src: caps = " in line:
            m = re.search(field + r"=\(string\)([\w:]+)", line)
            assert m, f"{field} missing in {line}"
            return m.group(1)
    raise AssertionError(f"no caps for {element} in:\n{out}")


def main():
    os.makedirs(os.path.join(OUT, "yuv"), exist_ok=True)
    proc = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    manifest = {"generator": "tests/reference/gen_prep_fixtures.py", "pillow": PIL.__version__,
                "transformers": transformers.__version__, "cases": [], "yuv": []}
    for case, name, w, h, why in CASES:
        img = photo(name, w, h)
        img.save(os.path.join(OUT, f"{case}.png"), optimize=True)
        out = proc(images=[img], return_tensors="np")
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        grid = [int(v) for v in out["image_grid_thw"][0]]
        h2, w2 = grid[1] * 14, grid[2] * 14
        # The processor resizes with PIL BICUBIC on the uint8 array (spec §1.4); do the same here and
        # prove it is what HF normalised, so the stored image is the bit-exact target of the Rust resize.
        resized = np.asarray(img.resize((w2, h2), resample=Image.BICUBIC))
        assert np.array_equal(patchify_np(resized), pv), f"{case}: stored resize is not what HF used"
        Image.fromarray(resized).save(os.path.join(OUT, f"{case}.resized.png"), optimize=True)
        n = pv.shape[0]
        rows = list(range(n)) if n <= FULL_PV_MAX_ROWS else sorted(
            set([0, 1, 2, 3, n - 4, n - 3, n - 2, n - 1] + list(np.linspace(0, n - 1, SAMPLED_ROWS).astype(int))))
        pv[rows].astype("<f4").tofile(os.path.join(OUT, f"{case}.pv.f32"))
        manifest["cases"].append({
            "case": case, "why": why, "photo": name, "width": w, "height": h,
            "resized_width": w2, "resized_height": h2, "grid_thw": grid,
            "pv_rows": "all" if n <= FULL_PV_MAX_ROWS else [int(r) for r in rows],
        })
        print(f"{case}: {w}x{h} -> {w2}x{h2} grid {grid} ({why})")

    for case, fmt, colorimetry in YUV_CASES:
        c = next(c for c in manifest["cases"] if c["case"] == case)
        w, h = c["width"], c["height"]
        png = os.path.join(OUT, f"{case}.png")
        label = {"1:4:0:0": "full601"}.get(colorimetry, colorimetry)
        raw = os.path.join(OUT, "yuv", f"{case}.{label}.{fmt}")
        back = raw + ".rgb.raw"
        caps = f"video/x-raw,format={fmt.upper()},colorimetry={colorimetry}"
        gst("filesrc", f"location={png}", "!", "pngdec", "!", "videoconvert", "!", caps, "!",
            "filesink", f"location={raw}")
        strides, offsets, size = yuv_layout(fmt, w, h)
        assert os.path.getsize(raw) == size, f"{case}: GStreamer wrote {os.path.getsize(raw)} bytes, layout says {size}"
        chroma_site = gst_caps_field(
            "rawvideoparse0", "chroma-site", "filesrc", f"location={raw}", "blocksize=" + str(size), "!",
            "rawvideoparse", f"width={w}", f"height={h}", f"format={fmt}", f"colorimetry={colorimetry}",
            "framerate=1/1", "!", "videoconvert", "!", "video/x-raw,format=RGB", "!",
            "filesink", f"location={back}")
        # GStreamer RGB rows are 4-byte aligned: strip the padding before storing as PNG.
        rs = round4(w * 3)
        rgb = np.fromfile(back, dtype=np.uint8).reshape(h, rs)[:, : w * 3].reshape(h, w, 3)
        os.remove(back)
        Image.fromarray(rgb).save(back.replace(".rgb.raw", ".rgb.png"), optimize=True)
        manifest["yuv"].append({"case": case, "file": os.path.basename(raw), "format": fmt, "colorimetry": colorimetry,
                                "chroma_site": chroma_site, "width": w, "height": h, "strides": strides, "offsets": offsets, "size": size})
        print(f"yuv {case} {fmt} {colorimetry} chroma-site {chroma_site}: strides {strides} offsets {offsets}")

    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
