"""Write tests/fixtures/protocol/cafe_expected.json: what the official Rex-Omni parser computes for
the notebook answer of rex-omni-spec.md §4.3 (cafe.jpg, 1440x810, detection).

An independent re-implementation of `rex_omni/parser.py` `parse_standard_prediction` and the
wrapper's bins → pixels step as the spec (§5.3, §5.4) describes them, in plain Python `re`, so the
Rust parser is checked against a different program, not against its own output.

Usage: python3 tests/reference/gen_parser_expected.py   (standard library only)
"""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "protocol", "cafe_expected.json")
CASES_OUT = os.path.join(HERE, "..", "fixtures", "protocol", "parser_cases.json")

W, H = 1440, 810
# rex-omni-spec.md §4.3 raw_output, verbatim.
RAW = (
    "<|object_ref_start|>man<|object_ref_end|><|box_start|><23><294><106><525>,<80><286><146><515>,"
    "<69><363><357><936>,<251><327><457><781>,<308><212><362><461>,<512><252><612><551>,<763><270><842><467>"
    "<|box_end|>, <|object_ref_start|>woman<|object_ref_end|><|box_start|><396><253><446><376>,"
    "<586><360><745><820>,<591><228><645><374>,<699><233><738><417>,<880><293><953><514><|box_end|>, "
    "<|object_ref_start|>yellow flower<|object_ref_end|><|box_start|><441><439><594><588><|box_end|>, "
    "<|object_ref_start|>sofa<|object_ref_end|><|box_start|><643><453><999><977><|box_end|>, "
    "<|object_ref_start|>robot-shape light<|object_ref_end|><|box_start|><128><95><218><259>,"
    "<771><96><876><254><|box_end|>, <|object_ref_start|>blanket<|object_ref_end|><|box_start|>"
    "<828><560><962><947><|box_end|>, <|object_ref_start|>microwave<|object_ref_end|><|box_start|>"
    "<351><307><400><368><|box_end|>, <|object_ref_start|>laptop<|object_ref_end|><|box_start|>"
    "<126><343><166><388><|box_end|>, <|object_ref_start|>cup<|object_ref_end|><|box_start|>"
    "<575><358><592><384>,<613><545><637><602>,<840><364><854><387>,<883><359><895><375><|box_end|>, "
    "<|object_ref_start|>white chair<|object_ref_end|><|box_start|><386><418><434><577>,"
    "<454><419><498><510>,<524><420><582><584>,<624><416><673><563><|box_end|>, "
    "<|object_ref_start|>lamp<|object_ref_end|><|box_start|><358><1><399><131>,<488><2><530><130>,"
    "<620><2><664><132><|box_end|><|im_end|>"
)

PATTERN = r"<\|object_ref_start\|>\s*([^<]+?)\s*<\|object_ref_end\|>\s*<\|box_start\|>(.*?)<\|box_end\|>"


def parse_standard_prediction(text):
    text = text.split("<|im_end|>")[0]
    if not text.endswith("<|box_end|>"):
        text = text + "<|box_end|>"
    result = {}
    for phrase, payload in re.findall(PATTERN, text):
        phrase = phrase.strip()
        shapes = result.setdefault(phrase, [])
        if payload.strip() == "None":
            continue
        for part in payload.split(","):
            nums = [int(n) for n in re.findall(r"<(\d+)>", part)]
            if len(nums) == 2 or len(nums) == 4 or (len(nums) > 4 and len(nums) % 2 == 0):
                shapes.append(nums)
    return result


def parse_keypoint_prediction(text):
    m = re.search(r"```json\s*(.*?)\s*```", text, re.DOTALL)
    if m:
        doc = m.group(1)
    else:
        start, end = text.find("{"), text.rfind("}")
        if start == -1 or end <= start:
            return {}
        doc = text[start:end + 1]
    try:
        data = json.loads(doc)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    result = {}
    for key, inst in data.items():
        if not isinstance(inst, dict) or not isinstance(inst.get("bbox"), str):
            continue
        bbox = [int(n) for n in re.findall(r"<(\d+)>", inst["bbox"])]
        if len(bbox) != 4 or not isinstance(inst.get("keypoints"), dict):
            continue
        points = []
        for name, v in inst["keypoints"].items():
            c = [int(n) for n in re.findall(r"<(\d+)>", v)] if isinstance(v, str) else []
            points.append([name, c if len(c) == 2 else "unvisible"])
        m = re.match(r"[A-Za-z_]+", key)
        label = m.group(0) if m else key
        result.setdefault(label, []).append({"bbox": bbox, "points": points})
    return result


