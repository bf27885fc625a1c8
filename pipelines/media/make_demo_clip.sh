#!/usr/bin/env bash
# Regenerates pipelines/media/demo.mp4: 8 s of H.264 (480x360, 8 fps, ~190 KB) made from four real
# photos shipped with scikit-image (skimage.data: chelsea the cat, coffee, astronaut, rocket), each
# panned across 16 frames so consecutive frames differ like a camera's.
# Needs a Python with scikit-image + Pillow (e.g. /work/venv) and gst-launch-1.0 with x264enc.
set -euo pipefail
PY=${PYTHON:-python3}
out="$(cd "$(dirname "$0")" && pwd)/demo.mp4"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
"$PY" - <<'PYEOF'
import numpy as np
from skimage import data
from PIL import Image
photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
W, H, n = 480, 360, 0
for img in photos:
    img = np.asarray(img)
    h, w = img.shape[:2]
    ch = int(min(h, w * H / W) * 0.85); cw = int(ch * W / H)
    for k in range(16):
        t = k / 15
        x = int((w - cw) * t); y = int((h - ch) * (0.5 + 0.3 * (t - 0.5)))
        Image.fromarray(img[y:y+ch, x:x+cw]).resize((W, H), Image.BICUBIC).save(f"f{n:03d}.png"); n += 1
PYEOF
gst-launch-1.0 -q multifilesrc location=f%03d.png index=0 stop-index=63 caps="image/png,framerate=8/1" \
  ! pngdec ! videoconvert ! video/x-raw,format=I420 \
  ! x264enc bitrate=256 speed-preset=slow key-int-max=16 ! video/x-h264,profile=high \
  ! mp4mux ! filesink location="$out"
ls -l "$out"
