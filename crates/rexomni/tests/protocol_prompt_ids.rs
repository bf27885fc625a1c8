//! Prompt ids equal HF's: tests/fixtures/protocol/prompt_ids.json holds the ids transformers'
//! slow Qwen2Tokenizer (what the official wrapper uses) gives for chat-templated prompts, built in
//! Python from the spec's templates (tests/reference/gen_prompt_ids.py). The tokenizer under test is
//! built from vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json), as the released
//! checkpoint ships.

use std::path::{Path, PathBuf};

use rexomni::protocol::chat::{chat_pieces, CHAT_AFTER_PROMPT};
use rexomni::protocol::task::pieces_text;
use rexomni::protocol::{ids, ProtocolError, RexTokenizer, TaskPrompt};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tokenizer() -> RexTokenizer {
    RexTokenizer::from_dir(&fixtures().join("qwen-tokenizer")).expect("test tokenizer loads")
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
    plain_texts: Vec<PlainText>,
}
#[derive(Deserialize)]
struct PlainText {
    text: String,
    ids: Vec<u32>,
}
#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: TaskPrompt,
    image: [u32; 2],
    num_image_tokens: usize,
    prompt_text: String,
    prompt_text_ids: usize,
    ids: Vec<u32>,
}

fn fixture() -> Fixture {
    let path = fixtures().join("protocol/prompt_ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str::<Fixture>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases() -> Vec<Case> {
    fixture().cases
}

#[test]
fn plain_text_ids_equal_hf_slow_tokenizer() {
    // Contractions, digits, whitespace runs, NFC, CJK, emoji, special-looking text.
    let tok = tokenizer();
    let texts = fixture().plain_texts;
    assert!(texts.len() >= 10);
    for t in &texts {
        assert_eq!(tok.encode_plain(&t.text).unwrap(), t.ids, "{:?}", t.text);
    }
}

#[test]
fn chat_prompt_ids_equal_hf_slow_tokenizer() {
    let tok = tokenizer();
    let cases = cases();
    assert!(cases.len() >= 9);
    for c in &cases {
        let [w, h] = c.image;
        assert_eq!(
            c.prompt.text(w, h).unwrap(),
            c.prompt_text,
            "{}: prompt text",
            c.name
        );
        let got = tok
            .encode_chat(&c.prompt, w, h, c.num_image_tokens)
            .unwrap();
        assert_eq!(got, c.ids, "{}: ids", c.name);
    }
}

#[test]
fn spec_prefix_and_notebook_prompt_length() {
    // rex-omni-spec.md §4.3: the 14 ids before the image and the 5 after the prompt.
    let tok = tokenizer();
    let c = cases()
        .into_iter()
        .find(|c| c.name == "notebook_cafe")
        .unwrap();
    let got = tok.encode_chat(&c.prompt, 1440, 810, 1479).unwrap();
    assert_eq!(
        got[..14],
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 151645, 198, 151644, 872, 198, 151652]
    );
    assert!(got[14..14 + 1479].iter().all(|&id| id == ids::IMAGE_PAD));
    assert_eq!(got[14 + 1479], ids::VISION_END);
    assert_eq!(got[got.len() - 5..], [151645, 198, 151644, 77091, 198]);
    // The notebook reports num_prompt_tokens = 1549 = 14 + 1479 + 1 + 50 + 5.
    assert_eq!(got.len(), 1549);
    assert_eq!(c.prompt_text_ids, 50);
    assert_eq!(tok.encode_plain(&c.prompt_text).unwrap().len(), 50);
    assert_eq!(
        c.prompt_text,
        "Detect man, woman, yellow flower, sofa, robot-shope light, blanket, microwave, laptop, cup, white chair, lamp. . Output the bounding box coordinates in [x0, y0, x1, y1] format."
    );
}

#[test]
fn user_text_never_becomes_special_or_coordinate_tokens() {
    let tok = tokenizer();
    let p = TaskPrompt::new(rexomni::protocol::Task::Detection, &["<|im_end|>", "<12>"]);
    let got = tok.encode_chat(&p, 10, 10, 1).unwrap();
    let prompt_ids = &got[16..got.len() - 5];
    assert!(
        prompt_ids.iter().all(|&id| id < ids::COORD_BASE),
        "{prompt_ids:?}"
    );
    // ... and the same text written by us (template) does become tokens.
    let t = tok
        .encode_template("<|im_end|><12><999><1000><012>")
        .unwrap();
    assert_eq!(
        t[..3],
        [ids::IM_END, ids::COORD_BASE + 12, ids::COORD_BASE + 999]
    );
    assert!(t[3..].iter().all(|&id| id < ids::COORD_BASE));
}

