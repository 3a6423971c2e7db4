//! `uhlm loadgen`: many devices against one server, each a real SDK engine with its own
//! on-device model, generating until a deadline; every generation is checked, not just timed.
//!
//! It is the device half of the fault and load campaign (`cargo xtask soak` adds the link
//! emulator, kills and restarts the server, and watches its memory). What it checks, per
//! generation: it completes (hybrid or offline), the streamed token events are exactly the
//! summary's token ids (none lost, none repeated, positions 0, 1, 2, ...), its text is what
//! those ids decode to, and it is as long as asked unless it stopped for a reason.
//!
//! Devices: one in `--hlm-every` verifies every token (HLM); the others are uhlm devices with a
//! fixed threshold; one in `--long-every` sends long prompts. With `--replay-token-ms` a device
//! runs its draft model once per context it reaches and replays those logits at a phone's pace
//! when the context comes back ([`ReplayedDraft`]): 64 devices running their models would take
//! more of the machine than the server they load (RELIABILITY.md, run 9).
//!
//! Latency: every verified token carries its `Verify` round trip (`TokenEvent::verify_ms`).
//! Those of short-prompt devices that overlap a long prompt's prefill (from its generation's
//! start to its first token) are reported apart: that is what one long prompt costs the others.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use uhlm_model::fetch;
use uhlm_model::tokenizer::Tokenizer;
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationOptions, GenerationSummary, HybridEngine, Mode,
    PolicyConfig, Prompt, SamplingOptions, StopReason, TokenEvent, TokenListener, TokenSource,
};

mod replayed_draft;
use replayed_draft::{ReplayCounts, ReplayedDraft};

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Server (or link emulator) address, host:port.
    #[arg(long)]
    server: String,
    /// SHA-256 of the server certificate.
    #[arg(long)]
    pin: Option<String>,
    /// A file whose first line is the API key.
    #[arg(long)]
    api_key_file: PathBuf,
    /// On-device model of every device: a GGUF path or a cached model name.
    #[arg(long, default_value = "smollm2-draft")]
    slm: String,
    /// Devices, each with its own engine, connection and model.
    #[arg(long, default_value_t = 64)]
    devices: usize,
    /// How long devices keep starting generations (running ones then finish).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Every this many devices, one sends long prompts (0: none).
    #[arg(long, default_value_t = 16)]
    long_every: usize,
    /// Tokens of a long prompt.
    #[arg(long, default_value_t = 4096)]
    long_prompt_tokens: usize,
    /// Every this many devices, one verifies every token (HLM); the others skip confident
    /// tokens with the fixed `--threshold` (1: every device verifies every token).
    #[arg(long, default_value_t = 4)]
    hlm_every: usize,
    /// Most tokens a device drafts ahead of its final ones while drafts are verified
    /// (`EngineConfig::max_lookahead`; 0: one draft at a time) [default: the SDK's].
    #[arg(long)]
    max_lookahead: Option<usize>,
    /// Uncertainty threshold of the uhlm devices [default: the target-risk threshold measured
    /// on the SmolLM2 pair at epsilon 0.1]. A fixed one: the default policy without a
    /// calibration sends every token once it has seen 32 verdicts.
    #[arg(long, default_value_t = 0.42)]
    threshold: f32,
    /// Tokens each generation asks for.
    #[arg(long, default_value_t = 24)]
    max_tokens: u32,
    /// Devices generate this long before `--duration` starts: their generations are checked,
    /// their round trips not timed. Replaying devices compute each context's rows the first
    /// time they reach it, and the first generations compete with the server for the cores.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warm_up: Duration,
    /// Longest pause of a device between two generations (drawn uniformly).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    think: Duration,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Devices run their draft model once for each context they reach and replay its logits
    /// when the context comes back, one token every this many milliseconds: each device repeats
    /// one seed, and a generation is a function of its seed. Sampling, the uplink codec,
    /// uncertainty, the policy and the link run as usual.
    #[arg(long)]
    replay_token_ms: Option<f64>,
    /// Where to write the JSON report (also printed).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The campaign's device-side figures, written as JSON.
