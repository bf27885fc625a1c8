//! Fuzzing the MQTT prompt-set payload parser (issue 6 item 6): `sinks::prompts::parse_prompt_set`
//! never panics on any payload, an accepted payload is a prompt that `validate()` accepts (so the
//! worker can always build a request from it) and is then in force, and a rejection names the
//! stream and leaves the prompt in force untouched. Every payload goes through
//! `PromptTable::apply`, the handler the MQTT sink runs, with a table in place.
//!
//! In: generated payloads: arbitrary bytes (including over the 64 KiB cap), arbitrary JSON values,
//! and prompt-shaped objects with wrong types, unknown tasks, special-token text, extreme or
//! inverted boxes. Out: pass/fail; runs on the test thread, no I/O.
//!
//! Budget: `PROPTEST_CASES` (default `fuzz_budget::DEFAULT_CASES` per property). Long run
//! (docs/reliability.md): `PROPTEST_CASES=1000000 cargo test -p rexstream --test fuzz_prompt_set`.

mod fuzz_budget;

use fuzz_budget::{config, count};
use proptest::prelude::*;
use rexstream::sinks::prompts::{parse_prompt_set, PromptTable, MAX_PROMPT_SET_BYTES};
use rexstream::sinks::SinkError;
use serde_json::{json, Value};
use std::sync::Arc;

const STREAM: &str = "cam";

/// The prompt in force before each payload: a valid one, so a change is visible.
const OLD: &[u8] = br#"{"task":"detection","categories":["old"]}"#;

/// Hand `payload` to the handler the MQTT sink runs ([`PromptTable::apply`]) with a table in place,
/// and check the outcome: accepted ⇒ a prompt `validate()` accepts, now in force, version +1;
/// rejected ⇒ the error names the stream and the table (prompt and version) is exactly as before.
/// Returns whether it was accepted.
fn check(payload: &[u8]) -> bool {
    let table = PromptTable::new([(
        STREAM.to_string(),
        parse_prompt_set(STREAM, OLD).expect("the old prompt is valid"),
    )]);
    let (before, version) = (table.get(STREAM).unwrap(), table.version());
    match table.apply(STREAM, payload) {
        Ok(p) => {
            assert!(
                p.validate().is_ok(),
                "accepted an invalid prompt: {p:?} from {}",
                String::from_utf8_lossy(payload)
            );
            assert!(payload.len() <= MAX_PROMPT_SET_BYTES);
            assert!(
                Arc::ptr_eq(&table.get(STREAM).unwrap(), &p),
                "accepted prompt is not the one in force"
            );
            assert_eq!(table.version(), version + 1);
            true
        }
        Err(SinkError::Prompt { stream, reason }) => {
            assert_eq!(stream, STREAM);
            assert!(!reason.is_empty());
            let now = table.get(STREAM).unwrap();
            assert!(
                Arc::ptr_eq(&now, &before) && table.version() == version,
                "a rejected payload changed the prompt in force to {now:?} ({reason}): {}",
                String::from_utf8_lossy(payload)
            );
            false
        }
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // NaN/inf become null in serde_json
        any::<String>().prop_map(Value::from),
        prop::sample::select(TEXTS).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(FIELDS).prop_map(str::to_string),
                    any::<String>()
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: &[&str] = &["task", "categories", "keypoint_type", "boxes", "extra"];
const TASKS: &[&str] = &[
    "detection",
    "pointing",
    "visual_prompting",
    "keypoint",
    "ocr_box",
    "ocr_polygon",
    "gui_grounding",
    "gui_pointing",
    "Detection",
    "",
    "detect",
    "<|im_end|>",
];
const TEXTS: &[&str] = &[
    "person",
    "<|im_end|>",
    "<|box_start|>",
    "<12>",
    "<999>",
    "<1000>",
    "<|image_pad|>",
    "a, b,, ,c",
    ",",
    "",
    " ",
    "\u{0}",
    "\u{202e}rtl",
    "person without a helmet",
    "animal",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![0.0, -1.0, 1.0, 1e300, -1e300, 5e-324, 1e-300, 4096.0])
            .prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(Value::from("1")),
        Just(Value::Null),
    ]
}

