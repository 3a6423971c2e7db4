//! Losing the server mid-generation, getting it back, and cancelling.

use crate::e2e_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use e2e_common::{Recorder, ServerProc, llm_greedy, read_metric};
use uhlm_sdk::{
    CancelToken, Codec, EngineConfig, GenerationOptions, HybridEngine, Mode, PolicyConfig, Prompt,
    SamplingOptions, SdkError, StopReason, TokenSource,
};

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";
const MAX_TOKENS: u32 = 16;
const KILL_AFTER: usize = 4;

fn options() -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingOptions::greedy(MAX_TOKENS),
        chat_template: false,
    }
}

#[test]
fn a_killed_server_degrades_to_offline_and_a_restarted_one_is_used_again() {
    let mut server = ServerProc::start();
    let engine = HybridEngine::new(server.engine_config(
        Mode::Hlm,
        "topk:32".parse().unwrap(),
        PolicyConfig::send_all(),
    ))
    .unwrap();
    let killer = server.killer();
    let rec = Arc::new(Recorder::with_hook(move |e| {
        if e.position as usize + 1 == KILL_AFTER {
            killer.kill();
        }
    }));
    let summary = engine
        .generate_blocking(
            Prompt::Text(PROMPT.into()),
            options(),
            rec.clone(),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.stop, StopReason::MaxTokens);
    assert_eq!(summary.token_ids.len(), MAX_TOKENS as usize);
    // Nothing shown was changed or lost.
    assert_eq!(rec.token_ids(), summary.token_ids);
    // Verified up to the kill (a chain's verdict may settle a few more tokens after the one
    // that triggered it), then only offline tokens.
    let verified = e2e_common::verified_then_offline(&summary.sources);
    assert!(
        verified >= KILL_AFTER && verified < MAX_TOKENS as usize,
        "{:?}",
        summary.sources
    );
    let s = &summary.stats;
    assert_eq!(s.offline, (MAX_TOKENS as usize - verified) as u64);
    assert_eq!(s.sent, verified as u64);
    assert_eq!(s.drafted, s.skipped + s.sent + s.offline);
    // The verified prefix is the LLM's own greedy output.
    let ids = engine
        .tokenize_prompt(&Prompt::Text(PROMPT.into()), false)
        .unwrap();
    assert_eq!(
        summary.token_ids[..verified],
        llm_greedy(&ids, verified as u32)[..]
    );
    assert!(
        rec.links.lock().unwrap().iter().any(|(online, _)| !online),
        "no offline report"
    );

    server.restart();
    let rec = Arc::new(Recorder::default());
    let summary = engine
        .generate_blocking(
            Prompt::Text(PROMPT.into()),
            options(),
            rec.clone(),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.stats.offline, 0, "{:?}", summary.sources);
    assert_eq!(summary.stats.sent, summary.stats.decisions);
    assert_eq!(summary.token_ids, llm_greedy(&ids, MAX_TOKENS));
    assert_eq!(engine.stats().generations, 2);
}

#[test]
fn cancel_stops_at_once_and_releases_the_server_session() {
    let server = ServerProc::start();
    let engine = HybridEngine::new(server.engine_config(
        Mode::Hlm,
        Codec::default(),
        PolicyConfig::send_all(),
    ))
    .unwrap();
    let cancel = CancelToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let open_sessions = Arc::new(Mutex::new(None));
    let rec = {
        let (cancel, seen, open) = (cancel.clone(), seen.clone(), open_sessions.clone());
        let metrics = server.metrics;
        Arc::new(Recorder::with_hook(move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 2 {
                *open.lock().unwrap() = Some(read_metric(metrics, "uhlm_sessions"));
            }
            if n == 3 {
                cancel.cancel();
            }
        }))
    };
    let long = GenerationOptions {
        sampling: SamplingOptions::greedy(400),
        chat_template: false,
    };
    let handle = engine.start(
        Prompt::Text("Count from one to one thousand:".into()),
        long,
        rec,
        cancel,
    );
    let err = handle.wait_blocking().unwrap_err();
    assert_eq!(err, SdkError::Cancelled);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "tokens were emitted after cancel"
    );
    assert_eq!(
        *open_sessions.lock().unwrap(),
        Some(1.0),
        "the session was open while generating"
    );
    let sessions = server.wait_metric("uhlm_sessions", |v| v == 0.0);
    assert_eq!(
        sessions, 0.0,
        "the server still holds the cancelled session"
    );
    // The engine is free for the next generation, and the server still serves it.
    let summary = engine
        .generate_blocking(
            Prompt::Text("Hello".into()),
            options(),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.stats.offline, 0);
}

