//! Property tests of the protocol: the parsers never panic on arbitrary text or ids; the streamed
//! shapes equal the final result on well-formed answers; `finish()` equals the whole-text parser on
//! any id sequence; pixels → bins → pixels stays within one bin; plain text round-trips the tokenizer.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use rexomni::protocol::{
    bin_to_pixel, ids, parse_ids, parse_output, pixel_to_bin, Detection, Geometry,
    IncrementalParser, ParsedOutput, RexTokenizer, Task,
};

/// `PROPTEST_CASES` when set (long fuzz runs, docs/reliability.md), else this file's default:
/// a literal `cases:` would override the variable that `ProptestConfig::default()` reads.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn tok() -> &'static RexTokenizer {
    static TOK: OnceLock<RexTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen-tokenizer");
        RexTokenizer::from_dir(&dir).expect("test tokenizer loads")
    })
}

fn plain(s: &str) -> Vec<u32> {
    tok().encode_plain(s).expect("encode")
}

fn without_scores(mut p: ParsedOutput) -> ParsedOutput {
    p.detections.iter_mut().for_each(|d| d.score = None);
    p
}

fn check_ranges(p: &ParsedOutput, w: u32, h: u32) {
    for d in &p.detections {
        let check = |c: &[f64], n: &[f64]| {
            assert_eq!(c.len(), n.len());
            for (i, (&c, &n)) in c.iter().zip(n).enumerate() {
                let size = f64::from(if i % 2 == 0 { w } else { h });
                assert!((0.0..=1.0).contains(&n), "norm {n}");
                assert!((0.0..=size).contains(&c), "coord {c} of {size}");
            }
        };
        match &d.geometry {
            Geometry::Box { coords, norm } => check(coords, norm),
            Geometry::Point { coords, norm } => check(coords, norm),
            Geometry::Polygon { coords, norm } => {
                assert!(coords.len() >= 6 && coords.len() % 2 == 0);
                check(coords, norm)
            }
            Geometry::Keypoints {
                coords,
                norm,
                points,
            } => {
                check(coords, norm);
                for p in points {
                    assert_eq!(p.visible, p.coords.is_some());
                    if let (Some(c), Some(n)) = (p.coords, p.norm) {
                        check(&c, &n);
                    }
                }
            }
        }
        if let Some(s) = d.score {
            assert!((0.0..=1.0).contains(&s), "score {s}");
        }
    }
}

/// Pieces that make the grammar's tokens likely in random text.
fn text_atom() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<|object_ref_start|>".to_string()),
        Just("<|object_ref_end|>".to_string()),
        Just("<|box_start|>".to_string()),
        Just("<|box_end|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("None".to_string()),
        Just("```json".to_string()),
        Just("```".to_string()),
        "<[0-9]{1,5}>",
        "[,\n {}\":\\[\\]<>|]",
        "[a-z ]{1,6}",
        "\"[a-z_]{1,6}[0-9]?\": ",
        "\"bbox\": \"(<[0-9]{1,3}>){0,5}\"",
        any::<char>().prop_map(String::from),
    ]
}

fn any_task() -> impl Strategy<Value = Task> {
    proptest::sample::select(Task::ALL.to_vec())
}