/// Objects shaped like a prompt, each field right, wrong-typed or hostile.
fn prompt_like() -> impl Strategy<Value = Value> {
    let task = prop_oneof![
        4 => prop::sample::select(TASKS).prop_map(Value::from),
        1 => json_value(),
    ];
    let categories = prop_oneof![
        3 => prop::collection::vec(prop::sample::select(TEXTS).prop_map(Value::from), 0..6)
            .prop_map(Value::Array),
        1 => prop::sample::select(TEXTS).prop_map(Value::from),
        1 => json_value(),
    ];
    let boxes = prop_oneof![
        3 => prop::collection::vec(prop::collection::vec(number(), 0..6).prop_map(Value::Array), 0..4)
            .prop_map(Value::Array),
        1 => json_value(),
    ];
    let keypoint = prop_oneof![
        Just(Value::from("person")),
        Just(Value::from("animal")),
        prop::sample::select(TEXTS).prop_map(Value::from),
        json_value(),
    ];
    (
        task,
        prop::option::of(categories),
        prop::option::of(boxes),
        prop::option::of(keypoint),
        prop::option::of(json_value()),
    )
        .prop_map(|(t, c, b, k, extra)| {
            let mut o = json!({ "task": t });
            if let Some(c) = c {
                o["categories"] = c;
            }
            if let Some(b) = b {
                o["boxes"] = b;
            }
            if let Some(k) = k {
                o["keypoint_type"] = k;
            }
            if let Some(x) = extra {
                o["unexpected"] = x;
            }
            o
        })
}

#[test]
fn known_payloads_are_judged_right() {
    // Anchors, so the properties below do not pass by rejecting everything.
    assert!(check(
        br#"{"task":"detection","categories":["person","<|im_end|>"]}"#
    ));
    assert!(check(br#"{"task":"detection","categories":"person, car"}"#));
    assert!(check(
        br#"{"task":"visual_prompting","boxes":[[1,2,30,40]]}"#
    ));
    assert!(!check(br#"{"task":"detection"}"#));
    assert!(!check(br#"{"task":"teleport","categories":["x"]}"#));
    assert!(!check(b"\xff\xfe{"));
    let big = format!(
        r#"{{"task":"detection","categories":["{}"]}}"#,
        "a".repeat(MAX_PROMPT_SET_BYTES)
    );
    assert!(!check(big.as_bytes()));
    // Rejections that must not touch the table: an empty category list, an unknown stream.
    assert!(!check(br#"{"task":"detection","categories":[]}"#));
    let table = PromptTable::new([(STREAM.to_string(), parse_prompt_set(STREAM, OLD).unwrap())]);
    assert!(table
        .apply("other", br#"{"task":"detection","categories":["x"]}"#)
        .is_err());
    assert_eq!(table.version(), 0);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        count("arbitrary_bytes_never_panic");
        check(&bytes);
    }

    /// Bytes around the size cap: the cap is checked before parsing, so cost stays bounded.
    #[test]
    fn payloads_around_the_cap_never_panic(extra in 0usize..64, fill in any::<u8>()) {
        count("payloads_around_the_cap_never_panic");
        let n = MAX_PROMPT_SET_BYTES - 32 + extra;
        let mut p = br#"{"task":"detection","categories":[""#.to_vec();
        p.resize(n.saturating_sub(3), fill.clamp(b'a', b'z'));
        p.extend_from_slice(br#""]}"#);
        let accepted = check(&p);
        prop_assert_eq!(accepted, p.len() <= MAX_PROMPT_SET_BYTES);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        count("arbitrary_json_never_panics");
        check(v.to_string().as_bytes());
    }

    #[test]
    fn prompt_shaped_json_never_panics(v in prompt_like()) {
        count("prompt_shaped_json_never_panics");
        check(v.to_string().as_bytes());
    }

    /// Valid JSON cut anywhere or with one byte flipped.
    #[test]
    fn mangled_prompts_never_panic(v in prompt_like(), cut in any::<prop::sample::Index>(),
                                   flip in any::<prop::sample::Index>(), byte in any::<u8>()) {
        count("mangled_prompts_never_panic");
        let s = v.to_string().into_bytes();
        check(&s[..cut.index(s.len() + 1)]);
        let mut f = s.clone();
        if !f.is_empty() {
            let i = flip.index(f.len());
            f[i] = byte;
        }
        check(&f);
    }
}
