//! The 8 Rex-Omni tasks and their prompt templates (rex-omni-spec.md §5.1, §5.2).
//!
//! In: a `TaskPrompt` (from pipeline config or an MQTT `prompt/set` payload) and the ORIGINAL frame
//! size. Out: the prompt text as `TextPiece`s, where the pieces we wrote are kept apart from the
//! pieces the user wrote, so the tokenizer can treat only ours as able to hold special and
//! coordinate tokens (design.md "User text ... is never parsed for special tokens"). Pure data, any
//! thread.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::bins::box_to_bins;
use super::error::ProtocolError;

/// A Rex-Omni task (`TaskType` values of the official `rex_omni/tasks.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Detection,
    Pointing,
    VisualPrompting,
    Keypoint,
    OcrBox,
    OcrPolygon,
    GuiGrounding,
    GuiPointing,
}

impl Task {
    /// All tasks, in the order of rex-omni-spec.md §5.1.
    pub const ALL: [Task; 8] = [
        Task::Detection,
        Task::Pointing,
        Task::VisualPrompting,
        Task::Keypoint,
        Task::OcrBox,
        Task::OcrPolygon,
        Task::GuiGrounding,
        Task::GuiPointing,
    ];

    /// The snake_case name used on the wire and in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Detection => "detection",
            Task::Pointing => "pointing",
            Task::VisualPrompting => "visual_prompting",
            Task::Keypoint => "keypoint",
            Task::OcrBox => "ocr_box",
            Task::OcrPolygon => "ocr_polygon",
            Task::GuiGrounding => "gui_grounding",
            Task::GuiPointing => "gui_pointing",
        }
    }

    /// How many coordinate tokens one answer shape has, when the task fixes it: 4 for box tasks,
    /// 2 for point tasks, `None` for polygons (any even count ≥ 6) and keypoint JSON.
    pub fn coords_per_shape(self) -> Option<usize> {
        match self {
            Task::Detection | Task::VisualPrompting | Task::OcrBox | Task::GuiGrounding => Some(4),
            Task::Pointing | Task::GuiPointing => Some(2),
            Task::OcrPolygon | Task::Keypoint => None,
        }
    }

    /// GUI tasks take one free-text element description: a comma in it is not a separator.
    fn single_phrase(self) -> bool {
        matches!(self, Task::GuiGrounding | Task::GuiPointing)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Keypoint name lists, `KEYPOINT_CONFIGS` of the official code (rex-omni-spec.md §5.2).
pub const KEYPOINT_TYPES: [(&str, [&str; 17]); 2] = [
    (
        "person",
        [
            "nose",
            "left eye",
            "right eye",
            "left ear",
            "right ear",
            "left shoulder",
            "right shoulder",
            "left elbow",
            "right elbow",
            "left wrist",
            "right wrist",
            "left hip",
            "right hip",
            "left knee",
            "right knee",
            "left ankle",
            "right ankle",
        ],
    ),
    (
        "animal",
        [
            "left eye",
            "right eye",
            "nose",
            "neck",
            "root of tail",
            "left shoulder",
            "left elbow",
            "left front paw",
            "right shoulder",
            "right elbow",
            "right front paw",
            "left hip",
            "left knee",
            "left back paw",
            "right hip",
            "right knee",
            "right back paw",
        ],
    ),
];

/// The keypoint names of a type, or `None` if the type is unknown.
pub fn keypoint_names(keypoint_type: &str) -> Option<&'static [&'static str; 17]> {
    KEYPOINT_TYPES
        .iter()
        .find(|(name, _)| *name == keypoint_type)
        .map(|(_, names)| names)
}