/// Ids that make the grammar likely: specials, coordinates, separators, and anything at all.
fn id_atom() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => proptest::sample::select(vec![
            ids::OBJECT_REF_START, ids::OBJECT_REF_END, ids::BOX_START, ids::BOX_END, ids::IM_END,
            ids::ENDOFTEXT, ids::IM_START, ids::VISION_START,
        ]),
        4 => ids::COORD_BASE..ids::COORD_BASE + 1000,
        2 => proptest::sample::select(vec![11u32, 220, 198, 5212, 92, 1, 4913, 90, 3417, 2240, 27]),
        2 => 0u32..151_643,
        1 => 151_643u32..160_000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), ..ProptestConfig::default() })]

    #[test]
    fn text_parser_never_panics(atoms in prop::collection::vec(text_atom(), 0..80), task in any_task(),
                                w in 1u32..5000, h in 1u32..5000) {
        let text: String = atoms.concat();
        let p = parse_output(&text, task, w, h);
        check_ranges(&p, w, h);
        // Same text as ids (our encoder, specials split) parses the same through the id path.
        let ids = tok().encode_template(&text).unwrap();
        let q = parse_ids(tok(), &ids, None, task, w, h);
        if tok().decode(&ids) == text {
            prop_assert_eq!(q, p);
        }
    }

    #[test]
    fn id_parsers_never_panic_and_finish_equals_whole_text(
        ids in prop::collection::vec(id_atom(), 0..120), task in any_task(),
        lps in prop::collection::vec(-5.0f32..0.0, 120), w in 1u32..4000, h in 1u32..4000,
    ) {
        let mut parser = IncrementalParser::new(task, w, h, tok());
        let mut streamed = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            streamed.extend(parser.push(id, lps[i]));
        }
        let done = parser.finish();
        check_ranges(&done, w, h);
        let whole = parse_output(&tok().decode(&ids), task, w, h);
        prop_assert_eq!(without_scores(done.clone()), whole);
        prop_assert_eq!(done, parse_ids(tok(), &ids, Some(&lps[..ids.len()]), task, w, h));
        for d in &streamed {
            prop_assert!(d.score.is_some());
        }
    }

    #[test]
    fn pixels_to_bins_to_pixels_within_one_bin(size in 1u32..20_000, frac in 0.0f64..=1.0) {
        let x = frac * f64::from(size);
        let bin = pixel_to_bin(x, size);
        prop_assert!(bin <= 999);
        let back = bin_to_pixel(bin, size);
        let one_bin = f64::from(size) / 999.0;
        prop_assert!(back <= x + 1e-9 * f64::from(size), "{} -> {} -> {}", x, bin, back);
        prop_assert!(x - back < one_bin + 1e-9 * f64::from(size), "{} -> {} -> {}", x, bin, back);
        // And bins → pixels → bins is the identity (except float ties at the top edge).
        let b = (frac * 999.0) as u16;
        let again = pixel_to_bin(bin_to_pixel(b, size), size);
        prop_assert!(again == b || again + 1 == b, "{} -> {}", b, again);
    }

    #[test]
    fn plain_text_round_trips_and_never_yields_special_ids(s in "[ -~]{0,40}|[a-zé中ß😀 <>|_0-9]{0,20}") {
        let ids = plain(&s);
        prop_assert!(ids.iter().all(|&id| id < ids::ENDOFTEXT));
        if ids.iter().all(|&id| rexomni::protocol::coordinate_bin(id).is_none()) {
            prop_assert_eq!(tok().decode(&ids), s);
        }
    }
}

/// A well-formed standard answer: items of (phrase, shapes or None).
#[derive(Debug, Clone)]
struct Answer {
    task: Task,
    items: Vec<(String, Option<Vec<Vec<u16>>>)>,
    shape_sep: &'static str,
    item_sep: &'static str,
    end: Ending,
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    ImEnd,
    AfterBoxEnd,
    /// Cut right after the last coordinate (fixed-count tasks only).
    InsideItem,
}

fn shape_strategy(task: Task) -> BoxedStrategy<Vec<u16>> {
    match task.coords_per_shape() {
        Some(n) => prop::collection::vec(0u16..1000, n).boxed(),
        None => (3usize..7)
            .prop_flat_map(|pts| prop::collection::vec(0u16..1000, pts * 2))
            .boxed(),
    }
}