#[test]
fn decode_keeps_specials_and_coordinates() {
    let tok = tokenizer();
    let text = "<|object_ref_start|>yellow flower<|object_ref_end|><|box_start|><441><439><594><588>,<0><999><|box_end|>, café ∑<|im_end|>";
    let ids = tok.encode_template(text).unwrap();
    assert_eq!(tok.decode(&ids), text);
    assert_eq!(ids[0], ids::OBJECT_REF_START);
    assert!(ids.contains(&(ids::COORD_BASE + 441)));
    // Unknown ids (unused embedding rows) decode to nothing; special content is verbatim.
    assert_eq!(tok.decode(&[151700, ids::IM_END]), "<|im_end|>");
    // The chat text round-trips too.
    let p = TaskPrompt::new(rexomni::protocol::Task::Pointing, &["cup"]);
    let chat = pieces_text(&chat_pieces(p.pieces(1, 1).unwrap(), 3));
    assert!(chat.ends_with(CHAT_AFTER_PROMPT));
    assert_eq!(tok.decode(&tok.encode_chat(&p, 1, 1, 3).unwrap()), chat);
}

fn copy_tokenizer_to(dir: &Path, edit_config: impl FnOnce(&mut serde_json::Value)) {
    std::fs::create_dir_all(dir).unwrap();
    let src = fixtures().join("qwen-tokenizer");
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    edit_config(&mut cfg);
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
}

#[test]
fn bad_tokenizer_files_are_named() {
    let base = std::env::temp_dir().join(format!("rexomni-protocol-{}", std::process::id()));
    // <0> must be id 150643.
    let d = base.join("shifted");
    copy_tokenizer_to(&d, |cfg| {
        cfg["added_tokens_decoder"]["150643"]["content"] = "<1>".into();
    });
    let e = RexTokenizer::from_dir(&d).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json")
            && e.contains("added_tokens_decoder[\"150643\"].content"),
        "{e}"
    );
    // A required special token missing.
    let d = base.join("no_im_end");
    copy_tokenizer_to(&d, |cfg| {
        cfg["added_tokens_decoder"]
            .as_object_mut()
            .unwrap()
            .remove("151645");
    });
    let e = RexTokenizer::from_dir(&d).unwrap_err().to_string();
    assert!(
        e.contains("added tokens[151645]") && e.contains("<|im_end|>"),
        "{e}"
    );
    // No tokenizer at all.
    let d = base.join("empty");
    std::fs::create_dir_all(&d).unwrap();
    assert!(matches!(
        RexTokenizer::from_dir(&d),
        Err(ProtocolError::NoTokenizer { .. })
    ));
    // A config without <k> entries (plain Qwen2.5-VL) still gets the coordinate path.
    let d = base.join("plain_qwen");
    copy_tokenizer_to(&d, |cfg| {
        let m = cfg["added_tokens_decoder"].as_object_mut().unwrap();
        m.retain(|k, _| k.parse::<u32>().unwrap() >= 151643);
    });
    let tok = RexTokenizer::from_dir(&d).unwrap();
    assert_eq!(tok.encode_template("<7>").unwrap(), [ids::COORD_BASE + 7]);
    assert_eq!(tok.decode(&[ids::COORD_BASE + 7]), "<7>");
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn hf_written_tokenizer_json_gives_hf_ids() {
    // tests/fixtures/hf-tokenizer-json/tokenizer.json was written by HF's `tokenizers` (transformers'
    // Qwen2 converter) from the same vocab.json + merges.txt (tests/reference/gen_tokenizer_json.py).
    // A checkpoint that ships it next to tokenizer_config.json must give the slow tokenizer's ids:
    // the loader takes its normalizer, pre-tokenizer and model, and the specials from the config.
    let base = std::env::temp_dir().join(format!("rexomni-protocol-hfjson-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(
        fixtures().join("hf-tokenizer-json/tokenizer.json"),
        base.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        fixtures().join("qwen-tokenizer/tokenizer_config.json"),
        base.join("tokenizer_config.json"),
    )
    .unwrap();
    let from_json = RexTokenizer::from_dir(&base).unwrap();
    let fx = fixture();
    for t in &fx.plain_texts {
        assert_eq!(
            from_json.encode_plain(&t.text).unwrap(),
            t.ids,
            "{:?}",
            t.text
        );
    }
    for c in &fx.cases {
        let [w, h] = c.image;
        assert_eq!(
            from_json
                .encode_chat(&c.prompt, w, h, c.num_image_tokens)
                .unwrap(),
            c.ids,
            "{}: ids from the HF tokenizer.json",
            c.name
        );
    }
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn own_tokenizer_json_round_trips() {
    // A tokenizer.json written by `save_plain_tokenizer_json` reads back to the same ids (the HF-written
    // file is checked above; this only covers our writer).
    let tok = tokenizer();
    let base = std::env::temp_dir().join(format!("rexomni-protocol-json-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let src = fixtures().join("qwen-tokenizer");
    std::fs::copy(
        src.join("tokenizer_config.json"),
        base.join("tokenizer_config.json"),
    )
    .unwrap();
    tok.save_plain_tokenizer_json(&base.join("tokenizer.json"))
        .unwrap();
    let from_json = RexTokenizer::from_dir(&base).unwrap();
    for c in cases() {
        let [w, h] = c.image;
        assert_eq!(
            from_json.encode_chat(&c.prompt, w, h, 2).unwrap(),
            tok.encode_chat(&c.prompt, w, h, 2).unwrap()
        );
    }
    std::fs::remove_dir_all(&base).ok();
}
