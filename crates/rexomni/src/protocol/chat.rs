//! Chat template (rex-omni-spec.md §4.3) and the token ids it relies on (§4.1).
//!
//! In: a `TaskPrompt`'s pieces. Out: the full prompt as pieces, laid out exactly as the official
//! wrapper renders the Qwen2.5-VL template: system "You are a helpful assistant" (no period), the
//! image placeholder, NO newline after `<|vision_end|>`, then the generation prompt.

use super::task::TextPiece;

/// Special token ids of Qwen2.5 (rex-omni-spec.md §4.1). `RexTokenizer::from_dir` checks that the
/// checkpoint's tokenizer_config.json agrees, so the parsers can match on these ids.
pub mod ids {
    pub const ENDOFTEXT: u32 = 151643;
    pub const IM_START: u32 = 151644;
    pub const IM_END: u32 = 151645;
    pub const OBJECT_REF_START: u32 = 151646;
    pub const OBJECT_REF_END: u32 = 151647;
    pub const BOX_START: u32 = 151648;
    pub const BOX_END: u32 = 151649;
    pub const VISION_START: u32 = 151652;
    pub const VISION_END: u32 = 151653;
    pub const IMAGE_PAD: u32 = 151655;
    /// `<k>` is id `COORD_BASE + k`, k = 0..=999: Rex-Omni repurposes the last 1000 BPE ids
    /// (rex-omni-spec.md §4.2).
    pub const COORD_BASE: u32 = 150643;

    /// (id, content) pairs the protocol depends on.
    pub const REQUIRED: [(u32, &str); 11] = [
        (ENDOFTEXT, "<|endoftext|>"),
        (IM_START, "<|im_start|>"),
        (IM_END, "<|im_end|>"),
        (OBJECT_REF_START, "<|object_ref_start|>"),
        (OBJECT_REF_END, "<|object_ref_end|>"),
        (BOX_START, "<|box_start|>"),
        (BOX_END, "<|box_end|>"),
        (VISION_START, "<|vision_start|>"),
        (VISION_END, "<|vision_end|>"),
        (151654, "<|vision_pad|>"),
        (IMAGE_PAD, "<|image_pad|>"),
    ];
}

/// The system message of the inference code (training used a trailing period; inference does not).
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant";

/// Everything before the image placeholder.
pub const CHAT_BEFORE_IMAGE: &str =
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<|vision_start|>";
/// The image placeholder, repeated `grid_t*gh*gw/4` times by the processor.
pub const IMAGE_PLACEHOLDER: &str = "<|image_pad|>";
/// Between the image and the task prompt: no newline (inference layout, rex-omni-spec.md §4.3).
pub const CHAT_AFTER_IMAGE: &str = "<|vision_end|>";
/// After the task prompt: end of the user turn and the generation prompt.
pub const CHAT_AFTER_PROMPT: &str = "<|im_end|>\n<|im_start|>assistant\n";

/// The whole chat as pieces, with `num_image_tokens` image placeholders.
pub fn chat_pieces(prompt: Vec<TextPiece>, num_image_tokens: usize) -> Vec<TextPiece> {
    let mut out = Vec::with_capacity(prompt.len() + 3);
    out.push(TextPiece::Template(format!(
        "{CHAT_BEFORE_IMAGE}{}{CHAT_AFTER_IMAGE}",
        IMAGE_PLACEHOLDER.repeat(num_image_tokens)
    )));
    out.extend(prompt);
    out.push(TextPiece::Template(CHAT_AFTER_PROMPT.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::super::task::{pieces_text, Task, TaskPrompt};
    use super::*;

    #[test]
    fn layout_matches_spec() {
        let p = TaskPrompt::new(Task::Pointing, &["cup"])
            .pieces(10, 10)
            .unwrap();
        assert_eq!(
            pieces_text(&chat_pieces(p, 1)),
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Point to cup.<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
