//! The pipelined device loop end to end. Invariant 1: with skipping off, what it emits is
//! distributed exactly as the LLM's own samples, whatever the draft and its compression. And
//! a chain in flight loses nothing to a dead server or a cancel.
//!
//! Two tiny random-weight models with one vocabulary (so the run takes seconds): the server
//! process hosts one, the SDK drafts with a 4-bit copy of it, which disagrees with it often
//! enough that chains are rejected at every link. Each generation samples a few tokens at temperature 1 over
//! QUIC; the histogram of whole generations is checked against the LLM's exact sequence
//! distribution, enumerated in this process, with a chi-square test.

use crate::e2e_common;
use crate::runtime_support;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use e2e_common::{Outcome, Recorder, ServerProc, chi_square_p_value};
use runtime_support::{Toy, write_toy};
use uhlm_core::protocol::Verify;
use uhlm_core::sampling::{SamplingOptions, probabilities_into};
use uhlm_model::{LoadOptions, Model};
use uhlm_sdk::{
    CancelToken, Codec, EngineConfig, GenerationOptions, HybridEngine, Mode, PolicyConfig, Prompt,
    SdkError, StopReason, TokenEvent, TokenListener, TokenSource,
};

/// Tokens per generation: the first chain has one link, the next up to three, so links 0-2
/// all decide some position.
const TOKENS: u32 = 4;
const TOP_K: u32 = 4;
const RUNS: usize = 2000;
const PROMPT: &str = "he said";

fn sampling() -> SamplingOptions {
    SamplingOptions {
        temperature: 1.0,
        top_k: Some(TOP_K),
        top_p: None,
        max_tokens: TOKENS,
        seed: None,
        stop: Vec::new(),
    }
}

/// The LLM's probability of every outcome, by enumerating its top-k continuations.
fn exact_outcomes(model: &Arc<Model>, prompt: &[u32]) -> HashMap<Outcome, f64> {
    let eos = model.tokenizer().eos_ids().to_vec();
    let mut out = HashMap::new();
    let mut stack = vec![(Vec::<u32>::new(), 1.0f64)];
    let (mut probs, mut scratch) = (Vec::new(), Vec::new());
    while let Some((prefix, p)) = stack.pop() {
        if prefix.len() == TOKENS as usize {
            out.insert((prefix, false), p);
            continue;
        }
        let mut session = model.session();
        let mut context = prompt.to_vec();
        context.extend_from_slice(&prefix);
        let logits = session.score_last(&context).unwrap();
        assert!(probabilities_into(
            &logits,
            &sampling(),
            &mut probs,
            &mut scratch
        ));
        for (t, &pt) in probs.iter().enumerate() {
            if pt <= 0.0 {
                continue;
            }
            let t = t as u32;
            if eos.contains(&t) {
                out.insert((prefix.clone(), true), p * f64::from(pt));
            } else {
                let mut next = prefix.clone();
                next.push(t);
                stack.push((next, p * f64::from(pt)));
            }
        }
    }
    out
}

/// Records the chains sent and the tokens emitted, to find which link each rejection was.
#[derive(Default)]
struct ChainLog {
    /// Per Verify: the context positions it decides.
    chains: Mutex<Vec<Vec<u32>>>,
    tokens: Mutex<Vec<TokenEvent>>,
}

impl TokenListener for ChainLog {
    fn on_token(&self, event: TokenEvent) {
        self.tokens.lock().unwrap().push(event);
    }

    fn on_verify(&self, verify: &Verify) {
        self.chains
            .lock()
            .unwrap()
            .push(verify.positions().expect("positions fit"));
    }
}

impl ChainLog {
    /// Link indices (within their chain) of the resampled tokens of one generation.
    fn rejected_links(&self, prompt_len: u32) -> Vec<usize> {
        let chains = self.chains.lock().unwrap();
        let tokens = self.tokens.lock().unwrap();
        tokens
            .iter()
            .filter(|e| e.source == TokenSource::Resampled)
            .map(|e| {
                let at = prompt_len + e.position;
                // The last chain sent that decides this position is the one that did.
                chains
                    .iter()
                    .rev()
                    .find_map(|c| c.iter().position(|&p| p == at))
                    .expect("a resampled token was in a chain")
            })
            .collect()
    }
}

/// The toy pair in `dir`: the server process on the LLM (each request waiting `batch_wait`
/// for company, so round trips last several drafts), and an engine configuration for the SDK
/// with the 4-bit copy as its SLM.
fn toy_pair(dir: &std::path::Path, batch_wait: &str) -> (ServerProc, EngineConfig, PathBuf) {
    toy_pair_with(dir, &["--batch-wait", batch_wait])
}

/// [`toy_pair`] with these `uhlm serve` options.
fn toy_pair_with(dir: &std::path::Path, serve: &[&str]) -> (ServerProc, EngineConfig, PathBuf) {
    let (llm_path, slm_path) = (dir.join("llm.gguf"), dir.join("slm.gguf"));
    write_toy(&llm_path, &Toy::llama(), &[]);
    // The same weights rounded to 4 bits: a draft that agrees often but not always, like the
    // default pair's, so chains grow long and are still rejected at every link.
    write_toy(
        &slm_path,
        &Toy {
            quant: candle_core::quantized::GgmlDType::Q4_0,
            ..Toy::llama()
        },
        &[],
    );
    let server = ServerProc::start_model(llm_path.to_str().unwrap(), serve);
    let mut config = server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all());
    config.slm_path = slm_path;
    (server, config, llm_path)
}

