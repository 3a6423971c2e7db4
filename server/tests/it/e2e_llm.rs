//! LLM-only mode end to end: the SDK sends the prompt once and the `uhlm-server` process streams
//! the LLM's tokens; stop strings and cancellation behave as on the per-token path, and a server
//! lost mid-stream leaves the device to finish the generation on its own model.

use crate::e2e_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use e2e_common::{Recorder, ServerProc, llm_greedy};
use uhlm_sdk::{
    CancelToken, Codec, GenerationOptions, HybridEngine, Mode, PolicyConfig, Prompt,
    SamplingOptions, SdkError, StopReason, TokenSource,
};

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived";

fn greedy(max_tokens: u32) -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingOptions::greedy(max_tokens),
        chat_template: false,
    }
}

fn llm_engine(server: &ServerProc) -> HybridEngine {
    HybridEngine::new(server.engine_config(Mode::Llm, Codec::default(), PolicyConfig::default()))
        .unwrap()
}

#[test]
fn llm_only_streams_the_llms_greedy_output_in_one_request() {
    let server = ServerProc::start();
    let engine = llm_engine(&server);
    let prompt = Prompt::Text(PROMPT.into());
    let ids = engine.tokenize_prompt(&prompt, false).unwrap();
    let expected = llm_greedy(&ids, 24);
    assert_eq!(
        expected.len(),
        24,
        "the reference hit EOS; pick another prompt"
    );
    let rec = Arc::new(Recorder::default());
    let summary = engine
        .generate_blocking(prompt, greedy(24), rec.clone(), CancelToken::new())
        .unwrap();
    assert_eq!(summary.token_ids, expected, "differs from the LLM alone");
    assert_eq!(summary.stop, StopReason::MaxTokens);
    assert_eq!(rec.token_ids(), summary.token_ids);
    assert!(
        rec.sources().iter().all(|s| *s == TokenSource::Remote),
        "{:?}",
        rec.sources()
    );
    let s = &summary.stats;
    assert_eq!((s.remote, s.decisions, s.generated_tokens), (24, 24, 24));
    assert_eq!((s.drafted, s.sent, s.offline), (0, 0, 0));
    // Start and one Generate; no round trip per token.
    assert_eq!(s.round_trips, 2, "{s:?}");
    assert!(s.uplink_bytes > 0 && s.downlink_bytes > 0);
    assert_eq!(server.metric("uhlm_generate_requests_total"), 1.0);
    assert_eq!(server.metric("uhlm_tokens_generated_total"), 24.0);
    assert_eq!(server.metric("uhlm_tokens_verified_total"), 0.0);
}

/// A stop string ends the streamed generation exactly where the per-token path ends it.
#[test]
fn stop_strings_end_llm_only_exactly_like_the_per_token_path() {
    let server = ServerProc::start();
    let prompt = Prompt::Text(PROMPT.into());
    let hlm = HybridEngine::new(server.engine_config(
        Mode::Hlm,
        Codec::default(),
        PolicyConfig::send_all(),
    ))
    .unwrap();
    let free = hlm
        .generate_blocking(
            prompt.clone(),
            greedy(24),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    // A stop string from the middle of the greedy text.
    let chars: Vec<char> = free.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let options = GenerationOptions {
        sampling: SamplingOptions {
            stop: vec![stop.clone()],
            ..SamplingOptions::greedy(24)
        },
        chat_template: false,
    };
    let per_token = hlm
        .generate_blocking(
            prompt.clone(),
            options.clone(),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(per_token.stop, StopReason::StopString, "stop {stop:?}");
    let llm = llm_engine(&server);
    let rec = Arc::new(Recorder::default());
    let streamed = llm
        .generate_blocking(prompt, options, rec.clone(), CancelToken::new())
        .unwrap();
    assert_eq!(streamed.stop, StopReason::StopString);
    assert_eq!(streamed.text, per_token.text);
    assert_eq!(streamed.token_ids, per_token.token_ids);
    assert_eq!(
        rec.token_ids(),
        streamed.token_ids,
        "tokens shown after the stop"
    );
}

#[test]
fn a_server_killed_mid_stream_leaves_the_device_to_finish_offline() {
    const MAX_TOKENS: u32 = 64;
    const KILL_AFTER: usize = 4;
    let mut server = ServerProc::start();
    let engine = llm_engine(&server);
    let killer = server.killer();
    let rec = Arc::new(Recorder::with_hook(move |e| {
        if e.position as usize + 1 == KILL_AFTER {
            killer.kill();
        }
    }));
    let prompt = Prompt::Text(PROMPT.into());
    let summary = engine
        .generate_blocking(
            prompt.clone(),
            greedy(MAX_TOKENS),
            rec.clone(),
            CancelToken::new(),
        )
        .expect("the generation completes without the server");
    assert_eq!(
        rec.token_ids(),
        summary.token_ids,
        "nothing shown was changed"
    );
    // Tokens already streamed before the kill stay; every later one is the device's own.
    let remote = summary
        .sources
        .iter()
        .take_while(|s| **s == TokenSource::Remote)
        .count();
    assert!(remote >= KILL_AFTER, "{:?}", summary.sources);
    assert!(
        summary.sources[remote..]
            .iter()
            .all(|s| *s == TokenSource::Offline),
        "{:?}",
        summary.sources
    );
    assert!(
        remote < summary.sources.len(),
        "the server finished before it was killed: {:?}",
        summary.sources
    );
    assert!(
        matches!(summary.stop, StopReason::MaxTokens | StopReason::Eos),
        "{:?}",
        summary.stop
    );
    if summary.stop == StopReason::MaxTokens {
        assert_eq!(summary.token_ids.len(), MAX_TOKENS as usize);
    }
    let s = &summary.stats;
    assert_eq!(s.remote, remote as u64);
    assert_eq!(s.offline, s.decisions - s.remote, "{s:?}");
    assert_eq!(s.drafted, s.offline);
    let ids = engine.tokenize_prompt(&prompt, false).unwrap();
    assert_eq!(
        summary.token_ids[..remote],
        llm_greedy(&ids, remote as u32)[..]
    );
    assert!(
        rec.links.lock().unwrap().iter().any(|(online, _)| !online),
        "no offline report"
    );
}

#[test]
fn cancelling_llm_only_stops_at_once_and_stops_the_server() {
    let server = ServerProc::start();
    let engine = llm_engine(&server);
    let cancel = CancelToken::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let rec = {
        let (cancel, seen) = (cancel.clone(), seen.clone());
        Arc::new(Recorder::with_hook(move |_| {
            if seen.fetch_add(1, Ordering::SeqCst) + 1 == 3 {
                cancel.cancel();
            }
        }))
    };
    let handle = engine.start(
        Prompt::Text("Count from one to one thousand:".into()),
        greedy(2000),
        rec,
        cancel,
    );
    assert_eq!(handle.wait_blocking().unwrap_err(), SdkError::Cancelled);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        3,
        "tokens were shown after cancel"
    );
    let stopped = server.wait_metric("uhlm_generations_stopped_total", |v| v == 1.0);
    assert_eq!(
        stopped, 1.0,
        "the server kept generating for a cancelled device"
    );
    assert!(server.metric("uhlm_tokens_generated_total") < 2000.0);
    assert_eq!(server.wait_metric("uhlm_sessions", |v| v == 0.0), 0.0);
    // The engine and the server serve the next generation.
    let summary = engine
        .generate_blocking(
            Prompt::Text("Hello".into()),
            greedy(4),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.stats.offline, 0);
    assert_eq!(summary.stats.remote, summary.stats.decisions);
}
