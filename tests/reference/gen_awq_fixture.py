#!/usr/bin/env python3
"""A tiny AWQ (AutoAWQ "gemm", int4) Rex-Omni checkpoint + float32 references for the Rust tests.

What comes in: gen_model_fixtures.py (imported: model builder, config/tokenizer files, reference runner),
tests/fixtures/tiny-cases (the same four test images and prompts) and tiny-tied's embedding shard.
What goes out: tests/fixtures/tiny-awq/
    model-00001-of-00002.safetensors  a symlink to ../tiny-tied/'s embedding shard (the 151936-row table is
                        by far the largest tensor; sharing it keeps the repository, which travels whole to the
                        GPU host, small). The text hidden size is therefore tiny-tied's 32, and the AWQ group
                        size 32 (AWQ needs in_features % group_size == 0).
    model-00002-of-00002.safetensors  every decoder linear as `qweight` i32 [in, out/8], `qzeros` i32
                        [in/g, out/8], `scales` f16 [in/g, out] packed in AutoAWQ's GEMM order (nibble i of each
                        i32 = column 8c + AWQ_ORDER[i], AWQ_ORDER = [0,2,4,6,1,3,5,7]); the vision tower
                        (`modules_to_not_convert: ["visual"]`), norms and biases in f16, as AWQ exports ship.
    config.json         with the real AWQ `quantization_config` keys (quant_method, bits, group_size,
                        zero_point, version, modules_to_not_convert) and torch_dtype float16.
    awq-layer-g128.safetensors  one extra 256x384 AWQ layer with the real group size 128 (3 groups per row,
                        4 ggml blocks per group), `layer.{qweight,qzeros,scales}` + `layer.reference`.
    reference.safetensors
        awq.<layer>.weight   f32 [out, in]: s·(q − z) computed from the integers BEFORE packing (independent of
                             the Rust unpacker), for every quantized layer;
        case{i}.*            transformers 4.51.3 float32 references (greedy ids, logits, ...) of the SAME model
                             with those dequantized weights (and the f16-rounded other tensors).

Run:  /work/venv/bin/python tests/reference/gen_awq_fixture.py   (CPU, ~1 min; after gen_model_fixtures.py)
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gen_model_fixtures as g  # noqa: E402

NAME = "tiny-awq"
GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
SPEC = dict(
    hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    mrope_section=[2, 1, 1], tie_word_embeddings=True,
    vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=[1]),
    seed=3,
)
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def awq_quantize(w, group=GROUP):
    """AutoAWQ's zero-point quantizer per (output row, 128-input group): scale = (max − min)/15 (f16),
    zero = clamp(round(−min/scale), 0, 15), q = clamp(round(w/scale) + zero, 0, 15)."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group, group)
    mx, mn = wg.max(-1, keepdim=True).values, wg.min(-1, keepdim=True).values
    scale = ((mx - mn).clamp(min=1e-5) / 15).to(torch.float16).float()
    zero = torch.clamp(torch.round(-mn / scale), 0, 15)
    q = torch.clamp(torch.round(wg / scale) + zero, 0, 15)
    deq = ((q - zero) * scale).reshape(out_f, in_f)  # exact in f32: f16 scale times an integer < 16
    return q.reshape(out_f, in_f).to(torch.int32), zero[..., 0].to(torch.int32), scale[..., 0], deq