#[test]
fn pipelined_chains_sample_exactly_the_llms_distribution() {
    let dir = tempfile::tempdir().unwrap();
    // Each request waits 3 ms for company at the idle server: a round trip several drafts
    // long, so the device drafts ahead while its chains are out, as on a real link.
    let (_server, config, llm_path) = toy_pair(dir.path(), "3ms");
    let engine = HybridEngine::new(config).unwrap();
    let llm = Model::load(&llm_path, &LoadOptions::default()).unwrap();
    let prompt = llm.tokenizer().encode(PROMPT, false).unwrap();
    let exact = exact_outcomes(&llm, &prompt);
    let total: f64 = exact.values().sum();
    assert!((total - 1.0).abs() < 1e-4, "enumeration lost mass: {total}");

    let options = GenerationOptions {
        sampling: sampling(),
        chat_template: false,
    };
    let mut observed: HashMap<Outcome, u64> = HashMap::new();
    let mut rejected_at = BTreeSet::new();
    let (mut chained, mut discarded) = (0usize, 0u64);
    for _ in 0..RUNS {
        let log = Arc::new(ChainLog::default());
        let summary = engine
            .generate_blocking(
                Prompt::Text(PROMPT.into()),
                options.clone(),
                log.clone(),
                CancelToken::new(),
            )
            .unwrap();
        assert_eq!(summary.stats.skipped + summary.stats.offline, 0);
        let eos = summary.stop == StopReason::Eos;
        *observed.entry((summary.token_ids, eos)).or_default() += 1;
        rejected_at.extend(log.rejected_links(summary.prompt_tokens));
        chained += log
            .chains
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.len() > 1)
            .count();
        discarded += summary.stats.discarded;
    }
    // The pipeline was exercised: chains of several drafts, rejected at every link, with
    // drafts thrown away after the rejections.
    assert!(
        chained > RUNS / 10,
        "only {chained} chains had several links"
    );
    assert!(
        (0..3).all(|l| rejected_at.contains(&l)),
        "rejections only at links {rejected_at:?}"
    );
    assert!(discarded > 0);
    let p = chi_square_p_value(&observed, &exact);
    eprintln!(
        "chains with several links {chained}, rejected links {rejected_at:?}, discarded {discarded}, p {p}"
    );
    assert!(
        p > 1e-3,
        "chi-square p = {p}: the outputs are not the LLM's distribution"
    );
}

#[test]
fn a_seed_gives_the_same_generation_whether_the_device_drafts_ahead_or_not() {
    // The random numbers of each position are drawn for that position, so the drafts thrown
    // away after a rejection (pipelining) do not shift the ones after them: the same seed
    // gives the same tokens with chains in flight and one draft at a time.
    let dir = tempfile::tempdir().unwrap();
    let (_server, config, _) = toy_pair(dir.path(), "3ms");
    let pipelined = HybridEngine::new(config.clone()).unwrap();
    let one_at_a_time = HybridEngine::new(EngineConfig {
        max_lookahead: 0,
        ..config
    })
    .unwrap();
    let mut discarded = 0;
    for seed in 0..24 {
        let options = GenerationOptions {
            sampling: SamplingOptions {
                max_tokens: 8,
                seed: Some(seed),
                ..sampling()
            },
            chat_template: false,
        };
        let generate = |engine: &HybridEngine| {
            engine
                .generate_blocking(
                    Prompt::Text(PROMPT.into()),
                    options.clone(),
                    Arc::new(Recorder::default()),
                    CancelToken::new(),
                )
                .unwrap()
        };
        let (a, b) = (generate(&pipelined), generate(&one_at_a_time));
        assert_eq!(a.token_ids, b.token_ids, "seed {seed}");
        assert_eq!(b.stats.discarded, 0);
        // Where the time went: the device read the prompt, drafted, and (one draft at a time)
        // waited for every verdict; the parts do not overlap.
        for s in [&a.stats, &b.stats] {
            assert!(s.prefill_ms > 0.0 && s.draft_ms > 0.0, "{s:?}");
            assert!(
                s.prefill_ms + s.draft_ms + s.wait_ms <= s.elapsed_ms,
                "{s:?}"
            );
        }
        assert!(b.stats.wait_ms > 0.0, "{:?}", b.stats);
        discarded += a.stats.discarded;
    }
    // Drafts were thrown away, so the seeds' draws had to survive them.
    assert!(discarded > 0);
}

