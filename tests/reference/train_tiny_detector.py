#!/usr/bin/env python3
"""Train a tiny Qwen2.5-VL that really detects, in the real Rex-Omni checkpoint layout (issue 18).

What comes in: the pinned PyPI packages (requirements.txt), the shared slow-tokenizer files in
tests/fixtures/qwen-tokenizer/, and the checkpoint writer of gen_model_fixtures.py (imported, not copied).
What goes out (tests/fixtures/tiny-detector/):
  - the checkpoint: legacy keys, two bf16 shards + index, config/generation/preprocessor/chat-template files,
    tokenizer symlinks (gen_model_fixtures.write_checkpoint), untied lm_head like the release;
  - reference.safetensors: float32 transformers 4.51.3 references computed from the bf16-rounded weights for
    every case (held-out frames and clip frames): vision embeds, positions, logits, greedy ids (generate,
    greedy, repetition_penalty 1.05, stop on <|im_end|>/<|endoftext|>), chosen and top-5 logprobs;
  - cases.json: per case the frame file, size, grid, prompt ids, ground-truth boxes, HF's greedy ids, decoded
    text, parsed boxes (spec §5.4 parser) and whether generation stopped on EOS; plus the training config and
    the held-out scores;
  - frames/*.png: the original-size frames (sizes are multiples of 28, so smart_resize leaves them as they are).
What it learns: frames of 112x112, 168x112, 112x168 or 140x140 px with 1-3 of {red square, blue disc, green
triangle} (distinct categories) at random positions and sizes on noisy, textured backgrounds; the prompt is
Rex-Omni's detection prompt for the three categories in that fixed order; the answer is what Rex-Omni writes
(spec §5.4): the categories present, in prompt order, one box each in bins of the original frame (§5.3),
then <|im_end|>. Shape edges lie on a 4 px grid (GRID) so that neighbouring answers are >= 23 bins apart and
greedy margins are real (bf16 agreement is then a meaningful check).

Training: loss on answer tokens only; the embedding and lm_head rows of ids that never occur stay exactly zero
(so they compress in git) and the full-vocabulary log-sum-exp is exact: unused logits are 0, so
lse = logaddexp(lse over used ids, log(n_unused)). Coordinate targets are a Gaussian over neighbouring bins
mixed with the one-hot bin, annealed sharper over training.

Run:  /work/venv/bin/python tests/reference/train_tiny_detector.py            (CPU, 2 threads)
      --steps N --out DIR --eval N  for short trial runs (DIR defaults to the fixture folder).
"""
import argparse
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_model_fixtures as gmf  # noqa: E402  (the checkpoint writer, prompt layout and patchify)

NAME = "tiny-detector"
CATS = ["red square", "blue disc", "green triangle"]
SIZES = [(112, 112), (168, 112), (112, 168), (140, 140)]  # (W, H): multiples of 28, >= min_pixels
GRID = 4  # px: every shape edge lies on this grid
CLIP_SIZE = (168, 112)
CLIP_FRAMES = 24
MAX_NEW = 48

OBJ_START, OBJ_END, BOX_START, BOX_END, IM_END = 151646, 151647, 151648, 151649, 151645
COORD0 = 150643
VOCAB = 151936

MODEL_SPEC = dict(
    # head_dim 16 -> mrope_section [2,3,3] (sums to head_dim/2 like the real [16,24,24] for 128); GQA 2:1.
    hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=[2, 3, 3], tie_word_embeddings=False,
    # With head_dim 16 the h/w sections get inv_freq theta^(-j/8), j = 2..7: at the real 1e6 that is < 0.04
    # rad per position (w: < 2e-4), i.e. image rows and columns are nearly invisible to attention. 10 gives
    # 0.13-0.56 rad: the model can learn where things are, and the parity tests exercise every M-RoPE section.
    rope_theta=10.0,
    # window attention everywhere except the last block of each half, like the real [7,15,23,31] of 32.
    vision=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1, 3]),
    seed=18,
)


