//! Scoring a run from its sample files: pass@1 per system, greedy and sampled, relative to the
//! SLM and LLM baselines, with the traffic and speed each system took.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::folds::{Fold, FoldThresholds};
use super::generation::open_files;
use super::options::HumanEvalOptions;
use super::signals::SignalScore;
use crate::EvalError;
use crate::humaneval::{Problem, mean_pass_at_k};
use crate::paper::SystemSpec;

/// One system's scores over the evaluated problems.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SystemScore {
    pub name: String,
    pub description: String,
    /// Problems with a greedy sample.
    pub problems: usize,
    pub pass_at_1_greedy: Option<f64>,
    /// pass@1 at the sampling temperature, by the unbiased estimator over `samples` per problem.
    pub pass_at_1_sampled: Option<f64>,
    pub samples_per_problem: u32,
    /// Share of all generated tokens decided on the device.
    pub device_share: f64,
    pub uplink_bytes_per_token: f64,
    pub llm_forwards_per_token: f64,
    /// Generated tokens over the wall time of the generations.
    pub tokens_per_s: f64,
    pub tokens: u64,
    /// Decisions taken locally because the server could not be reached in time.
    pub offline: u64,
    /// Greedy pass@1 over the LLM's, and the share of the SLM-to-LLM gap recovered.
    pub of_llm: Option<f64>,
    pub gap_recovered: Option<f64>,
}

/// A whole run's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HumanEvalReport {
    pub options: HumanEvalOptions,
    pub slm: String,
    pub llm: String,
    pub problems: usize,
    pub folds: Vec<Fold>,
    pub thresholds: Vec<FoldThresholds>,
    /// How well each uncertainty signal predicts that the LLM would decide otherwise, on the
    /// calibration tokens of every fold together.
    pub signals: Vec<SignalScore>,
    pub systems: Vec<SystemScore>,
}

/// Scores every system from its sample files.
pub fn score(
    dir: &Path,
    problems: &[Problem],
    folds: &[Fold],
    systems: &[SystemSpec],
    options: &HumanEvalOptions,
) -> Result<Vec<SystemScore>, EvalError> {
    let evaluated: std::collections::HashSet<&str> = folds
        .iter()
        .flat_map(|f| f.evaluated.iter().map(|&i| problems[i].task_id.as_str()))
        .collect();
    let mut scores = Vec::new();
    for system in systems {
        let files = open_files(dir, &system.name, options)?;
        let mut greedy: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let mut sampled: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        let (mut tokens, mut device, mut decisions, mut uplink, mut forwards) = (0u64, 0, 0, 0, 0);
        let (mut seconds, mut offline) = (0.0f64, 0u64);
        for file in files.values() {
            for s in file.samples() {
                if s.system != system.name || !evaluated.contains(s.task_id.as_str()) {
                    continue;
                }
                let map = if s.temperature == 0.0 {
                    &mut greedy
                } else if s.temperature == options.temperature && s.sample_index < options.samples {
                    &mut sampled
                } else {
                    continue;
                };
                let e = map.entry(s.task_id.as_str()).or_default();
                e.0 += 1;
                e.1 += s.passed.unwrap_or(false) as usize;
                let metric = |k: &str| s.metrics.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
                tokens += s.tokens as u64;
                device += s.skipped.unwrap_or(0);
                decisions += metric("decisions");
                uplink += s.uplink_bytes.unwrap_or(0);
                forwards += s.llm_forwards.unwrap_or(0);
                seconds += s.seconds.unwrap_or(0.0);
                offline += metric("offline");
            }
        }
        let pass1 = |m: &BTreeMap<&str, (usize, usize)>| {
            mean_pass_at_k(&m.values().copied().collect::<Vec<_>>(), 1)
        };
        let per_token = |x: u64| x as f64 / tokens.max(1) as f64;
        scores.push(SystemScore {
            name: system.name.clone(),
            description: system.description.clone(),
            problems: greedy.len(),
            pass_at_1_greedy: pass1(&greedy),
            pass_at_1_sampled: pass1(&sampled),
            samples_per_problem: options.samples,
            device_share: device as f64 / decisions.max(1) as f64,
            uplink_bytes_per_token: per_token(uplink),
            llm_forwards_per_token: per_token(forwards),
            tokens_per_s: if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            },
            tokens,
            offline,
            of_llm: None,
            gap_recovered: None,
        });
    }
    relative_to_baselines(&mut scores);
    Ok(scores)
}

/// Fills each system's greedy pass@1 relative to LLM only, and the SLM-to-LLM gap recovered.
fn relative_to_baselines(scores: &mut [SystemScore]) {
    let get = |name: &str, scores: &[SystemScore]| {
        scores
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.pass_at_1_greedy)
    };
    let (slm, llm) = (get("slm", scores), get("llm", scores));
    for s in scores.iter_mut() {
        let Some(p) = s.pass_at_1_greedy else {
            continue;
        };
        if let Some(llm) = llm.filter(|&l| l > 0.0) {
            s.of_llm = Some(p / llm);
            if let Some(slm) = slm.filter(|&slm| llm > slm) {
                s.gap_recovered = Some((p - slm) / (llm - slm));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_relative_to_the_baselines() {
        let score = |name: &str, p: f64| SystemScore {
            name: name.into(),
            description: String::new(),
            problems: 10,
            pass_at_1_greedy: Some(p),
            pass_at_1_sampled: None,
            samples_per_problem: 0,
            device_share: 0.0,
            uplink_bytes_per_token: 0.0,
            llm_forwards_per_token: 0.0,
            tokens_per_s: 0.0,
            tokens: 0,
            offline: 0,
            of_llm: None,
            gap_recovered: None,
        };
        let mut s = vec![score("slm", 0.5), score("llm", 0.7), score("uhlm", 0.68)];
        relative_to_baselines(&mut s);
        assert!((s[2].of_llm.unwrap() - 0.68 / 0.7).abs() < 1e-12);
        assert!((s[2].gap_recovered.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(s[1].gap_recovered, Some(1.0));
    }
}