fn known_keypoint_types() -> String {
    KEYPOINT_TYPES
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What to ask the model about one frame. Also the runtime prompt-set payload (design.md
/// `<prefix>/<stream>/prompt/set`), e.g. `{"task":"detection","categories":["person","car"]}`;
/// `categories` may also be one comma-separated string (`"person, car"`), split on commas except
/// for the GUI tasks, whose single element description may contain commas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "RawTaskPrompt")]
pub struct TaskPrompt {
    /// Which of the 8 tasks.
    pub task: Task,
    /// Categories or phrases (for OCR: what to read, e.g. "word", "text line"; for GUI tasks: the
    /// element description). User text: never parsed for special tokens.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
    /// keypoint task only: "person" or "animal" (rex-omni-spec.md §5.2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keypoint_type: Option<String>,
    /// visual_prompting only: reference boxes [x0, y0, x1, y1] in pixels of the ORIGINAL frame.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<[f64; 4]>,
}

/// Categories as the wire allows them: a list or one comma-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawCategories {
    List(Vec<String>),
    Joined(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskPrompt {
    task: Task,
    #[serde(default)]
    categories: Option<RawCategories>,
    #[serde(default)]
    keypoint_type: Option<String>,
    #[serde(default)]
    boxes: Vec<[f64; 4]>,
}

impl From<RawTaskPrompt> for TaskPrompt {
    fn from(raw: RawTaskPrompt) -> Self {
        let categories = match raw.categories {
            None => Vec::new(),
            Some(RawCategories::List(list)) => list,
            Some(RawCategories::Joined(s)) if raw.task.single_phrase() => vec![s],
            Some(RawCategories::Joined(s)) => s
                .split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
        };
        TaskPrompt {
            task: raw.task,
            categories,
            keypoint_type: raw.keypoint_type,
            boxes: raw.boxes,
        }
    }
}

/// One piece of prompt text. `Template` text is ours (template words, the visual-prompt box
/// string) and may contain special and `<k>` coordinate tokens; `User` text is tokenized as plain
/// BPE text whatever it contains (a category named `<|im_end|>` or `<12>` stays text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextPiece {
    Template(String),
    User(String),
}

impl TextPiece {
    /// The text of the piece.
    pub fn as_str(&self) -> &str {
        match self {
            TextPiece::Template(s) | TextPiece::User(s) => s,
        }
    }
}

/// The pieces joined into the text the model reads.
pub fn pieces_text(pieces: &[TextPiece]) -> String {
    pieces.iter().map(TextPiece::as_str).collect()
}

impl TaskPrompt {
    /// A prompt for `task` with `categories` and no other input.
    pub fn new(task: Task, categories: &[&str]) -> Self {
        TaskPrompt {
            task,
            categories: categories.iter().map(|c| c.to_string()).collect(),
            keypoint_type: None,
            boxes: Vec::new(),
        }
    }

    /// Checks the inputs the task needs, before anything runs. The errors name the field and value.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let task = self.task;
        if task == Task::VisualPrompting {
            // The visual_prompting template has no {categories}: they would be ignored, but they are
            // harmless (a config may keep a label list around), so they are allowed.
            if self.boxes.is_empty() {
                return Err(ProtocolError::MissingBoxes);
            }
            for (index, b) in self.boxes.iter().enumerate() {
                check_box(index, b)?;
            }
        } else {
            if self.categories.is_empty() {
                return Err(ProtocolError::MissingCategories { task });
            }
            if !self.boxes.is_empty() {
                return Err(ProtocolError::UnusedField {
                    task,
                    field: "boxes",
                });
            }
        }
        for (index, c) in self.categories.iter().enumerate() {
            if c.trim().is_empty() {
                return Err(ProtocolError::EmptyCategory {
                    task,
                    index,
                    value: c.clone(),
                });
            }
        }
        match (task, &self.keypoint_type) {
            (Task::Keypoint, None) => {
                return Err(ProtocolError::MissingKeypointType {
                    known: known_keypoint_types(),
                })
            }
            (Task::Keypoint, Some(t)) if keypoint_names(t).is_none() => {
                return Err(ProtocolError::UnknownKeypointType {
                    value: t.clone(),
                    known: known_keypoint_types(),
                })
            }
            (Task::Keypoint, Some(_)) => {}
            (_, Some(_)) => {
                return Err(ProtocolError::UnusedField {
                    task,
                    field: "keypoint_type",
                })
            }
            (_, None) => {}
        }
        Ok(())
    }

    /// `{categories}` of rex-omni-spec.md §5.1: the list joined by ", ".
    pub fn categories_text(&self) -> String {
        self.categories.join(", ")
    }

    /// The task prompt (without chat template) as pieces; `image_w`/`image_h` are the ORIGINAL frame
    /// size, used only by visual_prompting to turn boxes into bins (rex-omni-spec.md §5.3).
    pub fn pieces(&self, image_w: u32, image_h: u32) -> Result<Vec<TextPiece>, ProtocolError> {
        self.validate()?;
        let t = |s: &str| TextPiece::Template(s.to_string());
        let user = TextPiece::User(self.categories_text());
        // Templates verbatim from rex_omni/tasks.py (rex-omni-spec.md §5.1).
        let pieces = match self.task {
            Task::Detection => vec![
                t("Detect "),
                user,
                t(". Output the bounding box coordinates in [x0, y0, x1, y1] format."),
            ],
            Task::Pointing => vec![t("Point to "), user, t(".")],
            Task::VisualPrompting => vec![
                t("Given reference boxes "),
                TextPiece::Template(self.visual_prompt(image_w, image_h)?),
                t(" indicating one or more objects, find all similar objects in the image and output their bounding boxes."),
            ],
            Task::Keypoint => {
                // validate() guarantees the type is known.
                let names = self
                    .keypoint_type
                    .as_deref()
                    .and_then(keypoint_names)
                    .ok_or_else(|| ProtocolError::MissingKeypointType { known: known_keypoint_types() })?;
                vec![
                    t("Can you detect each "),
                    user,
                    t(" in the image using a [x0, y0, x1, y1] box format, and then provide the coordinates of its "),
                    TextPiece::Template(names.join(", ")),
                    t(" as [x0, y0]? Output the answer in JSON format."),
                ]
            }
            Task::OcrBox => vec![t("Detect all "), user, t(" and recognize them.")],
            Task::OcrPolygon => vec![
                t("Can you detect all "),
                user,
                t(" in this image in polygon format like [x0, y0, x1, y1, x2, y2 ...] and then recognize them?"),
            ],
            // The doubled `""` is in the upstream template; the model was trained with it.
            Task::GuiGrounding => vec![t("Detect element \""), user, t("\"\" in the image.")],
            Task::GuiPointing => vec![t("Point to element \""), user, t("\".")],
        };
        Ok(pieces)
    }

    /// The task prompt as one string (what the detections document reports as `prompt`).
    pub fn text(&self, image_w: u32, image_h: u32) -> Result<String, ProtocolError> {
        Ok(pieces_text(&self.pieces(image_w, image_h)?))
    }

    /// The visual prompt string: `json.dumps({"object_1": ["<x0><y0><x1><y1>", ...]})` with Python's
    /// default separators ", " and ": " (rex-omni-spec.md §5.3).
    pub fn visual_prompt(&self, image_w: u32, image_h: u32) -> Result<String, ProtocolError> {
        if image_w == 0 || image_h == 0 {
            return Err(ProtocolError::InvalidImageSize {
                width: image_w,
                height: image_h,
            });
        }
        let mut boxes = Vec::with_capacity(self.boxes.len());
        for (index, b) in self.boxes.iter().enumerate() {
            check_box(index, b)?;
            let [x0, y0, x1, y1] = box_to_bins(b, image_w, image_h);
            boxes.push(format!("\"<{x0}><{y0}><{x1}><{y1}>\""));
        }
        Ok(format!("{{\"object_1\": [{}]}}", boxes.join(", ")))
    }
}

fn check_box(index: usize, b: &[f64; 4]) -> Result<(), ProtocolError> {
    let reason = if b.iter().any(|v| !v.is_finite()) {
        Some("has a value that is not a finite number")
    } else if b.iter().any(|v| *v < 0.0) {
        Some("has a negative coordinate")
    } else if b[2] < b[0] || b[3] < b[1] {
        Some("is inverted (x1 < x0 or y1 < y0)")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ProtocolError::InvalidBox {
            index,
            value: *b,
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(s: &str) -> TaskPrompt {
        serde_json::from_str(s).expect("valid payload")
    }

    #[test]
    fn templates_are_verbatim() {
        let p = TaskPrompt::new(Task::Detection, &["person", "car"]);
        assert_eq!(
            p.text(640, 480).unwrap(),
            "Detect person, car. Output the bounding box coordinates in [x0, y0, x1, y1] format."
        );
        assert_eq!(
            TaskPrompt::new(Task::Pointing, &["cup"])
                .text(1, 1)
                .unwrap(),
            "Point to cup."
        );
        assert_eq!(
            TaskPrompt::new(Task::OcrBox, &["word"]).text(1, 1).unwrap(),
            "Detect all word and recognize them."
        );
        assert_eq!(
            TaskPrompt::new(Task::OcrPolygon, &["text line"]).text(1, 1).unwrap(),
            "Can you detect all text line in this image in polygon format like [x0, y0, x1, y1, x2, y2 ...] and then recognize them?"
        );
        assert_eq!(
            TaskPrompt::new(Task::GuiGrounding, &["Submit"])
                .text(1, 1)
                .unwrap(),
            "Detect element \"Submit\"\" in the image."
        );
        assert_eq!(
            TaskPrompt::new(Task::GuiPointing, &["Submit"])
                .text(1, 1)
                .unwrap(),
            "Point to element \"Submit\"."
        );
        let mut k = TaskPrompt::new(Task::Keypoint, &["person"]);
        k.keypoint_type = Some("animal".into());
        assert_eq!(
            k.text(1, 1).unwrap(),
            "Can you detect each person in the image using a [x0, y0, x1, y1] box format, and then provide the coordinates of its left eye, right eye, nose, neck, root of tail, left shoulder, left elbow, left front paw, right shoulder, right elbow, right front paw, left hip, left knee, left back paw, right hip, right knee, right back paw as [x0, y0]? Output the answer in JSON format."
        );
    }

    #[test]
    fn visual_prompt_is_json_dumps_of_bins_against_original_size() {
        // 1000x1000: bin = floor(x/1000*999).
        let p = TaskPrompt {
            task: Task::VisualPrompting,
            categories: vec![],
            keypoint_type: None,
            boxes: vec![
                [12.5, 412.9, 339.4, 569.0],
                [92.1, 55.1, 179.2, 378.4],
                [0.0, 0.0, 5000.0, 1000.0],
            ],
        };
        assert_eq!(
            p.visual_prompt(1000, 1000).unwrap(),
            r#"{"object_1": ["<12><412><339><568>", "<92><55><179><378>", "<0><0><999><999>"]}"#
        );
        assert!(p
            .text(1000, 1000)
            .unwrap()
            .starts_with(r#"Given reference boxes {"object_1": ["<12><412>"#));
    }

    #[test]
    fn invalid_inputs_are_named() {
        let e = TaskPrompt::new(Task::Detection, &[])
            .validate()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "task detection: categories: missing (give at least one category or phrase)"
        );
        let mut k = TaskPrompt::new(Task::Keypoint, &["hand"]);
        k.keypoint_type = Some("hand".into());
        assert_eq!(
            k.validate().unwrap_err().to_string(),
            "task keypoint: keypoint_type: \"hand\" is unknown (known types: person, animal)"
        );
        k.keypoint_type = None;
        assert!(matches!(
            k.validate(),
            Err(ProtocolError::MissingKeypointType { .. })
        ));
        let vp = TaskPrompt::new(Task::VisualPrompting, &[]);
        assert!(matches!(vp.validate(), Err(ProtocolError::MissingBoxes)));
        for (b, want) in [
            ([f64::NAN, 0.0, 1.0, 1.0], "not a finite number"),
            ([-1.0, 0.0, 1.0, 1.0], "negative"),
            ([5.0, 0.0, 1.0, 1.0], "inverted"),
        ] {
            let p = TaskPrompt {
                boxes: vec![[0.0, 0.0, 1.0, 1.0], b],
                ..vp.clone()
            };
            let e = p.validate().unwrap_err().to_string();
            assert!(
                e.starts_with("task visual_prompting: boxes[1]: ") && e.contains(want),
                "{e}"
            );
        }
        let d = TaskPrompt {
            boxes: vec![[0.0, 0.0, 1.0, 1.0]],
            ..TaskPrompt::new(Task::Detection, &["a"])
        };
        assert!(matches!(
            d.validate(),
            Err(ProtocolError::UnusedField { field: "boxes", .. })
        ));
        let blank = TaskPrompt::new(Task::Pointing, &["cup", "  "]);
        assert!(matches!(
            blank.validate(),
            Err(ProtocolError::EmptyCategory { index: 1, .. })
        ));
        let ok = TaskPrompt {
            boxes: vec![[0.0, 0.0, 1.0, 1.0]],
            ..vp
        };
        assert!(matches!(
            ok.visual_prompt(0, 10),
            Err(ProtocolError::InvalidImageSize { .. })
        ));
    }

    #[test]
    fn payload_accepts_list_or_comma_string() {
        let a = from_json(r#"{"task":"detection","categories":["person","car"]}"#);
        let b = from_json(r#"{"task":"detection","categories":"person, car"}"#);
        assert_eq!(a, b);
        assert_eq!(a.categories, ["person", "car"]);
        let g = from_json(r#"{"task":"gui_grounding","categories":"Yes, continue"}"#);
        assert_eq!(g.categories, ["Yes, continue"]);
        let k = from_json(r#"{"task":"keypoint","categories":"person","keypoint_type":"person"}"#);
        assert!(k.validate().is_ok());
        let v = from_json(r#"{"task":"visual_prompting","boxes":[[1,2,3,4]]}"#);
        assert_eq!(v.boxes, [[1.0, 2.0, 3.0, 4.0]]);
        assert!(serde_json::from_str::<TaskPrompt>(r#"{"task":"detect"}"#).is_err());
        assert!(
            serde_json::from_str::<TaskPrompt>(r#"{"task":"detection","catgories":"a"}"#).is_err()
        );
        // Round trip through the serialized form.
        let back: TaskPrompt = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
        assert_eq!(back, k);
    }
}
