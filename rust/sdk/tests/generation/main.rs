//! The hybrid generation loop against an in-process scripted server: each test scripts one
//! path of `generation.rs` (offline fallback, resync, pipelining rollback, cancellation) and
//! asserts what the app sees (token ids, sources, counters, link events, the error) and what
//! the server was sent. The drafts come from a scripted model, so every expected token is
//! known without running a model; the cached draft GGUF only provides the tokenizer.

mod support;

use std::sync::{Arc, Mutex, mpsc};

use support::{DrafterHooks, Recorder, Script, ScriptedServer, Seen, draft_gguf, expected_output};
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationHandle, GenerationOptions, GenerationSummary,
    HybridEngine, Mode, PolicyConfig, Prompt, SamplingOptions, SdkError, TokenSource,
};

/// A server, an engine pointed at it and what the drafter reports.
struct Bench {
    server: ScriptedServer,
    engine: HybridEngine,
    truncations: Arc<Mutex<Vec<usize>>>,
    prompt_ids: Vec<u32>,
    // Last: the server and engine run on it.
    _rt: tokio::runtime::Runtime,
}

/// The prompt's length in tokens ("Hello" is one token of SmolLM2's vocabulary): the tests that
/// script by context length assume it.
const PROMPT_LEN: usize = 1;

fn prompt() -> Prompt {
    Prompt::Text("Hello".into())
}

fn options(max_tokens: u32) -> GenerationOptions {
    GenerationOptions {
        sampling: SamplingOptions::greedy(max_tokens),
        chat_template: false,
    }
}

/// A bench whose engine verifies every draft (HLM) with `max_lookahead`; `None` when the
/// tokenizer's model is not cached.
fn bench(script: Script, max_lookahead: usize) -> Option<Bench> {
    let config = EngineConfig {
        mode: Mode::Hlm,
        policy: PolicyConfig::send_all(),
        max_lookahead,
        extend_after: 0,
        ..EngineConfig::default()
    };
    bench_with(script, config, DrafterHooks::default())
}

/// A bench with the engine settings of `config` and a drafter with `hooks`.
fn bench_with(script: Script, config: EngineConfig, hooks: DrafterHooks) -> Option<Bench> {
    let slm_path = draft_gguf()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let truncations = hooks.truncations.clone();
    let server = ScriptedServer::start(&rt, script, hooks.drafted_from.clone());
    let engine = server.engine(&rt, slm_path, config, hooks);
    let prompt_ids = engine.tokenize_prompt(&prompt(), false).unwrap();
    Some(Bench {
        server,
        engine,
        truncations,
        prompt_ids,
        _rt: rt,
    })
}

impl Bench {
    /// Starts a 10-token generation with `cancel` and returns once the server holds its second
    /// `Verify` (the bench's script must hold at 1): a generation waiting for a verdict.
    fn start_held(&self, rec: &Arc<Recorder>, cancel: CancelToken) -> GenerationHandle {
        let handle = self
            .engine
            .start(prompt(), options(10), rec.clone(), cancel);
        assert!(
            self.server.wait_for(|l| l.holding),
            "the second Verify never came"
        );
        handle
    }

    fn generate(&self, max_tokens: u32, rec: &Arc<Recorder>) -> GenerationSummary {
        self.engine
            .generate_blocking(
                prompt(),
                options(max_tokens),
                rec.clone(),
                CancelToken::new(),
            )
            .unwrap()
    }
}

/// What the listener saw is the summary, position by position: nothing shown was revised.
fn assert_events_match(rec: &Recorder, summary: &GenerationSummary) {
    assert_eq!(rec.token_ids(), summary.token_ids);
    assert_eq!(rec.sources(), summary.sources);
    let positions: Vec<u32> = rec
        .tokens
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(
        positions,
        (0..summary.token_ids.len() as u32).collect::<Vec<_>>()
    );
}

/// The server drops the connection while a draft waits for its verdict: the generation ends
/// on the device, the waiting draft and every later one kept as `Offline`, no token lost or
/// repeated, and the listener told the link went down.
#[test]
fn a_dropped_connection_leaves_the_rest_of_the_generation_on_the_device() {
    let Some(b) = bench(
        Script {
            drop_after_verdicts: Some(3),
            ..Script::default()
        },
        0,
    ) else {
        return;
    };
    let rec = Arc::new(Recorder::default());
    let summary = b.generate(10, &rec);

    assert_eq!(summary.token_ids, expected_output(&b.prompt_ids, 10, &[]));
    let mut sources = vec![TokenSource::Accepted; 3];
    sources.extend([TokenSource::Offline; 7]);
    assert_eq!(summary.sources, sources);
    let s = &summary.stats;
    assert_eq!((s.accepted, s.offline, s.reconnects), (3, 7, 0), "{s:?}");
    assert_events_match(&rec, &summary);
    let links = rec.links();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(links[0].0 && !links[1].0, "{links:?}");
    let log = b.server.log();
    assert!(log.dropped);
    assert_eq!(log.verdicts, 3);
}

