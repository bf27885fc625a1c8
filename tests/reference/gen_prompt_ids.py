"""Write tests/fixtures/protocol/prompt_ids.json: the prompt ids HF's slow Qwen2Tokenizer (the one the
official Rex-Omni wrapper uses, `use_fast=False`) gives for chat-templated Rex-Omni prompts.

Tokenizer: tests/fixtures/qwen-tokenizer (real Qwen2 vocabulary + Rex-Omni's <k> tokens at 150643+k;
made by make_tokenizer_files.py). Prompts are built here independently of the Rust code, from the
templates of rex-omni-spec.md §5.1, the bins and json.dumps of §5.3 and the chat layout of §4.3.

User text (categories) must stay text even when it looks like a special or coordinate token. For
such cases the expected ids are HF's ids for the same text with the user part encoded as plain text:
the chat parts around it are encoded normally, the task prompt run (which lies between the
<|vision_end|> and <|im_end|> special tokens) with split_special_tokens=True.

Usage: /work/venv/bin/python tests/reference/gen_prompt_ids.py   (transformers==4.51.3)
"""
import json
import os

from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_DIR = os.path.join(HERE, "..", "fixtures", "qwen-tokenizer")
OUT = os.path.join(HERE, "..", "fixtures", "protocol", "prompt_ids.json")

TEMPLATES = {  # rex_omni/tasks.py, rex-omni-spec.md §5.1
    "detection": "Detect {categories}. Output the bounding box coordinates in [x0, y0, x1, y1] format.",
    "pointing": "Point to {categories}.",
    "visual_prompting": "Given reference boxes {visual_prompt} indicating one or more objects, find all similar objects in the image and output their bounding boxes.",
    "keypoint": "Can you detect each {categories} in the image using a [x0, y0, x1, y1] box format, and then provide the coordinates of its {keypoints} as [x0, y0]? Output the answer in JSON format.",
    "ocr_box": "Detect all {categories} and recognize them.",
    "ocr_polygon": "Can you detect all {categories} in this image in polygon format like [x0, y0, x1, y1, x2, y2 ...] and then recognize them?",
    "gui_grounding": 'Detect element "{categories}"" in the image.',
    "gui_pointing": 'Point to element "{categories}".',
}
KEYPOINTS = {
    "person": ["nose", "left eye", "right eye", "left ear", "right ear", "left shoulder", "right shoulder",
               "left elbow", "right elbow", "left wrist", "right wrist", "left hip", "right hip", "left knee",
               "right knee", "left ankle", "right ankle"],
}
BEFORE = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<|vision_start|>"
AFTER = "<|im_end|>\n<|im_start|>assistant\n"


def to_bin(v, size):
    return min(max(int(min(max(v / size, 0.0), 1.0) * 999), 0), 999)


def prompt_text(p, w, h):
    cats = ", ".join(p.get("categories", []))
    fields = {"categories": cats}
    if p["task"] == "visual_prompting":
        strs = ["<%d><%d><%d><%d>" % (to_bin(b[0], w), to_bin(b[1], h), to_bin(b[2], w), to_bin(b[3], h))
                for b in p["boxes"]]
        fields["visual_prompt"] = json.dumps({"object_1": strs})
    if p["task"] == "keypoint":
        fields["keypoints"] = ", ".join(KEYPOINTS[p["keypoint_type"]])
    return TEMPLATES[p["task"]].format(**fields)


CASES = [
    ("detection", {"task": "detection", "categories": ["person", "car"]}, 640, 480, 4, False),
    # The notebook prompt of rex-omni-spec.md §4.3 (pre-release ". ." included): 50 text tokens.
    ("notebook_cafe", {"task": "detection", "categories": [
        "man", "woman", "yellow flower", "sofa", "robot-shope light", "blanket", "microwave", "laptop",
        "cup", "white chair", "lamp. "]}, 1440, 810, 1479, False),
    ("pointing", {"task": "pointing", "categories": ["the red cup"]}, 640, 480, 2, False),
    ("visual_prompting", {"task": "visual_prompting", "boxes": [[12.0, 330.5, 272.3, 455.0],
                                                                [73.9, 44.0, 143.7, 302.9]]}, 800, 800, 3, False),
    ("keypoint", {"task": "keypoint", "categories": ["person"], "keypoint_type": "person"}, 640, 480, 2, False),
    ("ocr_polygon", {"task": "ocr_polygon", "categories": ["text line"]}, 640, 480, 2, False),
    ("gui_grounding_unicode", {"task": "gui_grounding", "categories": ["Cafe\u0301 \"Submit\" 按钮"]}, 640, 480, 2, False),
    # Special-looking user text: must stay plain text.
    ("category_specials", {"task": "detection", "categories": ["<|im_end|>", "<12>", "car<|box_start|>x"]}, 640, 480, 2, True),
    ("pointing_coord_phrase", {"task": "pointing", "categories": ["<0><999> sign"]}, 640, 480, 2, True),
]


# Plain user text: exercises the Qwen2 split regex (contractions, single digits, whitespace runs before
# a word, newlines, punctuation runs), NFC and byte-level BPE on non-ASCII. Encoded as plain text.
PLAIN_TEXTS = [
    "I'm sure it's the man's cup, THEY'LL see; we'd've",
    "12345 apples and 3.14159 pies, 2026-11-26",
    "word  two   spaces\tand\ttabs\n\nnew  \n lines   ",
    "   leading and trailing   ",
    "Cafe\u0301 na\u0308ive \u00c5ngstr\u00f6m \u212b",
    "\u4e2d\u6587\u5b57\u7b26 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4",
    "emoji \U0001F600\U0001F44D\U0001F3FD and symbols \u2209 \u2211 \u00a9\u00ae",
    "!!!??? ... --- *** ((brackets)) [x0, y0] {json: 1}",
    "<|im_end|><12><|box_start|> <0> < 999 > <|endoftext|>",
    "robot-shape light, white chair, lamp. . Output",
    "\r\n\r\nwindows\r\nline\u00a0nbsp\u3000ideographic space",
]


def main():
    tok = AutoTokenizer.from_pretrained(TOK_DIR, use_fast=False)
    assert type(tok).__name__ == "Qwen2Tokenizer", type(tok)
    cases = []
    for name, p, w, h, n_img, user_is_special_looking in CASES:
        prompt = prompt_text(p, w, h)
        head = BEFORE + "<|image_pad|>" * n_img + "<|vision_end|>"
        text = head + prompt + AFTER
        if user_is_special_looking:
            ids = (tok.encode(head) + tok.encode(prompt, split_special_tokens=True) + tok.encode(AFTER))
        else:
            ids = tok.encode(text)
        cases.append({"name": name, "prompt": p, "image": [w, h], "num_image_tokens": n_img,
                      "prompt_text": prompt, "prompt_text_ids": len(tok.encode(prompt, split_special_tokens=user_is_special_looking)),
                      "ids": ids})
    plain = [{"text": t, "ids": tok.encode(t, split_special_tokens=True)} for t in PLAIN_TEXTS]
    with open(OUT, "w") as f:
        json.dump({"tokenizer": "transformers %s Qwen2Tokenizer (slow)" % __import__("transformers").__version__,
                   "cases": cases, "plain_texts": plain}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{len(cases)} cases -> {OUT}")


if __name__ == "__main__":
    main()