def pack(intweight):
    """[rows, cols] ints 0..15 → [rows, cols/8] int32, nibble i = column 8c + AWQ_ORDER[i]."""
    rows, cols = intweight.shape
    x = intweight.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, AWQ_ORDER]
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for i in range(8):
        packed |= x[:, :, i] << (4 * i)
    # Reinterpret as int32 two's complement (nibble 7 may set the sign bit), as torch stores it.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def main():
    torch.set_num_threads(2)
    tok = g.tokenizer()
    cases = g.make_images()
    model, cfg = g.build_model(NAME, SPEC)
    state = model.state_dict()
    tensors = {}
    deq_refs = {}
    from safetensors.torch import load_file

    shared = g.FIX / "tiny-tied" / "model-00001-of-00002.safetensors"
    shared_emb = load_file(str(shared))["model.embed_tokens.weight"]
    with torch.no_grad():
        # tiny-tied's embedding (bf16, loaded through the symlink), every other tensor rounded to f16.
        model.model.embed_tokens.weight.copy_(shared_emb.float())
        for pname, p in model.named_parameters():
            if "embed_tokens" in pname:
                continue
            p.copy_(p.to(torch.float16).float())
        for li in range(SPEC["num_hidden_layers"]):
            for lin in LINEARS:
                key = f"model.layers.{li}.{lin}"
                mod = model.get_submodule(key)
                q, zero, scale, deq = awq_quantize(mod.weight.detach().float())
                mod.weight.copy_(deq)
                # AWQ stores the transposed layout: [in, out] ints, [in/g, out] zeros and scales.
                tensors[f"{key}.qweight"] = pack(q.t().contiguous())
                tensors[f"{key}.qzeros"] = pack(zero.t().contiguous())
                tensors[f"{key}.scales"] = scale.t().contiguous().to(torch.float16)
                if mod.bias is not None:
                    tensors[f"{key}.bias"] = mod.bias.detach().to(torch.float16)
                deq_refs[f"awq.{key}.weight"] = deq.contiguous()
                # Self-check the packing against AutoAWQ's documented unpacking (shift, mask, reverse order).
                shifts = torch.arange(0, 32, 4)
                unpacked = (tensors[f"{key}.qweight"][:, :, None] >> shifts) & 0xF
                unpacked = unpacked.reshape(q.shape[1], -1)
                rev = torch.arange(unpacked.shape[1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
                assert torch.equal(unpacked[:, rev], q.t()), key
    quantized = {k.rsplit(".", 1)[0] for k in tensors}
    for k, v in model.state_dict().items():
        if k in ("lm_head.weight", "model.embed_tokens.weight") or k.rsplit(".", 1)[0] in quantized:
            continue
        tensors[k] = v.to(torch.float16).contiguous()
    out = g.write_checkpoint(NAME, model, cfg)  # config, tokenizer links, shards (replaced below)
    for f in out.glob("model-*.safetensors"):
        f.unlink()
    import os

    os.symlink("../tiny-tied/model-00001-of-00002.safetensors", out / "model-00001-of-00002.safetensors")
    save_file(tensors, str(out / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {k: "model-00002-of-00002.safetensors" for k in tensors}
    weight_map["model.embed_tokens.weight"] = "model-00001-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    # The real group size on one extra layer: 3 groups of 128 per row, 4 ggml blocks per group.
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(256, 384, generator=gen) * 0.05
    q, zero, scale, deq = awq_quantize(w, group=128)
    save_file({
        "layer.qweight": pack(q.t().contiguous()), "layer.qzeros": pack(zero.t().contiguous()),
        "layer.scales": scale.t().contiguous().to(torch.float16), "layer.reference": deq.contiguous(),
    }, str(out / "awq-layer-g128.safetensors"))
    conf = json.loads((out / "config.json").read_text())
    conf["torch_dtype"] = "float16"
    conf["quantization_config"] = {
        "bits": 4, "group_size": GROUP, "modules_to_not_convert": ["visual"], "quant_method": "awq",
        "version": "gemm", "zero_point": True,
    }
    (out / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    refs, meta = g.references(model, cfg, cases, tok)
    refs.update(deq_refs)
    save_file({k: v.contiguous() for k, v in refs.items()}, str(out / "reference.safetensors"))
    for i, m in enumerate(meta):
        print(f"{NAME} case{i}: distinct greedy ids {m['distinct']}/{g.N_GREEDY} delta {m['rope_delta']} "
              f"ids {m['greedy_ids']}")


if __name__ == "__main__":
    main()