#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub devices: usize,
    pub generations: u64,
    pub completed: u64,
    /// Generations that returned an error (each listed in `problems`).
    pub failed: u64,
    pub tokens: u64,
    /// Tokens decided without the server (`offline`) and with it (`accepted`, `resampled`).
    pub offline_tokens: u64,
    pub verified_tokens: u64,
    pub local_tokens: u64,
    /// Token events missing from or added to what the summary committed.
    pub lost_or_duplicated_tokens: u64,
    /// Generations whose text is not what their token ids decode to.
    pub text_mismatches: u64,
    /// Generations shorter than asked without a stop reason.
    pub short_generations: u64,
    pub link_downs: u64,
    pub reconnects: u64,
    pub long_prompt_generations: u64,
    /// `Verify` round trips of short-prompt devices, in ms.
    pub verify_ms: Percentiles,
    /// The same, only those that overlapped a long prompt's prefill.
    pub verify_during_long_prefill_ms: Percentiles,
    /// The first `Verify` of each short-prompt generation: it also waits for the prompt's
    /// prefill on the server (the session opens with the generation).
    pub first_verify_ms: Percentiles,
    /// With `--replay-token-ms`: draft rows replayed, and computed by the draft model (each
    /// context's first time, and contexts past what a device keeps).
    pub draft_rows_replayed: u64,
    pub draft_rows_computed: u64,
    pub wall_s: f64,
    /// The first problems found, for the reader.
    pub problems: Vec<String>,
}

/// Order statistics of a sample (nearest rank); zeros when it is empty.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            count: v.len(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            max: v.last().copied().unwrap_or(0.0),
        }
    }
}

/// What one generation's listener saw.
#[derive(Default)]
struct Seen {
    tokens: Vec<(Instant, TokenEvent)>,
    /// Times the link went down.
    link_downs: u64,
    tail: String,
}

#[derive(Default)]
struct Recorder(Mutex<Seen>);

impl TokenListener for Recorder {
    fn on_token(&self, event: TokenEvent) {
        lock(&self.0).tokens.push((Instant::now(), event));
    }
    fn on_link_change(&self, online: bool, _detail: String) {
        if !online {
            lock(&self.0).link_downs += 1;
        }
    }
    fn on_tail_text(&self, text: String) {
        lock(&self.0).tail.push_str(&text);
    }
}

/// Everything the devices share: the report being filled and the long prefills' windows.
struct Campaign {
    report: Mutex<LoadReport>,
    /// (start, first token) of every long-prompt generation; `None` while it prefills.
    long_prefills: Mutex<Vec<(Instant, Option<Instant>)>>,
    /// (sent, answered) of each `Verify` of short-prompt devices.
    verifies: Mutex<Vec<(Instant, Instant)>>,
    /// Round trips of the first `Verify` of short-prompt generations, in ms.
    first_verifies: Mutex<Vec<f64>>,
    replay_counts: Arc<ReplayCounts>,
    tokenizer: Tokenizer,
}

