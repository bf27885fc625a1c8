#!/usr/bin/env python3
"""rexbench and HuggingFace transformers side by side, stage by stage, taking turns in one run.

Two whole benchmark runs one after the other compare two machines when the machine's speed drifts (on a shared
VM the same vision pass took 3.0 s, then 5.1 s, within one hour). This script loads transformers here, starts
`rexbench --lockstep` on the same checkpoint, and runs every stage alternately — ours then theirs, then theirs
then ours in the next round — so each ratio's two halves are measured seconds apart. It prints one row per round
and the medians, and writes them as JSON.

    rexbench --config real --save-checkpoint /tmp/rex3b --batches 1 --concurrent 0 --output-tokens 2 --iters 1
    python tests/reference/side_by_side.py --model /tmp/rex3b --rexbench target/debug/rexbench --rounds 3 \\
        --threads 2 --json /tmp/sbs.json

Stages: vision (one image); prefill (one frame's prompt after the vision tower, up to the first token's logits;
bench_hf.py's `prefill_fn`); decode at each --batches size (--steps greedy steps after the prefill; transformers'
steps are timed one by one inside `generate`, as bench_hf.py does, and ours from a replicated prefill cache, as
rexbench does). Both sides hold the model at once: about twice the checkpoint's size in memory. Needs what bench_hf.py needs (tests/reference/requirements.txt); not used by CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf import MAX_PIXELS, MIN_PIXELS, REPO, chat_ids, prefill_fn, test_frame  # noqa: E402


class Ours:
    """`rexbench --lockstep` as a child process: one command line in, one JSON line out."""

    def __init__(self, argv, env):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()
        if not self.ready.get("ready"):
            raise SystemExit(f"side_by_side: rexbench did not start: {self.ready}")

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise SystemExit(f"side_by_side: rexbench exited (code {self.p.wait()}); its log is above")
        return json.loads(line)

    def ms(self, command):
        self.p.stdin.write(command + "\n")
        self.p.stdin.flush()
        r = self._read()
        if "error" in r:
            raise SystemExit(f"side_by_side: rexbench: {r['error']}")
        return r["ms_per_step"] if "ms_per_step" in r else r["ms"]

    def close(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.close()
        self.p.wait()


class Theirs:
    """transformers in this process, timed the way bench_hf.py times it."""

    def __init__(self, a, dtype):
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            a.model, torch_dtype=dtype, attn_implementation="eager"
        ).eval()
        self.dtype = dtype
        tok = Qwen2Tokenizer.from_pretrained(a.tokenizer)
        proc = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        w, h = map(int, a.image_size.split("x"))
        inputs = proc(images=[test_frame(w, h)], return_tensors="pt")
        self.pv, self.grid = inputs["pixel_values"], inputs["image_grid_thw"]
        self.ids = chat_ids(tok, int(self.grid.prod()) // 4)
        self.prefill = prefill_fn(self.model, self.ids, self.pv, self.grid, dtype)

    @torch.inference_mode()
    def ms(self, command):
        words = command.split()
        t = time.perf_counter()
        if words == ["vision"]:
            self.model.visual(self.pv.to(self.dtype), grid_thw=self.grid)
            return (time.perf_counter() - t) * 1e3
        if words == ["prefill"]:
            self.prefill()
            return (time.perf_counter() - t) * 1e3
        b, steps = int(words[1]), int(words[2])
        stamps = []

        class StepClock:
            # generate() calls put() once for the prompt, then once per token: t[1] is the first token (prefill).
            def put(self, _value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        self.model.generate(
            input_ids=self.ids.repeat(b, 1),
            attention_mask=torch.ones_like(self.ids).repeat(b, 1),
            pixel_values=self.pv.repeat(b, 1),
            image_grid_thw=self.grid.repeat(b, 1),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            repetition_penalty=1.05,
            streamer=StepClock(),
        )
        return (stamps[-1] - stamps[1]) / (len(stamps) - 2) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder both sides load (rexbench --save-checkpoint)")
    ap.add_argument("--rexbench", default=str(REPO / "target/debug/rexbench"), help="the rexbench binary")
    ap.add_argument("--tokenizer", default=str(REPO / "tests/fixtures/qwen-tokenizer"))
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    ap.add_argument("--weights", default="bf16", help="rexbench --weights (bf16, q8, q4); transformers stays --dtype")
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--stages", default="vision,prefill,decode", help="which of vision, prefill, decode to run")
    ap.add_argument("--batches", default="1,4", help="decode batch sizes")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads and rexbench's RAYON_NUM_THREADS (0 = all)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]

    t0 = time.perf_counter()
    theirs = Theirs(a, dtype)
    print(f"side_by_side: transformers ready in {time.perf_counter() - t0:.1f} s", flush=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads)) if a.threads else None
    t0 = time.perf_counter()
    argv = [a.rexbench, "--model", a.model, "--tokenizer", a.tokenizer, "--dtype", a.dtype,
            "--weights", a.weights, "--image-size", a.image_size, "--lockstep"]
    ours = Ours(argv, env)
    print(f"side_by_side: rexbench ready in {time.perf_counter() - t0:.1f} s ({ours.ready})", flush=True)

    stages = [s for s in a.stages.split(",") if s]
    commands = []
    for s in stages:
        if s == "decode":
            commands += [f"decode {b} {a.steps}" for b in a.batches.split(",") if b]
        elif s in ("vision", "prefill"):
            commands.append(s)
        else:
            raise SystemExit(f"side_by_side: --stages: `{s}` is not vision, prefill or decode")
    for c in commands:  # one warm-up each, untimed
        ours.ms(c)
        theirs.ms(c)

    rows = []
    for r in range(a.rounds):
        for c in commands:
            sides = [("ours", ours), ("theirs", theirs)]
            if r % 2:
                sides.reverse()
            got = {}
            for name, side in sides:
                got[name] = side.ms(c)
                got[name + "_at"] = time.strftime("%H:%M:%S", time.gmtime())
            row = {"round": r + 1, "stage": c, "first": sides[0][0], **got, "ratio": got["theirs"] / got["ours"]}
            rows.append(row)
            print(f"round {r + 1} {c:<14} ours {got['ours']:9.1f} ms  theirs {got['theirs']:9.1f} ms  "
                  f"= {row['ratio']:.2f}x  ({sides[0][0]} first, {got['ours_at']})", flush=True)
    ours.close()

    print("\n| stage | ours ms (median) | transformers ms (median) | theirs / ours per round | median ratio |")
    print("|---|---|---|---|---|")
    summary = []
    for c in commands:
        rs = [x for x in rows if x["stage"] == c]
        o = statistics.median(x["ours"] for x in rs)
        t = statistics.median(x["theirs"] for x in rs)
        ratios = [x["ratio"] for x in rs]
        med = statistics.median(ratios)
        summary.append({"stage": c, "ours_ms": o, "theirs_ms": t, "ratios": ratios, "median_ratio": med})
        unit = " /step" if c.startswith("decode") else ""
        print(f"| {c} | {o:.1f}{unit} | {t:.1f}{unit} | {', '.join(f'{x:.2f}' for x in ratios)} | {med:.2f}× |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "backend": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
            "threads": torch.get_num_threads(), "dtype": a.dtype, "weights": a.weights,
            "image_size": a.image_size, "steps": a.steps, "rows": rows, "summary": summary,
        }, indent=2))


if __name__ == "__main__":
    main()