def bins(v, size):
    """spec §5.3: pixels -> bins against the original size."""
    return min(max(int(min(max(v / size, 0.0), 1.0) * 999), 0), 999)


# ---------------------------------------------------------------------------------------------- frames
def background(rng, w, h):
    """A noisy, textured, low-saturation background: coarse random field + stripes + sensor noise."""
    base = rng.uniform(70, 185)
    tint = rng.uniform(-18, 18, 3)
    cw, ch = w // 8 + 2, h // 8 + 2
    coarse = rng.normal(0, 1, (ch, cw)).astype(np.float32)
    coarse = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.5)
    stripes = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * freq + rng.uniform(0, 6.3))
    lum = base + rng.uniform(10, 35) * coarse + rng.uniform(0, 15) * stripes
    img = lum[..., None] + tint[None, None, :] + rng.normal(0, 6, (h, w, 3)) * rng.uniform(0.3, 1.6)
    return img


COLOURS = {
    "red square": ((190, 245), (10, 70), (10, 70)),
    "blue disc": ((10, 70), (30, 100), (190, 245)),
    "green triangle": ((10, 70), (150, 220), (10, 70)),
}


def draw(img, rng, cat, box):
    x0, y0, x1, y1 = box
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = xx + 0.5, yy + 0.5
    if cat == "red square":
        m = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    elif cat == "blue disc":
        r = (x1 - x0) / 2
        m = (cx - (x0 + r)) ** 2 + (cy - (y0 + r)) ** 2 <= r * r
    else:  # apex at the top centre, base along the bottom edge
        t = (cy - y0) / (y1 - y0)
        half = t * (x1 - x0) / 2
        mid = (x0 + x1) / 2
        m = (cy >= y0) & (cy < y1) & (cx >= mid - half) & (cx <= mid + half)
    col = np.array([rng.uniform(*c) for c in COLOURS[cat]], dtype=np.float32)
    img[m] = col + rng.normal(0, 5, (int(m.sum()), 3))


