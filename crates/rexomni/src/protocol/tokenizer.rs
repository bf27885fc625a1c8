//! `RexTokenizer`: Qwen2 byte-level BPE plus Rex-Omni's coordinate tokens (rex-omni-spec.md §4.2).
//!
//! In: a checkpoint folder: `tokenizer.json` when present, otherwise `vocab.json`, `merges.txt` and
//! `tokenizer_config.json` (the released Rex-Omni checkpoint ships no tokenizer.json). Out: prompt
//! ids and decoded text. Loaded once per model; encode/decode take `&self` and run on whichever
//! thread builds prompts (the detector worker) or parses output.
//!
//! Why not just `tokenizers::Tokenizer` with added tokens: the `<k>` strings live at ids
//! 150643+k, inside the BPE range, and the tokenizers crate gives added tokens NEW ids (≥151665,
//! outside the embedding). So the `tokenizers` crate only does the plain-text part (NFC, the Qwen2
//! split regex, byte-level, BPE) and this module does what the slow HF tokenizer's added-token split
//! does: text WE generate is split on special and `<k>` strings, which become their ids; user text is
//! never split (design.md: a category named `<|im_end|>` or `<12>` stays text).

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{Model, SplitDelimiterBehavior, Tokenizer};

use super::chat::{chat_pieces, ids};
use super::error::ProtocolError;
use super::task::{TaskPrompt, TextPiece};

/// Number of coordinate bins / `<k>` tokens.
pub const NUM_BINS: u32 = 1000;

/// The Qwen2 pre-tokenizer split (Qwen2Tokenizer's `PRETOKENIZE_REGEX`, same in tokenizer.json).
const QWEN2_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Fast id → coordinate bin: `Some(k)` for id 150643+k, k = 0..=999.
#[inline]
pub fn coordinate_bin(id: u32) -> Option<u16> {
    let k = id.checked_sub(ids::COORD_BASE)?;
    // k < 1000 fits in u16.
    (k < NUM_BINS).then_some(k as u16)
}

/// Bin → id of its `<k>` token; `None` for bins > 999.
#[inline]
pub fn coordinate_id(bin: u16) -> Option<u32> {
    (u32::from(bin) < NUM_BINS).then_some(ids::COORD_BASE + u32::from(bin))
}

/// If `s` starts with a coordinate token `<k>` (k written as the slow tokenizer's added tokens are:
/// `<0>`..`<999>`, no leading zeros), its bin and byte length.
pub(crate) fn coordinate_prefix(s: &[u8]) -> Option<(u16, usize)> {
    if s.first() != Some(&b'<') {
        return None;
    }
    let digits = s[1..]
        .iter()
        .take(4)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 3 || s.get(1 + digits) != Some(&b'>') || (digits > 1 && s[1] == b'0')
    {
        return None;
    }
    let k = s[1..1 + digits]
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    Some((k, digits + 2))
}

/// What one id is, for the parsers and the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind<'a> {
    /// `<k>`.
    Coordinate(u16),
    /// An added token (`<|im_end|>`, `<|box_start|>`, ...), with its content.
    Special(&'a str),
    /// A BPE token: its raw bytes (byte-level decoded; may be part of a UTF-8 character).
    Bytes(&'a [u8]),
    /// An id the tokenizer does not know (e.g. the unused embedding rows 151665..151935).
    Unknown,
}

/// What tokenizer.json gives: the plain-text tokenizer, its vocabulary and its added tokens.
type TokenizerJsonParts = (Tokenizer, HashMap<String, u32>, Vec<(u32, String)>);

/// The Rex-Omni tokenizer. See the module doc for why it is not a plain `tokenizers::Tokenizer`.
pub struct RexTokenizer {
    /// NFC + Qwen2 split + byte-level + BPE, WITHOUT added tokens: plain text only.
    bpe: Tokenizer,
    /// id → raw bytes for BPE ids (`None` where the vocabulary has no such id).
    token_bytes: Vec<Option<Box<[u8]>>>,
    /// Added tokens other than `<k>`: id → content.
    special_by_id: HashMap<u32, String>,
    /// Added tokens other than `<k>`, longest first, for splitting template text.
    specials_longest_first: Vec<(String, u32)>,
}

impl std::fmt::Debug for RexTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RexTokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("specials", &self.special_by_id.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProtocolError + '_ {
    move |source| ProtocolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn file_err(path: &Path, field: impl Into<String>, message: impl Into<String>) -> ProtocolError {
    ProtocolError::TokenizerFile {
        path: path.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value, ProtocolError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text)
        .map_err(|e| file_err(path, "(file)", format!("not valid JSON: {e}")))
}

/// GPT-2 byte-level alphabet: printable bytes stand for themselves, the others are shifted to
/// U+0100.. in byte order. Returns char → byte.
fn byte_level_decoder() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            shifted += 1;
            // 256 + n is always a valid scalar value.
            char::from_u32(255 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, b);
    }
    map
}