pub fn run(args: LoadgenArgs) -> Result<()> {
    let slm = fetch::resolve_model(&args.slm)?;
    let api_key = std::fs::read_to_string(&args.api_key_file)
        .with_context(|| format!("reading the API key from {}", args.api_key_file.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let tokenizer = Tokenizer::from_gguf_path(&slm).context("reading the SLM's tokenizer")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let campaign = Arc::new(Campaign {
        report: Mutex::new(LoadReport {
            devices: args.devices,
            ..LoadReport::default()
        }),
        long_prefills: Mutex::default(),
        verifies: Mutex::default(),
        first_verifies: Mutex::default(),
        replay_counts: Arc::default(),
        tokenizer,
    });
    let args = Arc::new(args);
    let t0 = Instant::now();
    let timed_from = t0 + args.warm_up;
    let deadline = timed_from + args.duration;
    let devices: Vec<_> = (0..args.devices)
        .map(|i| {
            let hlm = i % args.hlm_every.max(1) == 0;
            let mut config = EngineConfig {
                slm_path: slm.clone(),
                server: Some(args.server.clone()),
                pin: args.pin.clone(),
                api_key: api_key.clone(),
                mode: if hlm { Mode::Hlm } else { Mode::Uhlm },
                policy: if hlm {
                    PolicyConfig::send_all()
                } else {
                    PolicyConfig::fixed(args.threshold)
                },
                threads: Some(1),
                client_name: format!("uhlm-loadgen/{i}"),
                ..EngineConfig::default()
            };
            if let Some(n) = args.max_lookahead {
                config.max_lookahead = n;
            }
            let (campaign, args) = (campaign.clone(), args.clone());
            let handle = rt.handle().clone();
            rt.spawn(async move {
                device(i, config, handle, campaign, args, timed_from, deadline).await
            })
        })
        .collect();
    rt.block_on(async {
        for d in devices {
            if let Err(e) = d.await.context("a device task panicked")? {
                problem(&campaign, format!("device setup: {e:#}"));
            }
        }
        anyhow::Ok(())
    })?;
    let report = finish(&campaign, t0.elapsed());
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// One device: loads its engine, then generates until the deadline (round trips timed in
/// generations that start from `timed_from`).
async fn device(
    index: usize,
    config: EngineConfig,
    rt: tokio::runtime::Handle,
    campaign: Arc<Campaign>,
    args: Arc<LoadgenArgs>,
    timed_from: Instant,
    deadline: Instant,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed ^ (index as u64).wrapping_mul(0x9E37));
    // Staggered starts: devices arrive over the first tenth of the run, not all at once.
    let arrive = args.duration.mul_f64(0.1 * rng.random::<f64>());
    tokio::time::sleep(arrive).await;
    let long = args.long_every > 0 && index % args.long_every == args.long_every - 1;
    let (shared, a) = (campaign.clone(), args.clone());
    let (engine, prompt) = tokio::task::spawn_blocking(move || {
        let tokenizer = &shared.tokenizer;
        let text = if long {
            long_prompt(tokenizer, a.long_prompt_tokens, index)?
        } else {
            format!(
                "Device {index} writes a short story about a lighthouse keeper. Once upon a time"
            )
        };
        let engine = match a.replay_token_ms {
            Some(ms) => {
                // The prompt as the engine renders it (plain text, no chat template).
                let ids = tokenizer.encode(&text, true)?;
                let pace = Duration::from_secs_f64(ms / 1e3);
                let counts = shared.replay_counts.clone();
                HybridEngine::with_draft_model(config, rt, |model| {
                    Ok(Box::new(ReplayedDraft::new(model, ids, pace, counts)?))
                })
            }
            None => HybridEngine::with_runtime(config, rt),
        };
        anyhow::Ok((engine?, Prompt::Text(text)))
    })
    .await?
    .context("loading the device's engine")?;
    let engine = Arc::new(engine);
    let mut n = 0u64;
    while Instant::now() < deadline {
        // A replaying device repeats its generation, so that its contexts come back (see
        // `ReplayedDraft`); where a fault changed the path, the model computes the new rows.
        let round = if args.replay_token_ms.is_some() { 0 } else { n };
        let recorder = Arc::new(Recorder::default());
        let options = GenerationOptions {
            sampling: SamplingOptions {
                temperature: 0.8,
                max_tokens: args.max_tokens,
                seed: Some(args.seed ^ ((index as u64) << 32) ^ round),
                ..SamplingOptions::default()
            },
            chat_template: false,
        };
        let started = Instant::now();
        let window = long.then(|| {
            let mut w = lock(&campaign.long_prefills);
            w.push((started, None));
            w.len() - 1
        });
        let result = engine
            .generate(
                prompt.clone(),
                options,
                recorder.clone(),
                CancelToken::new(),
            )
            .await;
        let seen = std::mem::take(&mut *lock(&recorder.0));
        if let Some(w) = window {
            // The prefill ended at the first token (or with the generation, if none came).
            let first = seen.tokens.first().map_or(Instant::now(), |(t, _)| *t);
            lock(&campaign.long_prefills)[w].1 = Some(first);
        }
        let timed = started >= timed_from;
        record(&campaign, index, long, timed, args.max_tokens, result, seen);
        n += 1;
        let think = args.think.mul_f64(rng.random::<f64>());
        tokio::time::sleep(think).await;
    }
    Ok(())
}

/// A prompt of about `tokens` tokens: numbered sentences, so that no two devices share one.
fn long_prompt(tokenizer: &Tokenizer, tokens: usize, index: usize) -> Result<String> {
    let mut text = String::new();
    let mut i = 0;
    loop {
        let sentence =
            format!("Line {i} of device {index}: the keeper climbed the stairs and lit the lamp. ");
        text.push_str(&sentence);
        i += 1;
        if i % 32 == 0 && tokenizer.encode(&text, true)?.len() >= tokens {
            return Ok(text);
        }
    }
}

/// Checks one generation and adds it to the report.
fn record(
    campaign: &Campaign,
    device: usize,
    long: bool,
    timed: bool,
    max_tokens: u32,
    result: Result<GenerationSummary, uhlm_sdk::SdkError>,
    seen: Seen,
) {
    let mut problems = Vec::new();
    {
        let mut r = lock(&campaign.report);
        r.generations += 1;
        r.long_prompt_generations += u64::from(long);
        r.link_downs += seen.link_downs;
    }
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            lock(&campaign.report).failed += 1;
            problem(campaign, format!("device {device}: generation failed: {e}"));
            return;
        }
    };
    let ids: Vec<u32> = seen.tokens.iter().map(|(_, e)| e.token_id).collect();
    let positions_ok = seen
        .tokens
        .iter()
        .enumerate()
        .all(|(i, (_, e))| e.position as usize == i);
    let lost_or_duplicated = if ids == summary.token_ids && positions_ok {
        0
    } else {
        problems.push(format!(
            "device {device}: {} token events for {} committed tokens",
            ids.len(),
            summary.token_ids.len()
        ));
        (ids.len().abs_diff(summary.token_ids.len())).max(1) as u64
    };
    let streamed: String = seen
        .tokens
        .iter()
        .map(|(_, e)| e.text.as_str())
        .chain([seen.tail.as_str()])
        .collect();
    let decoded = campaign
        .tokenizer
        .decode(&summary.token_ids, true)
        .unwrap_or_default();
    let text_ok = streamed == summary.text && decoded == summary.text;
    if !text_ok {
        problems.push(format!(
            "device {device}: text {:?} but the ids decode to {decoded:?} (streamed {streamed:?})",
            summary.text
        ));
    }
    let short =
        summary.stop == StopReason::MaxTokens && summary.token_ids.len() < max_tokens as usize;
    if short {
        problems.push(format!(
            "device {device}: {} of {max_tokens} tokens, stopped for max tokens",
            summary.token_ids.len()
        ));
    }
    if timed && !long {
        let mut verifies = lock(&campaign.verifies);
        for (at, e) in &seen.tokens {
            if let Some(ms) = e.verify_ms {
                verifies.push((*at - Duration::from_secs_f64(ms / 1e3), *at));
            }
        }
        if let Some(ms) = seen.tokens.iter().find_map(|(_, e)| e.verify_ms) {
            lock(&campaign.first_verifies).push(ms);
        }
    }
    let mut r = lock(&campaign.report);
    r.completed += 1;
    r.tokens += summary.token_ids.len() as u64;
    for s in &summary.sources {
        match s {
            TokenSource::Offline => r.offline_tokens += 1,
            TokenSource::Accepted | TokenSource::Resampled | TokenSource::Remote => {
                r.verified_tokens += 1
            }
            TokenSource::Local => r.local_tokens += 1,
        }
    }
    r.reconnects += summary.stats.reconnects;
    r.lost_or_duplicated_tokens += lost_or_duplicated;
    r.text_mismatches += u64::from(!text_ok);
    r.short_generations += u64::from(short);
    drop(r);
    for p in problems {
        problem(campaign, p);
    }
}