def place(rng, w, h, cats):
    """Non-overlapping grid-aligned boxes (x0,y0,x1,y1) in pixels, edges exclusive."""
    boxes = []
    for cat in cats:
        for _ in range(200):
            s = GRID * int(rng.integers(20 // GRID, int(min(w, h) * 0.5) // GRID + 1))
            bw = bh = s
            if cat == "green triangle":
                bh = GRID * max(16 // GRID, int(round(s * rng.uniform(0.75, 1.25) / GRID)))
                bh = min(bh, GRID * (h // GRID))
            x0 = GRID * int(rng.integers(0, (w - bw) // GRID + 1))
            y0 = GRID * int(rng.integers(0, (h - bh) // GRID + 1))
            b = (x0, y0, x0 + bw, y0 + bh)
            if all(b[0] >= o[2] + 2 or o[0] >= b[2] + 2 or b[1] >= o[3] + 2 or o[1] >= b[3] + 2 for o in boxes):
                boxes.append(b)
                break
        else:
            return None
    return boxes


def chroma_subsample(img):
    """Like an I420 video frame: full-resolution luma, chroma averaged over 2x2 (the clip is H.264)."""
    m = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], dtype=np.float32)
    yuv = img @ m.T
    h, w = img.shape[:2]
    for c in (1, 2):
        ch = yuv[: h // 2 * 2, : w // 2 * 2, c].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        yuv[: h // 2 * 2, : w // 2 * 2, c] = np.repeat(np.repeat(ch, 2, 0), 2, 1)
    return yuv @ np.linalg.inv(m).T


def make_frame(rng, w, h, aug=True):
    while True:
        k = int(rng.integers(1, 4))
        cats = [CATS[i] for i in sorted(rng.choice(3, size=k, replace=False))]
        boxes = place(rng, w, h, cats)
        if boxes is not None:
            break
    img = background(rng, w, h)
    for c, b in zip(cats, boxes):
        draw(img, rng, c, b)
    if aug and rng.random() < 0.5:
        img = chroma_subsample(img)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), dict(zip(cats, boxes))


def clip_frames():
    """One blue disc moving left to right across a fixed textured background (a camera's view)."""
    rng = np.random.default_rng(1234)
    w, h = CLIP_SIZE
    bg = background(rng, w, h)
    frames = []
    s = 36
    for i in range(CLIP_FRAMES):
        x0 = GRID * int(round((4 + i * (w - s - 8) / (CLIP_FRAMES - 1)) / GRID))
        y0 = GRID * int(round((40 + 12 * math.sin(i / 4)) / GRID))
        img = bg.copy()
        box = (x0, y0, x0 + s, y0 + s)
        draw(img, np.random.default_rng(i), "blue disc", box)
        frames.append((np.clip(np.rint(img), 0, 255).astype(np.uint8), {"blue disc": box}))
    return frames


# ---------------------------------------------------------------------------------------------- tokens
class Vocab:
    """Prompt and answer ids (spec §4.3, §5.4), and the compact table of every id training uses."""

    def __init__(self, tok):
        self.tok = tok
        self.phrase = {c: tok.encode(c, add_special_tokens=False) for c in CATS}
        self.sep = tok.encode(", ", add_special_tokens=False)
        self.prompts = {}
        for w, h in SIZES + [CLIP_SIZE]:
            n = (h // 14) * (w // 14) // 4
            self.prompts[n] = gmf.prompt_ids(tok, CATS, n)[0]
        used = set(range(COORD0, COORD0 + 1000)) | {IM_END, 151643, OBJ_START, OBJ_END, BOX_START, BOX_END}
        for p in self.prompts.values():
            used |= set(p)
        for v in self.phrase.values():
            used |= set(v)
        used |= set(self.sep)
        self.used = torch.tensor(sorted(used), dtype=torch.long)
        self.to_compact = torch.full((VOCAB,), -1, dtype=torch.long)
        self.to_compact[self.used] = torch.arange(len(self.used))
        self.n_unused = VOCAB - len(self.used)
        # The answer text through the slow tokenizer must give the ids we build piecewise.
        ans = self.answer({"red square": (0, 4, 8, 12), "green triangle": (20, 24, 28, 32)}, 112, 112)
        assert tok.encode(self.answer_text({"red square": (0, 4, 8, 12), "green triangle": (20, 24, 28, 32)},
                                           112, 112), add_special_tokens=False) == ans

    def box_bins(self, b, w, h):
        return [bins(b[0], w), bins(b[1], h), bins(b[2], w), bins(b[3], h)]

    def answer(self, objs, w, h):
        ids = []
        for c in CATS:
            if c in objs:
                if ids:
                    ids += self.sep
                ids += [OBJ_START] + self.phrase[c] + [OBJ_END, BOX_START]
                ids += [COORD0 + k for k in self.box_bins(objs[c], w, h)] + [BOX_END]
        return ids + [IM_END]

    def answer_text(self, objs, w, h):
        items = []
        for c in CATS:
            if c in objs:
                coords = "".join(f"<{k}>" for k in self.box_bins(objs[c], w, h))
                items.append(f"<|object_ref_start|>{c}<|object_ref_end|><|box_start|>{coords}<|box_end|>")
        return ", ".join(items) + "<|im_end|>"


PARSE_RE = re.compile(r"<\|object_ref_start\|>\s*([^<]+?)\s*<\|object_ref_end\|>\s*<\|box_start\|>(.*?)<\|box_end\|>")


def decode(ids):
    """Decode as HF would with skip_special_tokens=False; coordinate ids become <k> (spec §4.2)."""
    out = []
    for i in ids:
        if COORD0 <= i < COORD0 + 1000:
            out.append(f"<{i - COORD0}>")
        else:
            out.append(TOK.decode([i], skip_special_tokens=False))
    return "".join(out)


def parse(text):
    """spec §5.4 parse_standard_prediction, boxes only, in bins."""
    text = text.split("<|im_end|>")[0]
    if not text.endswith("<|box_end|>"):
        text += "<|box_end|>"
    res = {}
    for phrase, payload in PARSE_RE.findall(text):
        lst = res.setdefault(phrase.strip(), [])
        for part in payload.split(","):
            nums = [int(x) for x in re.findall(r"<(\d+)>", part)]
            if len(nums) == 4:
                lst.append(nums)
    return res


# ---------------------------------------------------------------------------------------------- training
def make_batch(rng, voc, B, size=None):
    w, h = size or SIZES[int(rng.integers(len(SIZES)))]
    frames, objs = zip(*[make_frame(rng, w, h) for _ in range(B)])
    n = (h // 14) * (w // 14) // 4
    prompt = voc.prompts[n]
    answers = [voc.answer(o, w, h) for o in objs]
    L = len(prompt) + max(len(a) for a in answers)
    ids = torch.full((B, L), 151643, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    tgt = torch.full((B, L), -1, dtype=torch.long)  # target id predicted AT this position
    for i, a in enumerate(answers):
        seq = prompt + a
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        tgt[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(a)
    pv = torch.from_numpy(np.concatenate([gmf.patchify(f) for f in frames]))
    thw = torch.tensor([[1, h // 14, w // 14]] * B, dtype=torch.long)
    return ids, attn, tgt, pv, thw


def target_dist(tgt_ids, voc, sigma, alpha):
    """One-hot, except coordinate targets: (1-alpha) one-hot + alpha Gaussian(sigma bins) over coordinates."""
    n = len(tgt_ids)
    dist = torch.zeros((n, len(voc.used)))
    dist[torch.arange(n), voc.to_compact[tgt_ids]] = 1.0
    is_c = (tgt_ids >= COORD0) & (tgt_ids < COORD0 + 1000)
    if is_c.any() and alpha > 0:
        k = (tgt_ids[is_c] - COORD0).float()
        grid = torch.arange(1000).float()
        g = torch.exp(-0.5 * ((grid[None, :] - k[:, None]) / sigma) ** 2)
        g = g / g.sum(-1, keepdim=True)
        c0 = int(voc.to_compact[COORD0])
        soft = torch.zeros((int(is_c.sum()), len(voc.used)))
        soft[:, c0 : c0 + 1000] = g  # coordinate ids are contiguous in the sorted compact table
        dist[is_c] = (1 - alpha) * dist[is_c] + alpha * soft
    return dist


def fast_visual(vis, pv, thw):
    """HF's vision tower, batched for B images of ONE size (training only; checked against HF at start-up).

    HF runs a batch as one sequence with an N x N block-diagonal mask (quadratic in the batch, and a Python loop
    over windows per block); here the same math runs as B independent images with one per-image window mask.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    B = thw.shape[0]
    gh, gw = int(thw[0, 1]), int(thw[0, 2])
    assert (thw[:, 1:] == thw[0, 1:]).all()
    N = gh * gw
    one = thw[:1]
    # The patch embedding is a Conv3d whose kernel covers the whole patch: the same sums as one matmul, which
    # the CPU runs several times faster than mkldnn's Conv3d (forward and backward).
    pw = vis.patch_embed.proj.weight
    x = pv.view(pv.shape[0], -1).to(pw.dtype) @ pw.view(pw.shape[0], -1).T
    D = x.shape[-1]
    rot = vis.rot_pos_emb(one)
    widx, cuw = vis.get_window_index(one)
    cuw = torch.unique_consecutive(torch.tensor(cuw))
    x = x.view(B, N // 4, 4, D)[:, widx].reshape(B, N, D)
    rot = rot.view(N // 4, 4, -1)[widx].reshape(N, -1)
    emb = torch.cat((rot, rot), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    win = torch.full((N, N), torch.finfo(x.dtype).min)
    for a, b in zip(cuw[:-1].tolist(), cuw[1:].tolist()):
        win[a:b, a:b] = 0
    for i, blk in enumerate(vis.blocks):
        attn = blk.attn
        nh = attn.num_heads
        hd = D // nh
        qkv = attn.qkv(blk.norm1(x)).view(B, N, 3, nh, hd)
        q, k, v = qkv.unbind(2)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if i in vis.fullatt_block_indexes else win)
        o = o.transpose(1, 2).reshape(B, N, D)
        x = x + attn.proj(o)
        x = x + blk.mlp(blk.norm2(x))
    y = vis.merger(x.reshape(B * N, D))
    rev = torch.argsort(widx)
    return y.view(B, N // 4, -1)[:, rev].reshape(B * N // 4, -1)


def fast_text(lm, x, pos):
    """HF's decoder stack (eager attention) for right-padded rows (training only; checked at start-up).

    Every row is padded at its end, so a valid token never sees a pad through the causal mask alone: no 4-D
    padding mask is built, and attention runs in one fused scaled_dot_product_attention call per layer. Outputs
    at pad positions differ from HF's and carry no loss.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_multimodal_rotary_pos_emb

    cos, sin = lm.rotary_emb(x, pos)
    B, L, _ = x.shape
    for layer in lm.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(B, L, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, L, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, L, -1, a.head_dim).transpose(1, 2)
        q, k = apply_multimodal_rotary_pos_emb(q, k, cos, sin, a.rope_scaling["mrope_section"])
        g = a.num_key_value_groups  # GQA: query head j reads key/value head j // g (HF's repeat_kv)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(o.transpose(1, 2).reshape(B, L, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x)


class Trainer(torch.nn.Module):
    """The HF model for vision + decoder, with compact embedding / lm_head tables for the used ids only."""

    def __init__(self, model, voc):
        super().__init__()
        self.m = model
        self.voc = voc
        H = model.config.hidden_size
        self.emb = torch.nn.Parameter(torch.randn(len(voc.used), H) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(len(voc.used), H) * 0.02)
        self.log_unused = math.log(voc.n_unused)

    def hidden(self, ids, attn, pv, thw):
        img = fast_visual(self.m.visual, pv, thw)
        x = self.emb[self.voc.to_compact[ids].clamp(min=0)]
        mask = ids == gmf.IMAGE_PAD
        x = x.masked_scatter(mask[..., None].expand_as(x), img.to(x.dtype))
        pos, _ = self.m.get_rope_index(ids, thw, None, attn)
        return fast_text(self.m.model, x, pos)

    def logprobs(self, h):
        lu = h @ self.head.T
        lse = torch.logaddexp(torch.logsumexp(lu, -1), torch.tensor(self.log_unused))
        return lu - lse[:, None]

    def export(self):
        """Write the compact rows into the full tables; every other row is exactly zero."""
        with torch.no_grad():
            E = self.m.model.embed_tokens.weight
            W = self.m.lm_head.weight
            E.zero_()
            W.zero_()
            E[self.voc.used] = self.emb
            W[self.voc.used] = self.head


def load_checkpoint(model, tr, folder):
    """The weights of an earlier run (bf16 shards) into the model and the compact tables."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    with torch.no_grad():
        tr.emb.copy_(state["model.embed_tokens.weight"][tr.voc.used])
        tr.head.copy_(state["lm_head.weight"][tr.voc.used])
    prev = json.loads((folder / "cases.json").read_text())["training"]
    if "stages" not in prev:
        prev = dict(stages=[prev])
    print(f"resumed from {folder}: {prev}", flush=True)
    return prev


def init_weights(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.zero_()
            elif p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0, 0.7 / math.sqrt(p[0].numel()))


VOC = None  # set before the data process forks


def _batch_for_step(args):
    seed, step, batch = args
    torch.set_num_threads(1)
    return make_batch(np.random.default_rng([seed, step]), VOC, batch)


def batches(seed, steps, batch, ahead=3):
    """Training batches made in a second process (one core trains, one draws frames); batch k depends only
    on (seed, k), so the run is reproducible."""
    import collections
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1) as pool:
        q = collections.deque()
        for k in range(steps):
            while len(q) < ahead and k + len(q) < steps:
                q.append(pool.apply_async(_batch_for_step, ((seed, k + len(q), batch),)))
            yield q.popleft().get()


def train(tr, voc, steps, batch, lr, log_every, seed, resume=False, sharp_at=0.7):
    params = [p for n, p in tr.named_parameters() if "embed_tokens" not in n and "lm_head" not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 30)
    t0 = time.time()
    hist = []
    data = batches(seed, steps, batch)
    for step in range(steps):
        frac = step / max(1, steps - 1)
        cur_lr = lr * min(1.0, (step + 1) / warm) * (0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        # Wide early: ordinal signal; sharp from `sharp_at` on: real greedy margins, and the last part of the
        # cosine (lr falling from ~1/3 of the peak) trains on the final targets.
        fs = min(1.0, frac / sharp_at)
        sigma = 40.0 * (1 - fs) ** 2 + 3.0
        alpha = 0.6 * (1 - fs) + 0.15 * fs
        if resume:  # a second stage continues where the first ended
            sigma, alpha = 3.0, 0.15
        ids, attn, tgt, pv, thw = next(data)
        h = tr.hidden(ids, attn, pv, thw)
        sel = tgt >= 0
        t = tgt[sel]
        lp = tr.logprobs(h[sel])
        loss = -(target_dist(t, voc, sigma, alpha) * lp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            acc = (voc.used[lp.argmax(-1)] == t).float().mean().item()
            isc = (t >= COORD0) & (t < COORD0 + 1000)
            err = (voc.used[lp[isc].argmax(-1)] - t[isc]).abs().float().mean().item()
        hist.append((loss.item(), acc, err))
        if (step + 1) % log_every == 0 or step == steps - 1:
            l, a, e = np.mean(hist, axis=0)
            hist = []
            print(f"step {step + 1}/{steps} {time.time() - t0:6.0f}s lr {cur_lr:.2e} loss {l:.3f} "
                  f"tok-acc {a:.3f} coord |err| {e:.1f} bins", flush=True)
    return time.time() - t0


# ---------------------------------------------------------------------------------------------- evaluation
def iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


@torch.no_grad()
def hf_generate(model, voc, frames):
    """HF generate (greedy, repetition_penalty 1.05) on same-size frames in one batch: no padding needed."""
    h, w = frames[0].shape[:2]
    n = (h // 14) * (w // 14) // 4
    prompt = voc.prompts[n]
    ids = torch.tensor([prompt] * len(frames))
    pv = torch.from_numpy(np.concatenate([gmf.patchify(f) for f in frames]))
    thw = torch.tensor([[1, h // 14, w // 14]] * len(frames), dtype=torch.long)
    gen = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_grid_thw=thw,
        max_new_tokens=MAX_NEW, do_sample=False, repetition_penalty=gmf.REP_PENALTY, eos_token_id=gmf.EOS_IDS,
        pad_token_id=151643, temperature=None, top_p=None, top_k=None,
    )
    outs = []
    for row in gen[:, len(prompt):].tolist():
        # Rows that finished early are padded with <|endoftext|> (151643), itself a stop id: cut at the first stop.
        cut = next((i + 1 for i, t in enumerate(row) if t in gmf.EOS_IDS), len(row))
        outs.append(row[:cut])
    return outs


def score(voc, objs_list, outs, sizes):
    n_shapes = hit = exact = eos = 0
    for objs, out, (w, h) in zip(objs_list, outs, sizes):
        eos += int(bool(out) and out[-1] in gmf.EOS_IDS)
        exact += int(out == voc.answer(objs, w, h))
        parsed = parse(decode(out))
        for c, b in objs.items():
            n_shapes += 1
            want = voc.box_bins(b, w, h)
            got = parsed.get(c, [])
            hit += int(any(iou(want, g) >= 0.5 for g in got))
    n = len(outs)
    return dict(frames=n, shapes=n_shapes, iou50_rate=hit / n_shapes, exact_rate=exact / n, eos_rate=eos / n)


def evaluate(model, voc, n_per_size, seed):
    rng = np.random.default_rng(seed)
    objs_all, outs_all, sizes_all = [], [], []
    for w, h in SIZES:
        fr = [make_frame(rng, w, h) for _ in range(n_per_size)]
        outs_all += hf_generate(model, voc, [f for f, _ in fr])
        objs_all += [o for _, o in fr]
        sizes_all += [(w, h)] * n_per_size
    return score(voc, objs_all, outs_all, sizes_all)


TOK = None


T0 = time.time()


def main():
    global TOK, VOC
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--eval", type=int, default=50, help="held-out frames per size")
    ap.add_argument("--out", default=str(gmf.FIX / NAME))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--resume", help="continue training the checkpoint in this folder (second stage)")
    ap.add_argument("--seed", type=int, default=7, help="training-data seed")
    ap.add_argument("--sharp-at", type=float, default=0.7,
                    help="fraction of training after which coordinate targets stay at their sharpest")
    args = ap.parse_args()
    # One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other (measured 3-5x slower
    # per step under load); the second core draws the training frames.
    torch.set_num_threads(1)
    torch.manual_seed(MODEL_SPEC["seed"])
    TOK = gmf.tokenizer()
    voc = VOC = Vocab(TOK)
    model, cfg = gmf.build_model(NAME, MODEL_SPEC)
    init_weights(model)
    model.train()
    tr = Trainer(model, voc)
    args.stages = []
    if args.resume:
        args.stages = load_checkpoint(model, tr, Path(args.resume)).get("stages", [])
    with torch.no_grad():  # the batched vision tower must be HF's, exactly enough
        ids, attn, tgt, pv, thw = make_batch(np.random.default_rng(0), voc, 3, size=(168, 112))
        d = (fast_visual(model.visual, pv, thw) - model.visual(pv, grid_thw=thw)).abs().max().item()
        assert d < 1e-4, f"fast_visual differs from HF by {d}"
        ids, attn, tgt, pv, thw = make_batch(np.random.default_rng(1), voc, 4)
        pos, _ = model.get_rope_index(ids, thw, None, attn)
        x = torch.randn(ids.shape + (model.config.hidden_size,), generator=torch.Generator().manual_seed(0))
        ref = model.model(inputs_embeds=x, position_ids=pos, attention_mask=attn, use_cache=False).last_hidden_state
        d = (fast_text(model.model, x, pos) - ref)[attn.bool()].abs().max().item()
        assert d < 1e-4, f"fast_text differs from HF by {d}"
    print(f"used ids {len(voc.used)}, unused {voc.n_unused}; params (compact) "
          f"{sum(p.numel() for n, p in tr.named_parameters() if 'embed_tokens' not in n and 'lm_head' not in n)}",
          flush=True)
    load0, cpu0 = os.getloadavg(), time.process_time()
    secs = train(tr, voc, args.steps, args.batch, args.lr, log_every=25, seed=args.seed, resume=bool(args.resume),
                 sharp_at=args.sharp_at)
    cpu = time.process_time() - cpu0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    load1 = os.getloadavg()
    print(f"training: {args.steps} steps x {args.batch} frames in {secs:.0f} s wall ({secs / 60:.1f} min); CPU "
          f"{cpu:.0f} s trainer + {kids.ru_utime + kids.ru_stime:.0f} s data process; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.2f}' for v in load0)} at start, {'/'.join(f'{v:.2f}' for v in load1)} at end",
          flush=True)
    args.cpu_s = dict(trainer=round(cpu), data=round(kids.ru_utime + kids.ru_stime))
    args.load = dict(start=[round(v, 2) for v in load0], end=[round(v, 2) for v in load1])
    model.eval()
    tr.export()
    with torch.no_grad():  # the checkpoint is bf16: evaluate and reference the rounded weights, in f32
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    t1 = time.time()
    scores = evaluate(model, voc, args.eval, seed=99)
    print(f"held-out ({time.time() - t1:.0f} s): {json.dumps(scores)}", flush=True)
    if args.no_write:
        return
    write_fixture(model, cfg, voc, Path(args.out), scores, secs, args)
    print(f"total: {time.time() - T0:.0f} s wall, {time.process_time():.0f} s CPU in this process", flush=True)


def write_fixture(model, cfg, voc, out, scores, secs, args):
    assert out.name == NAME, "write_checkpoint writes tests/fixtures/<name>"
    out = gmf.write_checkpoint(NAME, model, cfg)
    (out / "frames").mkdir()
    rng = np.random.default_rng(2024)
    cases = []
    for k, (w, h) in enumerate(SIZES * 2):
        f, objs = make_frame(rng, w, h, aug=False)
        cases.append((f"heldout{k}", f, objs))
    for i, (f, objs) in enumerate(clip_frames()):
        cases.append((f"clip{i:02d}", f, objs))
    tok_cases = []
    meta = []
    for name, f, objs in cases:
        Image.fromarray(f).save(out / "frames" / f"{name}.png")
        h, w = f.shape[:2]
        pv = torch.from_numpy(gmf.patchify(f))
        thw = [1, h // 14, w // 14]
        tok_cases.append(dict(thw=thw, cats=CATS, pv=pv))
    old = gmf.N_GREEDY
    gmf.N_GREEDY = MAX_NEW
    refs, rmeta = gmf.references(model, cfg, tok_cases, TOK)
    gmf.N_GREEDY = old
    for i, ((name, f, objs), rm) in enumerate(zip(cases, rmeta)):
        h, w = f.shape[:2]
        ids = rm["greedy_ids"]
        text = decode(ids)
        n = (h // 14) * (w // 14) // 4
        meta.append(dict(
            name=name, frame=f"frames/{name}.png", size=[w, h], grid_thw=[1, h // 14, w // 14],
            prompt=gmf.prompt_ids(TOK, CATS, n)[1], prompt_ids=voc.prompts[n],
            truth_px={c: list(b) for c, b in objs.items()},
            truth_bins={c: voc.box_bins(b, w, h) for c, b in objs.items()},
            truth_ids=voc.answer(objs, w, h),
            greedy_ids=ids, text=text, parsed_bins=parse(text), stopped_on_eos=bool(ids) and ids[-1] in gmf.EOS_IDS,
        ))
    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "reference.safetensors"))
    ref_scores = score(voc, [c[2] for c in cases], [m["greedy_ids"] for m in meta], [tuple(m["size"]) for m in meta])
    doc = dict(
        categories=CATS, grid_px=GRID, max_new_tokens=MAX_NEW, repetition_penalty=gmf.REP_PENALTY,
        training=dict(stages=args.stages + [dict(
            steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, resume=bool(args.resume),
            sharp_at=args.sharp_at, seconds=round(secs), cpu_seconds=args.cpu_s, load_average=args.load,
            torch=torch.__version__, threads=torch.get_num_threads())]),
        model=MODEL_SPEC, heldout_scores=scores, reference_case_scores=ref_scores, cases=meta,
    )
    (out / "cases.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"reference cases: {json.dumps(ref_scores)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
