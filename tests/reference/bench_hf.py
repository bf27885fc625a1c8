#!/usr/bin/env python3
"""The rexbench measurements with HuggingFace transformers, the official Rex-Omni wrapper's default backend.

Same frame (the synthetic pattern rexbench draws), same prompt, same image size, same output length, and the same
weights (decode steps are timed one by one with a timestamping streamer, so the prefill does not leak in): point --model at the folder `rexbench --save-checkpoint DIR` wrote (or a real checkpoint). Decoding is
forced to exactly --output-tokens tokens (min_new_tokens = max_new_tokens) so both sides pay for the same answer.

    python tests/reference/bench_hf.py --model /tmp/rex-random --dtype bf16 --batches 1,4 --concurrent 1,4 \
        --json /tmp/hf.json

Needs torch, transformers==4.51.3, pillow==10.4.0 (tests/reference/requirements.txt). Not used by CI.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

REPO = Path(__file__).resolve().parents[2]
# The wrapper's bounds (rex-omni-spec.md §1.1).
MIN_PIXELS, MAX_PIXELS = 16 * 28 * 28, 2560 * 28 * 28
PROMPT = "Detect person, car, bicycle, dog. Output the bounding box coordinates in [x0, y0, x1, y1] format."


def test_frame(w, h):
    """rexbench's deterministic frame (crates/rexbench/src/measure.rs `test_frame`)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    checker = np.where(((x // 32) + (y // 32)) % 2 == 0, 60, 0)
    r = (x * 195 // w) + checker
    g = y * 255 // h
    b = (x ^ y) & 0xFF
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), "RGB")


def chat_ids(tok, n_image_tokens):
    text = (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>" + PROMPT + "<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return tok(text, return_tensors="pt").input_ids


def prefill_fn(model, ids, pv, grid, dtype):
    """The prompt's work after the vision tower, as generate() runs it: text embeddings with the image rows spliced
    in, the M-RoPE positions, the decoder over the prompt with a fresh cache, and the first token's logits. The
    image embeddings are computed once here, so the vision tower (timed on its own) is not counted twice.
    transformers 4.51's forward computes the logits of every prompt row; this times the last row's only, as
    rexbench does (the lm_head over 441 rows would add about a tenth to transformers' prefill)."""
    with torch.inference_mode():
        image_embeds = model.visual(pv.to(dtype), grid_thw=grid)

    @torch.inference_mode()
    def run():
        emb = model.model.embed_tokens(ids)
        slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(slots, image_embeds.to(emb.dtype))
        positions, _ = model.get_rope_index(ids, grid, None, None, torch.ones_like(ids))
        hidden = model.model(inputs_embeds=emb, position_ids=positions, use_cache=True)[0]
        model.lm_head(hidden[:, -1:])

    return run


def timed(fn, iters):
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (rexbench --save-checkpoint output)")
    ap.add_argument("--tokenizer", default=str(REPO / "tests/fixtures/qwen-tokenizer"))
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--concurrent", default="1,8,32")
    ap.add_argument("--output-tokens", type=int, default=70)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    w, h = map(int, a.image_size.split("x"))
    dev = torch.device(a.device)

    t0 = time.perf_counter()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(a.model, torch_dtype=dtype, attn_implementation="eager")
    model = model.to(dev).eval()
    print(f"bench_hf: model ready in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = Qwen2Tokenizer.from_pretrained(a.tokenizer)
    proc = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    frame = test_frame(w, h)

    pre = timed(lambda: proc(images=[frame], return_tensors="pt"), a.iters)
    inputs = proc(images=[frame], return_tensors="pt")
    pv = inputs["pixel_values"].to(dev)
    grid = inputs["image_grid_thw"].to(dev)
    n_img = int(grid.prod()) // 4
    ids = chat_ids(tok, n_img).to(dev)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)

    with torch.inference_mode():

        def vision():
            model.visual(pv.to(dtype), grid_thw=grid)
            sync()

        prompt = prefill_fn(model, ids, pv, grid, dtype)

        def prefill():
            prompt()
            sync()

        vis = timed(vision, a.iters)
        pf = timed(prefill, a.iters)

        class StepClock:
            """A generate() streamer that only timestamps: put() runs once for the prompt, then once per step."""

            def __init__(self):
                self.t = []

            def put(self, _value):
                sync()
                self.t.append(time.perf_counter())

            def end(self):
                pass

        decode = []
        for b in [int(x) for x in a.batches.split(",") if x]:
            clock = StepClock()
            model.generate(
                input_ids=ids.repeat(b, 1),
                attention_mask=torch.ones_like(ids).repeat(b, 1),
                pixel_values=pv.repeat(b, 1),
                image_grid_thw=grid.repeat(b, 1),
                max_new_tokens=a.output_tokens,
                min_new_tokens=a.output_tokens,
                do_sample=False,
                repetition_penalty=1.05,
                streamer=clock,
            )
            # t[0]: prompt; t[1]: first token (prefill); each later stamp is one decode step.
            steps = len(clock.t) - 2
            step = (clock.t[-1] - clock.t[1]) / steps
            decode.append({"batch": b, "ms_per_step": step * 1e3, "tokens_per_s": b / step})
            print(f"bench_hf: decode batch {b}: {step * 1e3:.1f} ms/step", flush=True)

        frames = []
        for c in [int(x) for x in a.concurrent.split(",") if x]:
            t = time.perf_counter()
            batch = proc(images=[frame] * c, return_tensors="pt")
            model.generate(
                input_ids=ids.repeat(c, 1),
                attention_mask=torch.ones_like(ids).repeat(c, 1),
                pixel_values=batch["pixel_values"].to(dev),
                image_grid_thw=batch["image_grid_thw"].to(dev),
                max_new_tokens=a.output_tokens,
                min_new_tokens=a.output_tokens,
                do_sample=False,
                repetition_penalty=1.05,
            )
            sync()
            secs = time.perf_counter() - t
            frames.append({"concurrent": c, "output_tokens": a.output_tokens, "seconds": secs, "frames_per_s": c / secs})
            print(f"bench_hf: {c} concurrent: {c / secs:.2f} frames/s", flush=True)

    report = {
        "backend": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "device": a.device,
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
        "image_size": [w, h],
        "prompt_tokens": ids.shape[1],
        "preprocess_ms": pre * 1e3,
        "vision_ms": vis * 1e3,
        "prefill_ms": pf * 1e3,
        "prefill_tokens_per_s": ids.shape[1] / pf,
        "decode": decode,
        "frames": frames,
    }
    print(f"{'stage':<28}{'value':>12}")
    print(f"{'preprocess (CPU)':<28}{pre * 1e3:>12.2f} ms/frame")
    print(f"{'vision':<28}{vis * 1e3:>12.2f} ms/image")
    print(f"{'prefill':<28}{ids.shape[1] / pf:>12.1f} tokens/s ({pf * 1e3:.1f} ms)")
    for d in decode:
        print(f"{'decode batch ' + str(d['batch']):<28}{d['tokens_per_s']:>12.1f} tokens/s ({d['ms_per_step']:.2f} ms/step)")
    for f in frames:
        print(f"{str(f['concurrent']) + ' concurrent requests':<28}{f['frames_per_s']:>12.2f} frames/s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