fn answer_strategy() -> impl Strategy<Value = Answer> {
    proptest::sample::select(vec![
        Task::Detection,
        Task::Pointing,
        Task::OcrPolygon,
        Task::GuiGrounding,
        Task::VisualPrompting,
    ])
    .prop_flat_map(|task| {
        let item = (
            " ?[A-Za-z][a-z0-9-]{0,7}( [a-z]{1,6})? ?",
            prop::option::weighted(0.85, prop::collection::vec(shape_strategy(task), 1..5)),
        );
        let end = if task.coords_per_shape().is_some() {
            proptest::sample::select(vec![Ending::ImEnd, Ending::AfterBoxEnd, Ending::InsideItem])
                .boxed()
        } else {
            proptest::sample::select(vec![Ending::ImEnd, Ending::AfterBoxEnd]).boxed()
        };
        (
            Just(task),
            prop::collection::vec(item, 1..6),
            proptest::sample::select(vec![",", ", "]),
            proptest::sample::select(vec![", ", "", " ", "\n"]),
            end,
        )
    })
    .prop_map(|(task, items, shape_sep, item_sep, end)| Answer {
        task,
        items,
        shape_sep,
        item_sep,
        end,
    })
}

fn answer_ids(a: &Answer) -> Vec<u32> {
    let mut out = Vec::new();
    for (i, (phrase, shapes)) in a.items.iter().enumerate() {
        if i > 0 {
            out.extend(plain(a.item_sep));
        }
        out.push(ids::OBJECT_REF_START);
        out.extend(plain(phrase));
        out.push(ids::OBJECT_REF_END);
        out.push(ids::BOX_START);
        match shapes {
            None => out.extend(plain("None")),
            Some(shapes) => {
                for (j, s) in shapes.iter().enumerate() {
                    if j > 0 {
                        out.extend(plain(a.shape_sep));
                    }
                    out.extend(s.iter().map(|&b| ids::COORD_BASE + u32::from(b)));
                }
            }
        }
        out.push(ids::BOX_END);
    }
    match a.end {
        Ending::ImEnd => {
            out.push(ids::IM_END);
            // Anything after <|im_end|> is ignored by both parsers.
            out.extend([
                ids::OBJECT_REF_START,
                1000,
                ids::OBJECT_REF_END,
                ids::BOX_START,
                ids::COORD_BASE,
            ]);
        }
        Ending::AfterBoxEnd => {}
        Ending::InsideItem => {
            if a.items.last().is_some_and(|(_, s)| s.is_some()) {
                out.pop();
            }
        }
    }
    out
}

fn stream(task: Task, ids: &[u32], w: u32, h: u32) -> (Vec<Detection>, ParsedOutput) {
    let mut parser = IncrementalParser::new(task, w, h, tok());
    let mut streamed = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let lp = -((i * 7919 % 97) as f32) / 50.0;
        streamed.extend(parser.push(id, lp));
    }
    (streamed, parser.finish())
}

/// A well-formed keypoint answer as text.
/// (category, bbox bins, per keypoint: point bins or unvisible).
type KeypointInstance = (String, [u16; 4], Vec<Option<[u16; 2]>>);

