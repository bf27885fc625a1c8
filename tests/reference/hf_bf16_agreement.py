#!/usr/bin/env python3
"""How often transformers' own bf16 greedy answer equals its f32 one on the tiny-detector reference frames.

What comes in: tests/fixtures/tiny-detector (checkpoint, cases.json with the f32 greedy ids, frames/*.png).
What goes out: one line per attention implementation on stdout: frames whose bf16 greedy ids equal the f32
references, and where the others first differ. This is the yardstick for the Rust bf16 path
(crates/rexomni/tests/model_tiny_detector.rs, `bf16_greedy_agrees_with_f32`): where ours agrees less often,
it rounds somewhere HF does not.

Run:  /work/venv/bin/python tests/reference/hf_bf16_agreement.py [--fixture DIR] [--attn sdpa,eager] [--f32]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_model_fixtures as gmf  # noqa: E402


@torch.no_grad()
def greedy(model, ids, frame, max_new):
    h, w = frame.shape[:2]
    pv = torch.from_numpy(gmf.patchify(frame)).to(model.dtype)
    thw = torch.tensor([[1, h // 14, w // 14]], dtype=torch.long)
    input_ids = torch.tensor([ids])
    gen = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pv, image_grid_thw=thw,
        max_new_tokens=max_new, do_sample=False, repetition_penalty=gmf.REP_PENALTY, eos_token_id=gmf.EOS_IDS,
        pad_token_id=151643, temperature=None, top_p=None, top_k=None,
    )
    return gen[0, len(ids):].tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture", default=str(gmf.FIX / "tiny-detector"))
    ap.add_argument("--attn", default="sdpa,eager")
    ap.add_argument("--f32", action="store_true", help="also check HF f32 against the stored references")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import Qwen2_5_VLForConditionalGeneration

    fix = Path(args.fixture)
    doc = json.loads((fix / "cases.json").read_text())
    cases = [(c["name"], c["prompt_ids"], np.asarray(Image.open(fix / c["frame"]).convert("RGB")), c["greedy_ids"])
             for c in doc["cases"]]
    runs = [(a, torch.bfloat16) for a in args.attn.split(",")]
    if args.f32:
        runs.insert(0, ("sdpa", torch.float32))
    for attn, dtype in runs:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(fix), torch_dtype=dtype, attn_implementation=attn).eval()
        same = 0
        diffs = []
        for name, ids, frame, want in cases:
            got = greedy(model, ids, frame, doc["max_new_tokens"])
            if got == want:
                same += 1
            else:
                k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                diffs.append(f"{name}@{k}")
        n = len(cases)
        print(f"HF {str(dtype).removeprefix('torch.')} {attn}: greedy ids equal the f32 references on "
              f"{same}/{n} frames ({100 * same / n:.0f} %); differ: {' '.join(diffs)}", flush=True)


if __name__ == "__main__":
    main()