#[test]
fn a_device_drafts_no_further_ahead_than_the_server_asks() {
    // A pass of one token: every verdict asks for at most one token past the first link (a
    // server's share of a pass for each busy session), so the device sends one draft at a
    // time and throws nothing away, where its own window pipelines on the same round trips
    // (`a_seed_gives_the_same_generation_whether_the_device_drafts_ahead_or_not`).
    let dir = tempfile::tempdir().unwrap();
    let (_server, config, _) = toy_pair_with(
        dir.path(),
        &["--batch-wait", "3ms", "--max-batch-tokens", "1"],
    );
    let engine = HybridEngine::new(config).unwrap();
    let (mut verifies, mut tokens) = (0, 0);
    for seed in 0..8 {
        let log = Arc::new(ChainLog::default());
        let summary = engine
            .generate_blocking(
                Prompt::Text(PROMPT.into()),
                GenerationOptions {
                    sampling: SamplingOptions {
                        max_tokens: 8,
                        seed: Some(seed),
                        ..sampling()
                    },
                    chat_template: false,
                },
                log.clone(),
                CancelToken::new(),
            )
            .unwrap();
        assert_eq!(summary.stats.discarded, 0, "seed {seed}");
        let chains = log.chains.lock().unwrap();
        assert!(
            chains.iter().all(|c| c.len() == 1),
            "seed {seed}: {chains:?}"
        );
        verifies += chains.len();
        tokens += summary.token_ids.len();
    }
    // Every token was a link (the policy sends all): one round trip each.
    assert!(
        verifies >= tokens && tokens > 0,
        "{verifies} verifies, {tokens} tokens"
    );
}

/// Sends the first chain of at least two links to `hook`, once.
struct OnChain<F: Fn() + Send + Sync> {
    hook: F,
    fired: std::sync::atomic::AtomicBool,
    tokens: Arc<Recorder>,
}

impl<F: Fn() + Send + Sync> TokenListener for OnChain<F> {
    fn on_token(&self, event: TokenEvent) {
        self.tokens.on_token(event);
    }

    fn on_link_change(&self, online: bool, detail: String) {
        self.tokens.on_link_change(online, detail);
    }

    fn on_verify(&self, verify: &Verify) {
        use std::sync::atomic::Ordering;
        if !verify.chain.is_empty() && !self.fired.swap(true, Ordering::SeqCst) {
            (self.hook)();
        }
    }
}

fn long() -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingOptions {
            max_tokens: 24,
            seed: Some(11),
            ..sampling()
        },
        chat_template: false,
    }
}

#[test]
fn a_server_lost_mid_chain_leaves_its_drafts_unverified_and_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    // Long round trips: the chain is surely still out when the server dies.
    let (mut server, config, _) = toy_pair(dir.path(), "200ms");
    let engine = HybridEngine::new(config).unwrap();
    let killer = server.killer();
    let listener = Arc::new(OnChain {
        hook: move || killer.kill(),
        fired: Default::default(),
        tokens: Arc::default(),
    });
    let summary = engine
        .generate_blocking(
            Prompt::Text(PROMPT.into()),
            long(),
            listener.clone(),
            CancelToken::new(),
        )
        .unwrap();
    assert!(listener.fired.load(std::sync::atomic::Ordering::SeqCst));
    // Every token was shown once, in order, and none was revised.
    assert_eq!(listener.tokens.token_ids(), summary.token_ids);
    assert_eq!(listener.tokens.sources(), summary.sources);
    // Verified up to the chain that was lost, then on the device.
    e2e_common::verified_then_offline(&summary.sources);
    // The lost chain's drafts are the first offline tokens.
    assert!(summary.stats.offline >= 1, "{:?}", summary.stats);
    if summary.stop != StopReason::Eos {
        assert_eq!(summary.token_ids.len(), 24);
    }
    assert!(
        listener
            .tokens
            .links
            .lock()
            .unwrap()
            .iter()
            .any(|(online, _)| !online),
        "no offline report"
    );
}

#[test]
fn a_cancel_mid_chain_stops_at_once_and_shows_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let (server, config, _) = toy_pair(dir.path(), "200ms");
    let engine = HybridEngine::new(config).unwrap();
    let cancel = CancelToken::new();
    let shown_at_cancel = Arc::new(Mutex::new(None));
    let tokens = Arc::new(Recorder::default());
    let listener = {
        let (cancel, shown, seen) = (cancel.clone(), shown_at_cancel.clone(), tokens.clone());
        Arc::new(OnChain {
            hook: move || {
                *shown.lock().unwrap() = Some(seen.token_ids().len());
                cancel.cancel();
            },
            fired: Default::default(),
            tokens,
        })
    };
    let err = engine
        .generate_blocking(
            Prompt::Text(PROMPT.into()),
            long(),
            listener.clone(),
            cancel,
        )
        .unwrap_err();
    assert_eq!(err, SdkError::Cancelled);
    assert!(listener.fired.load(std::sync::atomic::Ordering::SeqCst));
    // The cancel came with a chain out: nothing was shown after it, not even the tokens its
    // verdict would have settled.
    let shown = listener.tokens.token_ids().len();
    assert_eq!(Some(shown), *shown_at_cancel.lock().unwrap());
    let sessions = server.wait_metric("uhlm_sessions", |v| v == 0.0);
    assert_eq!(
        sessions, 0.0,
        "the server still holds the cancelled session"
    );
}