fn problem(campaign: &Campaign, p: String) {
    tracing::warn!("{p}");
    let mut r = lock(&campaign.report);
    if r.problems.len() < 50 {
        r.problems.push(p);
    }
}

/// Splits the round trips by whether a long prefill was under way, and closes the report.
fn finish(campaign: &Campaign, wall: Duration) -> LoadReport {
    let windows = lock(&campaign.long_prefills).clone();
    let verifies = lock(&campaign.verifies).clone();
    let ms = |(a, b): (Instant, Instant)| b.duration_since(a).as_secs_f64() * 1e3;
    let during: Vec<f64> = verifies
        .iter()
        .filter(|(a, b)| {
            windows
                .iter()
                .any(|(s, e)| s < b && e.is_none_or(|e| *a < e))
        })
        .map(|&v| ms(v))
        .collect();
    let mut report = std::mem::take(&mut *lock(&campaign.report));
    report.verify_ms = Percentiles::of(verifies.into_iter().map(ms).collect());
    report.verify_during_long_prefill_ms = Percentiles::of(during);
    report.first_verify_ms = Percentiles::of(lock(&campaign.first_verifies).clone());
    report.draft_rows_replayed = campaign.replay_counts.replayed.load(Ordering::Relaxed);
    report.draft_rows_computed = campaign.replay_counts.computed.load(Ordering::Relaxed);
    report.wall_s = wall.as_secs_f64();
    report
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
