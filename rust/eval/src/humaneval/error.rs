//! Why the HumanEval task failed (a failing completion is a result, not an error).

use std::path::PathBuf;

/// Everything the HumanEval task can fail with (execution failures of a completion are results,
/// not errors: see [`ExecResult`](super::ExecResult)).
#[derive(Debug, thiserror::Error)]
pub enum HumanEvalError {
    #[error(transparent)]
    Fetch(#[from] uhlm_model::fetch::FetchError),
    #[error("HumanEval problems file {} is missing; fetch it with `fetch_problems`", path.display())]
    MissingProblems { path: PathBuf },
    #[error("HumanEval problems file {} is corrupt (line {line}): {reason}", path.display())]
    CorruptProblems {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("unknown prompt format {0:?}; expected completion or chat")]
    UnknownFormat(String),
    #[error("`{python}` cannot run Python 3 programs: {reason} (set UHLM_PYTHON)")]
    PythonUnusable { python: String, reason: String },
    #[error("sample file {} is corrupt at line {line}: {reason}", path.display())]
    CorruptSamples {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HumanEvalError + '_ {
    move |source| HumanEvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
