#!/usr/bin/env bash
# Regenerates pipelines/media/tiny-detector.mp4 from the clip frames that tests/reference/train_tiny_detector.py
# writes (tests/fixtures/tiny-detector/frames/clip00.png … clip23.png: a blue disc moving left to right over a
# textured background, 168x112; ground-truth boxes in tests/fixtures/tiny-detector/cases.json). 4 fps, 6 s.
# Near-lossless H.264 (constant quantizer 8) so the decoded frames stay close to the PNGs the model was
# checked on; no B-frames, so frame k has pts k/4 s exactly, which is how tests/e2e/tiny_detector_clip.rs finds its ground truth.
# Needs gst-launch-1.0 with pngdec and x264enc.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
frames="$root/tests/fixtures/tiny-detector/frames"
out="$root/pipelines/media/tiny-detector.mp4"
n=$(ls "$frames"/clip*.png | wc -l)
gst-launch-1.0 -q multifilesrc location="$frames/clip%02d.png" index=0 stop-index=$((n - 1)) \
  caps="image/png,framerate=4/1" \
  ! pngdec ! videoconvert ! video/x-raw,format=I420 \
  ! x264enc pass=quant quantizer=8 speed-preset=slow key-int-max=8 bframes=0 ! video/x-h264,profile=high \
  ! mp4mux ! filesink location="$out"
ls -l "$out"