# Random answers for the differential test: grammar pieces, bins <= 999, ASCII digits only, and no
# characters where Python's \s and Rust's White_Space differ (U+001C..U+001F): the documented
# deviations of crates/rexomni/src/protocol/parse.rs are left out on purpose.
ATOMS = ["<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|im_end|>",
         "<|endoftext|>", "None", ",", ", ", " ", "\n", "<", ">", "|", "man", "red cup", " a ", "\t",
         "\u00e9t\u00e9", "\u4e2d", "<|object_ref_start|>cat<|object_ref_end|><|box_start|>"]


def random_text(rng):
    parts = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.45:
            parts.append("<%d>" % rng.randint(0, 999))
        else:
            parts.append(rng.choice(ATOMS))
    return "".join(parts)


def mutated_answer(rng):
    """A grammar-shaped answer (shapes of 1..8 coordinates, None payloads, vLLM-style spaces), then
    a few random token insertions, deletions and swaps."""
    toks = []
    for i in range(rng.randint(1, 4)):
        if i:
            toks.append(rng.choice([", ", "", " ", "\n"]))
        toks += ["<|object_ref_start|>", rng.choice(["man", " red cup ", "a,b", "x\ny", " "]),
                 "<|object_ref_end|>", rng.choice(["", " ", "\n"]), "<|box_start|>"]
        if rng.random() < 0.15:
            toks.append("None")
        for j in range(rng.randint(1, 4)):
            if j:
                toks.append(rng.choice([",", ", ", " , "]))
            for _ in range(rng.choice([2, 4, 4, 4, 6, 8, 1, 3, 5])):
                toks.append("<%d>" % rng.randint(0, 999))
                if rng.random() < 0.1:
                    toks.append(" ")
        toks.append("<|box_end|>")
    toks.append(rng.choice(["<|im_end|>", "", "<|endoftext|>"]))
    for _ in range(rng.randint(0, 3)):
        k = rng.randrange(len(toks) + 1)
        r = rng.random()
        if r < 0.4:
            toks.insert(k, rng.choice(ATOMS + ["<%d>" % rng.randint(0, 999)]))
        elif r < 0.7 and k < len(toks):
            del toks[k]
        elif k + 1 < len(toks):
            toks[k], toks[k + 1] = toks[k + 1], toks[k]
    return "".join(toks)


def random_keypoint_text(rng):
    insts = []
    for i in range(rng.randint(0, 3)):
        n = rng.choice([4, 4, 4, 3, 5])
        bbox = "".join("<%d>" % rng.randint(0, 999) for _ in range(n))
        kps = []
        for name in ["nose", "left eye", "right eye"]:
            v = rng.choice(["unvisible", "<%d><%d>" % (rng.randint(0, 999), rng.randint(0, 999)), "<1>"])
            kps.append('"%s": "%s"' % (name, v))
        key = rng.choice(["person", "cat", "dog_", "1x"]) + str(i + 1)
        insts.append('"%s": {"bbox": "%s", "keypoints": {%s}}' % (key, bbox, ", ".join(kps)))
    doc = "{" + ", ".join(insts) + "}"
    wrap = rng.choice(["```json\n%s\n```<|im_end|>", "%s<|im_end|>", "xx %s yy", "```json\n%s"])
    text = wrap % doc
    if rng.random() < 0.2:
        text = text[: rng.randint(0, len(text))]
    return text


def to_pixels(bins):
    return [b / 999 * (W if i % 2 == 0 else H) for i, b in enumerate(bins)]


def main():
    parsed = parse_standard_prediction(RAW)
    doc = {
        "image": {"name": "cafe.jpg", "width": W, "height": H},
        "raw_output": RAW,
        "phrases": [
            {"label": label, "boxes_bins": shapes, "boxes_px": [to_pixels(s) for s in shapes]}
            for label, shapes in parsed.items()
        ],
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        # repr-exact floats: json writes the shortest round-tripping representation.
        json.dump(doc, f, indent=1)
        f.write("\n")
    n = sum(len(p["boxes_bins"]) for p in doc["phrases"])
    print(f"{len(doc['phrases'])} phrases, {n} boxes -> {OUT}")

    import random
    rng = random.Random(20261126)
    standard = []
    for i in range(600):
        t = random_text(rng) if i % 3 == 0 else mutated_answer(rng)
        standard.append({"text": t, "parsed": [[k, v] for k, v in parse_standard_prediction(t).items()]})
    keypoint = []
    for _ in range(150):
        t = random_keypoint_text(rng)
        keypoint.append({"text": t, "parsed": [[k, v] for k, v in parse_keypoint_prediction(t).items()]})
    with open(CASES_OUT, "w") as f:
        json.dump({"standard": standard, "keypoint": keypoint}, f, ensure_ascii=False)
        f.write("\n")
    print(f"{len(standard)} standard + {len(keypoint)} keypoint cases -> {CASES_OUT}")


if __name__ == "__main__":
    main()
