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


if __name__ == "__main__":
    main()