/// The server answers a `Verify` with `NeedResync`: the device sends its whole context (the
/// prompt and the tokens decided so far, exactly), then verifies the refused draft again; the
/// output is unchanged and every token verified.
#[test]
fn a_lost_server_context_is_resynced_and_the_generation_goes_on() {
    let Some(b) = bench(
        Script {
            need_resync_at: Some(2),
            ..Script::default()
        },
        0,
    ) else {
        return;
    };
    let rec = Arc::new(Recorder::default());
    let summary = b.generate(6, &rec);

    let expected = expected_output(&b.prompt_ids, 6, &[]);
    assert_eq!(summary.token_ids, expected);
    assert_eq!(summary.sources, vec![TokenSource::Accepted; 6]);
    let s = &summary.stats;
    assert_eq!((s.accepted, s.offline), (6, 0), "{s:?}");
    assert_events_match(&rec, &summary);
    assert_eq!(rec.links().len(), 1, "the link never went down");

    let log = b.server.log();
    let resyncs: Vec<&Vec<u32>> = log
        .seen
        .iter()
        .filter_map(|m| match m {
            Seen::Resync(c) => Some(c),
            _ => None,
        })
        .collect();
    let mut context = b.prompt_ids.clone();
    context.extend_from_slice(&expected[..2]);
    assert_eq!(resyncs, [&context]);
    // The refused draft goes again, at the position after the resynced context.
    let after = log
        .seen
        .iter()
        .skip_while(|m| !matches!(m, Seen::Resync(_)))
        .find_map(|m| match m {
            Seen::Verify(v) => Some(v),
            _ => None,
        })
        .expect("a Verify after the Resync");
    assert_eq!(after.position as usize, context.len());
    assert_eq!(after.draft.as_ref().map(|d| d.token), Some(expected[2]));
    context.extend_from_slice(&expected[2..]);
    assert_eq!(log.context, context);
}

/// Pipelining: the server holds the verdict on position 3 until the device has drafted two
/// tokens past it, then rejects it for its own token. What was drafted after it is dropped
/// (counted as discarded, the drafter rolled back to before it), the server's token is taken
/// and drafting goes on from it; the output is exactly what the server decided and nothing
/// shown was revised.
#[test]
fn a_rejection_drops_what_was_drafted_after_it() {
    const AT: usize = 3;
    const SERVER_TOKEN: u32 = 4321;
    let Some(b) = bench(
        Script {
            reject: Some((AT, SERVER_TOKEN)),
            reject_after_drafting: 2,
            ..Script::default()
        },
        4,
    ) else {
        return;
    };
    let rec = Arc::new(Recorder::default());
    let summary = b.generate(10, &rec);

    let expected = expected_output(&b.prompt_ids, 10, &[(AT, SERVER_TOKEN)]);
    assert_ne!(
        expected_output(&b.prompt_ids, 10, &[])[AT],
        SERVER_TOKEN,
        "the script must reject something"
    );
    assert_eq!(summary.token_ids, expected);
    let mut sources = vec![TokenSource::Accepted; 10];
    sources[AT] = TokenSource::Resampled;
    assert_eq!(summary.sources, sources);
    let s = &summary.stats;
    assert_eq!((s.resampled, s.offline), (1, 0), "{s:?}");
    assert!(s.discarded > 0, "nothing drafted past the rejection: {s:?}");
    assert_events_match(&rec, &summary);
    assert!(
        b.truncations
            .lock()
            .unwrap()
            .contains(&(b.prompt_ids.len() + AT)),
        "the drafter never rolled back to the rejected position: {:?}",
        b.truncations.lock().unwrap()
    );
    let log = b.server.log();
    let mut context = b.prompt_ids.clone();
    context.extend_from_slice(&expected);
    assert_eq!(log.context, context);
}

/// The verdict rejecting the first draft arrives while the draft after it is still running:
/// that draft followed the rejected token, so it is dropped when it finishes, and drafting
/// goes on from the server's token.
#[test]
fn a_draft_finishing_after_its_rejection_is_dropped() {
    const SERVER_TOKEN: u32 = 4321;
    let (open, gate) = mpsc::channel();
    let script = Script {
        reject: Some((0, SERVER_TOKEN)),
        reject_after_drafting: 1,
        open_gate: Some(open),
        ..Script::default()
    };
    let config = EngineConfig {
        mode: Mode::Hlm,
        policy: PolicyConfig::send_all(),
        max_lookahead: 4,
        ..EngineConfig::default()
    };
    let hooks = DrafterHooks {
        // The draft of output position 1, from the prompt and the rejected draft.
        gate: Some((PROMPT_LEN + 1, gate)),
        ..DrafterHooks::default()
    };
    let Some(b) = bench_with(script, config, hooks) else {
        return;
    };
    assert_eq!(b.prompt_ids.len(), PROMPT_LEN);
    let rec = Arc::new(Recorder::default());
    let summary = b.generate(6, &rec);

    assert_eq!(
        summary.token_ids,
        expected_output(&b.prompt_ids, 6, &[(0, SERVER_TOKEN)])
    );
    let mut sources = vec![TokenSource::Accepted; 6];
    sources[0] = TokenSource::Resampled;
    assert_eq!(summary.sources, sources);
    assert_events_match(&rec, &summary);
    assert!(b.truncations.lock().unwrap().contains(&PROMPT_LEN));
}

