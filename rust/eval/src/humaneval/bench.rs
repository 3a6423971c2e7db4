//! `uhlm bench humaneval`: every compared system writes HumanEval completions as real software
//! (the device SDK in this process with the SLM, the LLM in a `uhlm serve` child process, QUIC
//! with TLS 1.3 on loopback, optionally through a `uhlm-linkemu` profile), and every completion
//! is run against its problem's tests.
//!
//! The thresholds of the skipping systems are calibrated on HumanEval problems that the fold
//! being generated does not contain: with `--limit N` the evaluated problems are the first N and
//! the calibration problems follow them; when too few are left (the full 164), the evaluated
//! problems are split into two folds, each calibrated on the other (cross-fitting), so that no
//! threshold has seen the problem it is scored on.
//!
//! Every generation is appended to its sample file as soon as it is scored, and calibrations
//! are kept as JSON, so an interrupted run resumes where it stopped.
//!
//! - `options`: what a run is asked for.
//! - `folds`: cross-fitted folds, their calibration and thresholds.
//! - `generation`: generating and recording every pending sample.
//! - `scoring`: pass@1 per system from the sample files.
//! - `signals`: how well each uncertainty signal predicts a mismatch.

mod folds;
mod generation;
mod options;
mod scoring;
mod signals;

pub use folds::{Fold, FoldThresholds, calibrate_fold, fold_systems, folds};
pub use generation::{Progress, generate_fold, pending_count, sample_path};
pub use options::HumanEvalOptions;
pub use scoring::{HumanEvalReport, SystemScore, score};
pub use signals::{COMBINED, SignalScore, SkipAtRisk, signal_scores};
