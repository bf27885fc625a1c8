"""Write tests/fixtures/hf-tokenizer-json/tokenizer.json: a tokenizer.json written by HF's `tokenizers` from
the vocab.json + merges.txt of tests/fixtures/qwen-tokenizer (the files the released Rex-Omni checkpoint ships).

Why: rexomni's loader also accepts a checkpoint that ships a tokenizer.json (most Qwen2.5-VL fine-tunes do). It
takes the file's normalizer, pre-tokenizer and BPE model, and the special tokens from tokenizer_config.json.
That path must be checked against a file HF wrote, not one our own tokenizer wrote and read back (issue 17
item 8). HF's own recipe makes it: transformers' slow Qwen2Tokenizer on the two files, then
`convert_slow_tokenizer` (Qwen2Converter: NFC normalizer, Qwen2 split regex + ByteLevel pre-tokenizer, BPE model
with the merges, ByteLevel decoder), serialised by `tokenizers`. Nothing of ours is involved.

Not used: `Qwen2TokenizerFast.from_pretrained(qwen-tokenizer/)`, which also converts tokenizer_config.json's
added tokens. With Rex-Omni's `<k>` entries (ids 150643+k, inside the BPE range) that conversion gives wrong ids
in transformers 4.51.3 (e.g. `<|im_end|>` becomes 152645 instead of 151645), one more reason the official wrapper
uses the slow tokenizer; a checkpoint would not ship that file.

Checked here before writing: the written file, read back by `tokenizers` with special tokens encoded as text,
gives the slow tokenizer's ids (tests/fixtures/protocol/prompt_ids.json) on every plain text. The Rust test
(crates/rexomni/tests/protocol_prompt_ids.rs) compares the chat prompts.

Usage: /work/venv/bin/python tests/reference/gen_tokenizer_json.py   (transformers==4.51.3, tokenizers 0.21.4)
"""
import json
import os

import tokenizers
import transformers
from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import convert_slow_tokenizer

assert transformers.__version__ == "4.51.3", transformers.__version__

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "..", "fixtures", "qwen-tokenizer")
IDS = os.path.join(HERE, "..", "fixtures", "protocol", "prompt_ids.json")
OUT_DIR = os.path.join(HERE, "..", "fixtures", "hf-tokenizer-json")


def main():
    slow = Qwen2Tokenizer(os.path.join(TOK_DIR, "vocab.json"), os.path.join(TOK_DIR, "merges.txt"))
    fast = convert_slow_tokenizer(slow)
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "tokenizer.json")
    fast.save(path, pretty=False)

    back = tokenizers.Tokenizer.from_file(path)
    back.encode_special_tokens = True  # user text stays text, as in prompt_ids.json
    fx = json.load(open(IDS, encoding="utf-8"))
    for t in fx["plain_texts"]:
        got = back.encode(t["text"], add_special_tokens=False).ids
        assert got == t["ids"], (t["text"], got, t["ids"])
    print(f"wrote {path} ({os.path.getsize(path)} bytes) with tokenizers {tokenizers.__version__}; "
          f"{len(fx['plain_texts'])} plain texts give the slow tokenizer's ids")


if __name__ == "__main__":
    main()