/// Cancelling while a verdict is outstanding ends the generation with `Cancelled` at once (not
/// after the request timeout), shows nothing more, and closes the server's session.
#[test]
fn cancelling_while_a_verdict_is_awaited_closes_the_session() {
    let Some(b) = bench(
        Script {
            hold_at: Some(1),
            ..Script::default()
        },
        0,
    ) else {
        return;
    };
    let rec = Arc::new(Recorder::default());
    let handle = b.start_held(&rec, CancelToken::new());
    handle.cancel();
    match handle.wait_blocking() {
        Err(SdkError::Cancelled) => {}
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert_eq!(
        rec.token_ids(),
        expected_output(&b.prompt_ids, 1, &[]),
        "only the verified token is shown"
    );
    assert!(
        b.server
            .wait_for(|l| matches!(l.seen.last(), Some(Seen::Close(_) | Seen::Ended(_)))),
        "{:?}",
        b.server.log().seen
    );
    let log = b.server.log();
    assert_eq!(log.seen.last(), Some(&Seen::Close("cancelled".into())));
}

/// `cancel_all` stops a generation started with a token the caller never cancels (the FFI's
/// `cancel` on behalf of foreign code).
#[test]
fn cancel_all_stops_the_generations_running() {
    let Some(b) = bench(
        Script {
            hold_at: Some(1),
            ..Script::default()
        },
        0,
    ) else {
        return;
    };
    let own = CancelToken::new();
    let handle = b.start_held(&Arc::new(Recorder::default()), own.clone());
    b.engine.cancel_all();
    match handle.wait_blocking() {
        Err(SdkError::Cancelled) => {}
        other => panic!("expected Cancelled, got {other:?}"),
    }
    assert!(own.is_cancelled(), "its own token says so");
}

/// Local tokens go ahead in `Extend`s of exactly `extend_after` once that many wait, and the
/// rest ride in the next `Verify`: the server is told every token once, in order, at the
/// positions its own state machine expects.
#[test]
fn local_tokens_go_ahead_in_extends_of_extend_after() {
    // A context of 4k tokens is uncertain: output positions 3, 7, 11
    // are sent, the runs of three local tokens between them are given ahead two at a time.
    let config = EngineConfig {
        mode: Mode::Uhlm,
        policy: PolicyConfig::fixed(0.5),
        max_lookahead: 0,
        extend_after: 2,
        ..EngineConfig::default()
    };
    let hooks = DrafterHooks {
        uncertain_every: 4,
        ..DrafterHooks::default()
    };
    let Some(b) = bench_with(Script::default(), config, hooks) else {
        return;
    };
    assert_eq!(b.prompt_ids.len(), PROMPT_LEN);
    let rec = Arc::new(Recorder::default());
    let summary = b.generate(12, &rec);

    let t = expected_output(&b.prompt_ids, 12, &[]);
    assert_eq!(summary.token_ids, t);
    let sources: Vec<TokenSource> = (0..12)
        .map(|i| {
            if i % 4 == 3 {
                TokenSource::Accepted
            } else {
                TokenSource::Local
            }
        })
        .collect();
    assert_eq!(summary.sources, sources);
    assert_eq!(summary.stats.extends, 3, "{:?}", summary.stats);
    assert_events_match(&rec, &summary);

    // The `Close` is sent as the generation ends; wait until the server has read it.
    assert!(
        b.server
            .wait_for(|l| matches!(l.seen.last(), Some(Seen::Close(_) | Seen::Ended(_)))),
        "{:?}",
        b.server.log().seen
    );
    let log = b.server.log();
    let sent: Vec<String> = log
        .seen
        .iter()
        .map(|m| match m {
            Seen::Start(p) => format!("start {p:?}"),
            Seen::Extend(e) => format!("extend {e:?}"),
            Seen::Verify(v) => format!(
                "verify @{} skipped {:?} draft {:?} chain {}",
                v.position,
                v.skipped,
                v.draft.as_ref().map(|d| d.token),
                v.chain.len()
            ),
            other => format!("{other:?}"),
        })
        .collect();
    let mut expected = vec![format!("start {:?}", b.prompt_ids)];
    for run in 0..3 {
        let at = run * 4;
        expected.push(format!("extend {:?}", &t[at..at + 2]));
        expected.push(format!(
            "verify @{} skipped {:?} draft {:?} chain 0",
            PROMPT_LEN + at + 3,
            [t[at + 2]],
            Some(t[at + 3])
        ));
    }
    expected.push(format!("{:?}", Seen::Close("done".into())));
    assert_eq!(sent, expected);
    let mut context = b.prompt_ids.clone();
    context.extend_from_slice(&t);
    assert_eq!(log.context, context);
}