impl RexTokenizer {
    /// Loads the tokenizer of a checkpoint folder. Errors name the file and field at fault.
    pub fn from_dir(dir: &Path) -> Result<Self, ProtocolError> {
        let tokenizer_json = dir.join("tokenizer.json");
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };

        let (bpe, vocab, json_added) = if tokenizer_json.is_file() {
            Self::load_tokenizer_json(&tokenizer_json)?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            if !vocab_path.is_file() || !merges_path.is_file() {
                return Err(ProtocolError::NoTokenizer {
                    dir: dir.to_path_buf(),
                });
            }
            if config.is_none() {
                return Err(ProtocolError::Io {
                    path: config_path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "needed for the special tokens when there is no tokenizer.json",
                    ),
                });
            }
            let (bpe, vocab) = Self::build_bpe(&vocab_path, &merges_path)?;
            (bpe, vocab, Vec::new())
        };

        // Special tokens by id: tokenizer_config.json's added_tokens_decoder when present (that is
        // where Rex-Omni declares them), else tokenizer.json's added_tokens.
        let mut added: Vec<(u32, String)> = match &config {
            Some(cfg) => Self::config_added_tokens(&config_path, cfg)?,
            None => json_added,
        };
        if let Some(cfg) = &config {
            Self::check_coordinate_entries(&config_path, cfg)?;
        }
        let source = if config.is_some() {
            config_path.clone()
        } else {
            tokenizer_json.clone()
        };
        // `<k>` entries are handled by the coordinate path, never as specials.
        added.retain(|(id, content)| {
            coordinate_bin(*id).is_none() && coordinate_prefix(content.as_bytes()).is_none()
        });
        let special_by_id: HashMap<u32, String> = added.iter().cloned().collect();
        for (id, content) in ids::REQUIRED {
            match special_by_id.get(&id) {
                Some(c) if c == content => {}
                Some(c) => {
                    return Err(file_err(
                        &source,
                        format!("added tokens[{id}]"),
                        format!("expected {content:?}, found {c:?}"),
                    ))
                }
                None => {
                    return Err(file_err(
                        &source,
                        format!("added tokens[{id}]"),
                        format!("missing (expected {content:?}, rex-omni-spec.md §4.1)"),
                    ))
                }
            }
        }
        let mut specials_longest_first: Vec<(String, u32)> = added
            .into_iter()
            .map(|(id, c)| (c, id))
            .filter(|(c, _)| !c.is_empty())
            .collect();
        specials_longest_first.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let alphabet = byte_level_decoder();
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        let mut token_bytes: Vec<Option<Box<[u8]>>> = vec![None; max_id + 1];
        for (token, id) in vocab {
            let bytes: Vec<u8> = token
                .chars()
                .flat_map(|c| match alphabet.get(&c) {
                    Some(b) => vec![*b],
                    // Not byte-level: keep the character's own UTF-8 bytes.
                    None => c.to_string().into_bytes(),
                })
                .collect();
            token_bytes[id as usize] = Some(bytes.into_boxed_slice());
        }

        Ok(RexTokenizer {
            bpe,
            token_bytes,
            special_by_id,
            specials_longest_first,
        })
    }

    /// vocab.json + merges.txt → the Qwen2 plain-text tokenizer, built programmatically (the same
    /// normalizer, pre-tokenizer and model a Qwen2 tokenizer.json declares).
    fn build_bpe(
        vocab_path: &Path,
        merges_path: &Path,
    ) -> Result<(Tokenizer, HashMap<String, u32>), ProtocolError> {
        let vocab_text = std::fs::read_to_string(vocab_path).map_err(io_err(vocab_path))?;
        let vocab: HashMap<String, u32> = serde_json::from_str(&vocab_text).map_err(|e| {
            file_err(
                vocab_path,
                "(file)",
                format!("not a JSON object of token → id: {e}"),
            )
        })?;
        let merges_text = std::fs::read_to_string(merges_path).map_err(io_err(merges_path))?;
        let mut merges = Vec::new();
        for (n, line) in merges_text.lines().enumerate() {
            if line.starts_with("#version") || line.is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(file_err(
                        merges_path,
                        format!("line {}", n + 1),
                        format!("{line:?} is not \"a b\""),
                    ))
                }
            }
        }
        let bpe_vocab: Vocab = vocab.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let model = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .build()
            .map_err(|e| file_err(merges_path, "(merges)", format!("BPE model rejected: {e}")))?;
        let mut tok = Tokenizer::new(model);
        tok.with_normalizer(Some(NFC))
            .map_err(|e| ProtocolError::Encode(format!("NFC normalizer: {e}")))?;
        let split = Split::new(
            SplitPattern::Regex(QWEN2_SPLIT_REGEX.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| ProtocolError::Encode(format!("Qwen2 split regex: {e}")))?;
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        Ok((tok, vocab))
    }

    /// tokenizer.json → the plain-text part (its normalizer, pre-tokenizer and model, NOT its added
    /// tokens, which would split user text) and its added tokens.
    fn load_tokenizer_json(path: &Path) -> Result<TokenizerJsonParts, ProtocolError> {
        let full =
            Tokenizer::from_file(path).map_err(|e| file_err(path, "(file)", e.to_string()))?;
        let mut tok = Tokenizer::new(full.get_model().clone());
        tok.with_normalizer(full.get_normalizer().cloned())
            .map_err(|e| file_err(path, "normalizer", e.to_string()))?;
        tok.with_pre_tokenizer(full.get_pre_tokenizer().cloned());
        let vocab = full.get_model().get_vocab();
        let added = full
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        Ok((tok, vocab, added))
    }

    fn config_added_tokens(
        path: &Path,
        cfg: &serde_json::Value,
    ) -> Result<Vec<(u32, String)>, ProtocolError> {
        let Some(map) = cfg.get("added_tokens_decoder").and_then(|v| v.as_object()) else {
            return Err(file_err(
                path,
                "added_tokens_decoder",
                "missing or not an object",
            ));
        };
        let mut out = Vec::with_capacity(map.len());
        for (key, entry) in map {
            let id: u32 = key.parse().map_err(|_| {
                file_err(
                    path,
                    format!("added_tokens_decoder[{key:?}]"),
                    "key is not a token id",
                )
            })?;
            let content = entry
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| {
                    file_err(
                        path,
                        format!("added_tokens_decoder[\"{id}\"].content"),
                        "missing or not a string",
                    )
                })?;
            out.push((id, content.to_string()));
        }
        Ok(out)
    }

    /// rex-omni-spec.md §4.2: where the config declares `<k>` entries they must sit at 150643+k.
    fn check_coordinate_entries(path: &Path, cfg: &serde_json::Value) -> Result<(), ProtocolError> {
        let Some(map) = cfg.get("added_tokens_decoder").and_then(|v| v.as_object()) else {
            return Ok(());
        };
        for (key, entry) in map {
            let content = entry.get("content").and_then(|c| c.as_str()).unwrap_or("");
            let id: Option<u32> = key.parse().ok();
            let bin_by_id = id.and_then(coordinate_bin);
            let bin_by_content = coordinate_prefix(content.as_bytes())
                .filter(|(_, len)| *len == content.len())
                .map(|(k, _)| k);
            let consistent = match (bin_by_id, bin_by_content) {
                (Some(a), Some(b)) => a == b,
                (None, None) => true,
                _ => false,
            };
            if !consistent {
                let expected = match bin_by_id {
                    Some(k) => format!(
                        "<{k}> (id 150643+k is coordinate token <k>, rex-omni-spec.md §4.2)"
                    ),
                    None => "a coordinate token only at ids 150643..151642 (rex-omni-spec.md §4.2)"
                        .to_string(),
                };
                return Err(file_err(
                    path,
                    format!("added_tokens_decoder[{key:?}].content"),
                    format!("{content:?}: expected {expected}"),
                ));
            }
        }
        Ok(())
    }

    /// Plain text → BPE ids. Nothing in `text` is treated as a special or coordinate token: this is
    /// the path for user text (categories, phrases).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, ProtocolError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .bpe
            .encode(text, false)
            .map_err(|e| ProtocolError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text WE generated → ids, with added-token and `<k>` strings mapped to their ids (what the slow
    /// HF tokenizer's added-token split does).
    pub fn encode_template(&self, text: &str) -> Result<Vec<u32>, ProtocolError> {
        self.encode_pieces(&[TextPiece::Template(text.to_string())])
    }

    /// Pieces → ids. Template pieces are split on special and `<k>` strings; user pieces are not. The
    /// plain text between two split tokens is BPE-encoded as one run even when it spans template and
    /// user pieces, as the HF tokenizer would see the same text.
    pub fn encode_pieces(&self, pieces: &[TextPiece]) -> Result<Vec<u32>, ProtocolError> {
        let mut out = Vec::new();
        let mut run = String::new();
        for piece in pieces {
            match piece {
                TextPiece::User(s) => run.push_str(s),
                TextPiece::Template(s) => {
                    let mut rest = s.as_str();
                    while let Some((start, len, id)) = self.find_split_token(rest) {
                        run.push_str(&rest[..start]);
                        out.extend(self.encode_plain(&run)?);
                        run.clear();
                        out.push(id);
                        rest = &rest[start + len..];
                    }
                    run.push_str(rest);
                }
            }
        }
        out.extend(self.encode_plain(&run)?);
        Ok(out)
    }

    /// Leftmost special or `<k>` token in `s`: (byte offset, byte length, id).
    fn find_split_token(&self, s: &str) -> Option<(usize, usize, u32)> {
        let bytes = s.as_bytes();
        for (i, _) in s.match_indices('<') {
            let tail = &bytes[i..];
            if let Some((k, len)) = coordinate_prefix(tail) {
                return Some((i, len, ids::COORD_BASE + u32::from(k)));
            }
            if let Some((content, id)) = self
                .specials_longest_first
                .iter()
                .find(|(c, _)| tail.starts_with(c.as_bytes()))
            {
                return Some((i, content.len(), *id));
            }
        }
        None
    }

    /// Full chat-templated prompt ids (rex-omni-spec.md §4.3) with `num_image_tokens` copies of
    /// `<|image_pad|>` 151655. `image_w`/`image_h`: the ORIGINAL frame size (visual-prompt bins).
    pub fn encode_chat(
        &self,
        prompt: &TaskPrompt,
        image_w: u32,
        image_h: u32,
        num_image_tokens: usize,
    ) -> Result<Vec<u32>, ProtocolError> {
        let pieces = prompt.pieces(image_w, image_h)?;
        // Encode with one placeholder, then widen it: same ids, without scanning thousands of copies.
        let mut ids = self.encode_pieces(&chat_pieces(pieces, 1))?;
        if let Some(pos) = ids.iter().position(|&id| id == ids::IMAGE_PAD) {
            ids.splice(
                pos..=pos,
                std::iter::repeat_n(ids::IMAGE_PAD, num_image_tokens),
            );
        }
        Ok(ids)
    }

    /// What an id is. Coordinate ids win over the BPE strings they replaced (rex-omni-spec.md §4.2).
    pub fn kind(&self, id: u32) -> TokenKind<'_> {
        if let Some(k) = coordinate_bin(id) {
            return TokenKind::Coordinate(k);
        }
        if let Some(s) = self.special_by_id.get(&id) {
            return TokenKind::Special(s);
        }
        match self.token_bytes.get(id as usize) {
            Some(Some(b)) => TokenKind::Bytes(b),
            _ => TokenKind::Unknown,
        }
    }

    /// Ids → text, special tokens kept, `<k>` for 150643+k, no spaces added between special tokens
    /// (HF `spaces_between_special_tokens=False`). Invalid UTF-8 in BPE runs becomes U+FFFD
    /// (`errors="replace"`); unknown ids decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_with_offsets(ids).0
    }

    /// `decode`, plus where each id's text starts (byte offsets, one per id, and the text length
    /// last). Exact for special and coordinate ids; inside a BPE run that holds invalid UTF-8 the
    /// offsets of the run's inner tokens are approximate (clamped into the run).
    pub fn decode_with_offsets(&self, ids: &[u32]) -> (String, Vec<usize>) {
        let mut out = String::new();
        let mut starts = Vec::with_capacity(ids.len() + 1);
        // The pending BPE run: its bytes and, per token, the byte offset inside the run.
        let mut run: Vec<u8> = Vec::new();
        let mut run_starts: Vec<usize> = Vec::new();
        let flush = |out: &mut String,
                     starts: &mut Vec<usize>,
                     run: &mut Vec<u8>,
                     run_starts: &mut Vec<usize>| {
            let base = out.len();
            out.push_str(&String::from_utf8_lossy(run));
            let end = out.len();
            starts.extend(run_starts.iter().map(|&o| (base + o).min(end)));
            run.clear();
            run_starts.clear();
        };
        for &id in ids {
            match self.kind(id) {
                TokenKind::Bytes(b) => {
                    run_starts.push(run.len());
                    run.extend_from_slice(b);
                }
                TokenKind::Unknown => run_starts.push(run.len()),
                other => {
                    flush(&mut out, &mut starts, &mut run, &mut run_starts);
                    starts.push(out.len());
                    match other {
                        TokenKind::Coordinate(k) => {
                            out.push('<');
                            out.push_str(&k.to_string());
                            out.push('>');
                        }
                        TokenKind::Special(s) => out.push_str(s),
                        TokenKind::Bytes(_) | TokenKind::Unknown => {}
                    }
                }
            }
        }
        flush(&mut out, &mut starts, &mut run, &mut run_starts);
        starts.push(out.len());
        (out, starts)
    }

    /// Writes the plain-text part (normalizer, pre-tokenizer, BPE model; no added tokens) as a
    /// tokenizer.json, e.g. to give a checkpoint folder the fast-loading file. `from_dir` on a folder
    /// with it and the same tokenizer_config.json gives the same ids.
    pub fn save_plain_tokenizer_json(&self, path: &Path) -> Result<(), ProtocolError> {
        self.bpe.save(path, false).map_err(|e| ProtocolError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// The id of an added token by content (e.g. `"<|im_end|>"`).
    pub fn special_id(&self, content: &str) -> Option<u32> {
        self.specials_longest_first
            .iter()
            .find(|(c, _)| c == content)
            .map(|(_, id)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinate_ids() {
        assert_eq!(coordinate_bin(150643), Some(0));
        assert_eq!(coordinate_bin(151642), Some(999));
        assert_eq!(coordinate_bin(150642), None);
        assert_eq!(coordinate_bin(151643), None);
        assert_eq!(coordinate_id(999), Some(151642));
        assert_eq!(coordinate_id(1000), None);
        assert_eq!(coordinate_prefix(b"<12>x"), Some((12, 4)));
        assert_eq!(coordinate_prefix(b"<0>"), Some((0, 3)));
        assert_eq!(coordinate_prefix(b"<012>"), None);
        assert_eq!(coordinate_prefix(b"<1000>"), None);
        assert_eq!(coordinate_prefix(b"<>"), None);
    }

    #[test]
    fn byte_level_alphabet() {
        let m = byte_level_decoder();
        assert_eq!(m.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }
}