/// A server restarted mid-generation whose context fits the prompt and `max_tokens` but not
/// the prompt, what was generated and `max_tokens` again: the reconnect checks only what is
/// left, and the generation carries on with the server (it used to fail and lose every token
/// already shown).
#[test]
fn a_reconnect_mid_generation_checks_only_the_tokens_left() {
    let mut server = ServerProc::start();
    // One draft at a time: a pipelined device drafts ahead while the dead link times out and
    // may finish the 16 tokens offline before it reconnects (a lost chain is tested in
    // e2e_pipeline); this test is about what a reconnect checks.
    let engine = HybridEngine::new(EngineConfig {
        max_lookahead: 0,
        ..server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all())
    })
    .unwrap();
    let prompt = engine
        .tokenize_prompt(&Prompt::Text(PROMPT.into()), false)
        .unwrap();
    let fits = prompt.len() + MAX_TOKENS as usize + 1;
    server.extra_args = vec!["--max-context-tokens".into(), fits.to_string()];
    server.restart();

    // At KILL_AFTER tokens the listener holds the generation until the test thread has
    // restarted the server (same port and certificate, a fresh process without the session).
    let (at_kill, kill_seen) = std::sync::mpsc::channel::<()>();
    let (restarted, wait_restart) = std::sync::mpsc::channel::<()>();
    let wait_restart = Mutex::new(wait_restart);
    let rec = Arc::new(Recorder::with_hook(move |e| {
        if e.position as usize + 1 == KILL_AFTER {
            at_kill.send(()).unwrap();
            wait_restart.lock().unwrap().recv().unwrap();
        }
    }));
    let handle = engine.start(
        Prompt::Text(PROMPT.into()),
        options(),
        rec.clone(),
        CancelToken::new(),
    );
    kill_seen.recv().unwrap();
    server.restart();
    restarted.send(()).unwrap();
    let summary = handle
        .wait_blocking()
        .expect("the generation survives the restart");

    assert_eq!(summary.stop, StopReason::MaxTokens);
    assert_eq!(rec.token_ids(), summary.token_ids);
    let s = &summary.stats;
    assert!(s.reconnects >= 1, "{s:?}");
    // Verified again after the reconnect, and every verified token is the LLM's own.
    let last = *summary.sources.last().unwrap();
    assert!(
        matches!(last, TokenSource::Accepted | TokenSource::Resampled),
        "{:?}",
        summary.sources
    );
    let greedy = llm_greedy(&prompt, MAX_TOKENS);
    let mut context = prompt.clone();
    for (i, (&t, source)) in summary.token_ids.iter().zip(&summary.sources).enumerate() {
        if *source != TokenSource::Offline {
            let expected = llm_greedy(&context, 1);
            assert_eq!(t, expected[0], "token {i} ({source:?})");
        }
        context.push(t);
    }
    assert_eq!(summary.token_ids[..KILL_AFTER], greedy[..KILL_AFTER]);
}

/// A prompt whose prefill takes the server longer than the request timeout (here: a server
/// slower than the device, scoring 8 tokens per pass): the first Verify waits for it (the SDK
/// allows time per unscored token) instead of timing out, reconnecting and sending the whole
/// prompt again, which used to leave every token offline.
#[test]
fn a_long_prompt_is_verified_after_its_prefill_not_sent_again() {
    let server = ServerProc::start_with(&["--prefill-chunk-tokens", "8"]);
    let engine = HybridEngine::new(EngineConfig {
        request_timeout_ms: 200,
        ..server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all())
    })
    .unwrap();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(150);
    let prompt = engine
        .tokenize_prompt(&Prompt::Text(text.clone()), false)
        .unwrap();
    assert!(prompt.len() > 1000, "{}", prompt.len());
    let summary = engine
        .generate_blocking(
            Prompt::Text(text),
            GenerationOptions {
                sampling: SamplingOptions::greedy(4),
                chat_template: false,
            },
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    let s = &summary.stats;
    assert_eq!((s.offline, s.reconnects), (0, 0), "{:?}", summary.sources);
    assert_eq!(s.sent, summary.token_ids.len() as u64);
    // Scored once: the prompt's prefill was not started over.
    let prefilled = server.metric("uhlm_prefilled_tokens_total");
    assert!(prefilled <= prompt.len() as f64, "{prefilled}");
    assert_eq!(summary.token_ids, llm_greedy(&prompt, 4));
}