fn keypoint_text(instances: &[KeypointInstance], fenced: bool) -> String {
    let names = rexomni::protocol::keypoint_names("person").unwrap();
    let body: Vec<String> = instances
        .iter()
        .enumerate()
        .map(|(i, (cat, b, pts))| {
            let kps: Vec<String> = pts
                .iter()
                .zip(names.iter())
                .map(|(p, n)| match p {
                    Some([x, y]) => format!("\"{n}\": \"<{x}><{y}>\""),
                    None => format!("\"{n}\": \"unvisible\""),
                })
                .collect();
            format!(
                "\"{cat}{}\": {{\"bbox\": \"<{}><{}><{}><{}>\", \"keypoints\": {{{}}}}}",
                i + 1,
                b[0],
                b[1],
                b[2],
                b[3],
                kps.join(", ")
            )
        })
        .collect();
    let json = format!("{{{}}}", body.join(", "));
    if fenced {
        format!("```json\n{json}\n```<|im_end|>")
    } else {
        format!("{json}<|im_end|>")
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(200), ..ProptestConfig::default() })]

    #[test]
    fn streamed_shapes_equal_finish_on_well_formed_answers(a in answer_strategy(), w in 1u32..4000, h in 1u32..4000) {
        let ids = answer_ids(&a);
        let (streamed, done) = stream(a.task, &ids, w, h);
        let n: usize = a.items.iter().map(|(_, s)| s.as_ref().map_or(0, Vec::len)).sum();
        prop_assert_eq!(done.detections.len(), n);
        prop_assert_eq!(&streamed, &done.detections);
        prop_assert_eq!(done.truncated, !matches!(a.end, Ending::ImEnd));
        prop_assert_eq!(without_scores(done), parse_output(&tok().decode(&ids), a.task, w, h));
    }

    #[test]
    fn streamed_keypoints_equal_finish(
        inst in prop::collection::vec(
            ("person|cat|dog_x", prop::array::uniform4(0u16..1000),
             prop::collection::vec(prop::option::of(prop::array::uniform2(0u16..1000)), 17)),
            0..4),
        fenced in any::<bool>(), w in 1u32..4000, h in 1u32..4000,
    ) {
        let text = keypoint_text(&inst, fenced);
        let ids = tok().encode_template(&text).unwrap();
        prop_assert_eq!(tok().decode(&ids), text.clone());
        let (streamed, done) = stream(Task::Keypoint, &ids, w, h);
        prop_assert_eq!(done.detections.len(), inst.len());
        prop_assert_eq!(&streamed, &done.detections);
        prop_assert_eq!(without_scores(done.clone()), parse_output(&text, Task::Keypoint, w, h));
        for (d, (cat, b, pts)) in done.detections.iter().zip(&inst) {
            prop_assert_eq!(&d.label, cat);
            match &d.geometry {
                Geometry::Keypoints { coords, points, .. } => {
                    prop_assert_eq!(coords[2], bin_to_pixel(b[2], w));
                    prop_assert_eq!(points.len(), 17);
                    for (p, want) in points.iter().zip(pts) {
                        prop_assert_eq!(p.visible, want.is_some());
                    }
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}

#[test]
fn detection_serializes_as_design_document_entry() {
    let p = parse_output(
        "<|object_ref_start|>cup<|object_ref_end|><|box_start|><0><999><999><0>,<499><499>,<0><0><999><0><999><999><|box_end|><|im_end|>",
        Task::Detection,
        1000,
        500,
    );
    let v = serde_json::to_value(&p.detections).unwrap();
    assert_eq!(
        v,
        serde_json::json!([
            {"label": "cup", "geometry": {"type": "box", "coords": [0.0, 500.0, 1000.0, 0.0], "norm": [0.0, 1.0, 1.0, 0.0]}, "score": null},
            {"label": "cup", "geometry": {"type": "point", "coords": [499.0 / 999.0 * 1000.0, 499.0 / 999.0 * 500.0], "norm": [499.0 / 999.0, 499.0 / 999.0]}, "score": null},
            {"label": "cup", "geometry": {"type": "polygon", "coords": [0.0, 0.0, 1000.0, 0.0, 1000.0, 500.0], "norm": [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]}, "score": null},
        ])
    );
    let k = parse_output(
        "{\"person1\": {\"bbox\": \"<0><0><999><999>\", \"keypoints\": {\"nose\": \"<999><0>\", \"left eye\": \"unvisible\"}}}",
        Task::Keypoint,
        100,
        100,
    );
    assert!(k.truncated);
    assert_eq!(
        serde_json::to_value(&k.detections[0]).unwrap(),
        serde_json::json!({"label": "person", "geometry": {"type": "keypoints", "coords": [0.0, 0.0, 100.0, 100.0], "norm": [0.0, 0.0, 1.0, 1.0],
            "points": [{"name": "nose", "visible": true, "coords": [100.0, 0.0], "norm": [1.0, 0.0]}, {"name": "left eye", "visible": false}]},
            "score": null})
    );
    // And back.
    let back: Vec<Detection> = serde_json::from_value(v).unwrap();
    assert_eq!(back, p.detections);
}
