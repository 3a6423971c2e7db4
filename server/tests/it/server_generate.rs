//! `Generate` (LLM-only streaming) against an in-process server and the real LLM: the streamed
//! tokens are the LLM's own greedy continuation, cancelling or leaving stops the server's work,
//! long generations do not starve verification, and the limits answer with typed errors.

use crate::common;

use std::time::Duration;

use common::{API_KEY, Client, Mirror, Stream, greedy_verifies, llm, metric, prompt_tokens, start};
use uhlm_core::protocol::{
    Cancel, ErrorCode, FinishReason, Finished, Generate, Message, SessionStream, Side,
};
use uhlm_core::sampling::SamplingOptions;
use uhlm_server::{Server, ServerConfig, ServerHandle};

const PROMPT: &str = "The three most important inventions of the twentieth century are";

async fn server_with(config: impl FnOnce(&mut ServerConfig)) -> ServerHandle {
    let mut c = ServerConfig::local(common::llm_path(), [API_KEY]);
    c.batch_wait = Duration::ZERO;
    config(&mut c);
    Server::start_with_model(c, llm())
        .await
        .expect("start server")
}

/// What the LLM alone generates greedily after `prompt` (EOS excluded), as `uhlm_model` does it.
fn llm_greedy(prompt: &[u32], max_tokens: u32) -> Vec<u32> {
    let model = llm();
    let mut session = model.session();
    let opts = SamplingOptions::greedy(max_tokens);
    let mut rng = rand::rng();
    uhlm_model::generate::generate(&mut session, prompt, &opts, &mut rng, |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("reference generation")
    .tokens
}

/// Polls a metric until `ok` (bounded by a generous deadline); returns the last value.
async fn wait_metric(server: &ServerHandle, name: &str, ok: impl Fn(f64) -> bool) -> f64 {
    for _ in 0..400 {
        let v = metric(server, name);
        if ok(v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    metric(server, name)
}

/// A started session on a fresh connection, and the device-side state machine that checks
/// every message the server sends. The client and its control stream keep the connection up.
async fn started_session(
    server: &ServerHandle,
    prompt: &[u32],
) -> ((Client, Stream), Stream, SessionStream) {
    let (client, control) = Client::ready_on(server).await;
    let mut s = client.session().await;
    let mut state = SessionStream::new();
    let msg = Message::Start(start(1, prompt));
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    let reply = s.recv().await.expect("Started");
    state.on_message(Side::Server, &reply).unwrap();
    assert!(matches!(reply, Message::Started(_)), "{reply:?}");
    ((client, control), s, state)
}

/// Sends `Generate` and collects its answer: the tokens, then `Finished` or the `Error`.
async fn generate(
    s: &mut Stream,
    state: &mut SessionStream,
    seq: u32,
    max_tokens: u32,
) -> (Vec<u32>, Message) {
    let msg = Message::Generate(Generate { seq, max_tokens });
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    let mut tokens = Vec::new();
    loop {
        let reply = s.recv().await.expect("an answer to Generate");
        state
            .on_message(Side::Server, &reply)
            .unwrap_or_else(|c| panic!("{reply:?} breaks the protocol: {c}"));
        match reply {
            Message::Tokens(t) => {
                assert_eq!(t.seq, seq);
                tokens.extend(t.tokens);
            }
            end => return (tokens, end),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_is_the_llm_alone_across_requests() {
    // A small per-request cap, so the continuation spans several Generates.
    let server = server_with(|c| c.max_generate_tokens = 8).await;
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    let expected = llm_greedy(&prompt, 20);
    assert_eq!(
        expected.len(),
        20,
        "the reference hit EOS; pick another prompt"
    );
    let (_client, mut s, mut state) = started_session(&server, &prompt).await;

    let mut got = Vec::new();
    let mut seq = 0;
    while got.len() < 20 {
        let want = (20 - got.len()).min(8) as u32;
        let (tokens, end) = generate(&mut s, &mut state, seq, want).await;
        assert_eq!(tokens.len(), want as usize);
        got.extend(tokens);
        let Message::Finished(f) = end else {
            panic!("expected Finished, got {end:?}")
        };
        assert_eq!(
            f,
            Finished {
                seq,
                reason: FinishReason::MaxTokens,
                context_len: (prompt.len() + got.len()) as u32,
            }
        );
        seq += 1;
    }
    assert_eq!(
        got, expected,
        "Generate differs from the LLM's greedy output"
    );

    // More than the server allows per request: refused, typed, and answering this seq.
    let msg = Message::Generate(Generate { seq, max_tokens: 9 });
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    match s.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!(
                (e.code, e.seq),
                (ErrorCode::InvalidRequest, Some(seq)),
                "{e}"
            );
            assert!(e.message.contains("limit of 8"), "{e}");
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    assert_eq!(metric(&server, "uhlm_tokens_generated_total"), 20.0);
    assert_eq!(metric(&server, "uhlm_generate_requests_total"), 3.0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_generation_and_the_session_goes_on() {
    let server = server_with(|_| {}).await;
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    let (_client, mut s, mut state) = started_session(&server, &prompt).await;
    let long = 2000;
    let msg = Message::Generate(Generate {
        seq: 5,
        max_tokens: long,
    });
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    let mut tokens = Vec::new();
    while tokens.len() < 3 {
        let reply = s.recv().await.expect("Tokens");
        state.on_message(Side::Server, &reply).unwrap();
        let Message::Tokens(t) = reply else {
            panic!("expected Tokens, got {reply:?}")
        };
        tokens.extend(t.tokens);
    }
    let cancel = Message::Cancel(Cancel { seq: 5 });
    state.on_message(Side::Device, &cancel).unwrap();
    s.send(cancel).await;
    let finished = loop {
        let reply = s.recv().await.expect("Finished after Cancel");
        state.on_message(Side::Server, &reply).unwrap();
        match reply {
            Message::Tokens(t) => tokens.extend(t.tokens),
            Message::Finished(f) => break f,
            other => panic!("expected Tokens or Finished, got {other:?}"),
        }
    };
    assert_eq!(finished.reason, FinishReason::Cancelled);
    assert_eq!(
        finished.context_len as usize,
        prompt.len() + tokens.len(),
        "every token sampled was streamed"
    );
    assert!(tokens.len() < long as usize);
    assert_eq!(metric(&server, "uhlm_generations_stopped_total"), 1.0);
    assert_eq!(
        metric(&server, "uhlm_tokens_generated_total"),
        tokens.len() as f64,
        "the server sampled tokens nobody received"
    );

    // The context is intact: the next Generate continues the greedy sequence exactly.
    let (more, end) = generate(&mut s, &mut state, 6, 4).await;
    assert!(matches!(end, Message::Finished(_)), "{end:?}");
    let expected = llm_greedy(&prompt, (tokens.len() + 4) as u32);
    let mut all = tokens.clone();
    all.extend(more);
    assert_eq!(all, expected);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_goes_away_stops_the_generation() {
    let server = server_with(|_| {}).await;
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    let ((client, _control), mut s, mut state) = started_session(&server, &prompt).await;
    let msg = Message::Generate(Generate {
        seq: 0,
        max_tokens: 2000,
    });
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    assert!(matches!(s.recv().await, Some(Message::Tokens(_))));
    // No Cancel, no Close: the stream is reset and the connection dropped.
    s.send.reset(0u32.into()).ok();
    s.recv.stop(0u32.into()).ok();
    client.conn.close(0u32.into(), b"gone");
    let stopped = wait_metric(&server, "uhlm_generations_stopped_total", |v| v == 1.0).await;
    assert_eq!(stopped, 1.0, "the generation outlived its device");
    let sessions = wait_metric(&server, "uhlm_sessions", |v| v == 0.0).await;
    assert_eq!(sessions, 0.0);
    let generated = metric(&server, "uhlm_tokens_generated_total");
    assert!(generated < 2000.0, "{generated}");
    server.shutdown().await;
}

/// One worker, one long generation: a `Verify` from another session is answered between two of
/// its tokens, not after the generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_generation_does_not_starve_verification() {
    let server = server_with(|c| c.workers = 1).await;
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    let (_client, mut a, mut a_state) = started_session(&server, &prompt).await;
    let long = 1000;
    let msg = Message::Generate(Generate {
        seq: 0,
        max_tokens: long,
    });
    a_state.on_message(Side::Device, &msg).unwrap();
    a.send(msg).await;
    assert!(matches!(a.recv().await, Some(Message::Tokens(_))));

    let other = prompt_tokens(&model, "The capital of France is");
    let (_client_b, mut b, _) = started_session(&server, &other).await;
    let mut mirror = Mirror::new(&model, &other);
    greedy_verifies(&mut b, &mut mirror, 2, 0).await.unwrap();
    let generated = metric(&server, "uhlm_tokens_generated_total");
    assert!(
        generated < f64::from(long),
        "the verifies waited for the whole generation ({generated} tokens)"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_context_ends_the_generation_and_refuses_the_next() {
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    let limit = prompt.len() as u32 + 3;
    let server = server_with(|c| c.max_context_tokens = limit).await;
    let (_client, mut s, mut state) = started_session(&server, &prompt).await;
    let (tokens, end) = generate(&mut s, &mut state, 1, 10).await;
    assert_eq!(tokens, llm_greedy(&prompt, 3));
    assert_eq!(
        end,
        Message::Finished(Finished {
            seq: 1,
            reason: FinishReason::ContextFull,
            context_len: limit,
        })
    );
    let msg = Message::Generate(Generate {
        seq: 2,
        max_tokens: 1,
    });
    state.on_message(Side::Device, &msg).unwrap();
    s.send(msg).await;
    match s.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!((e.code, e.seq), (ErrorCode::ContextTooLong, Some(2)), "{e}")
        }
        other => panic!("expected ContextTooLong, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_generation_messages_are_refused() {
    let server = server_with(|_| {}).await;
    let model = llm();
    let prompt = prompt_tokens(&model, PROMPT);
    // Generate before Start.
    let (client, _control) = Client::ready_on(&server).await;
    let mut s = client.session().await;
    s.send(Generate {
        seq: 0,
        max_tokens: 4,
    })
    .await;
    match s.recv().await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UnexpectedMessage, "{e}"),
        other => panic!("expected UnexpectedMessage, got {other:?}"),
    }
    // A Generate for no token.
    let (_c, mut s, _) = started_session(&server, &prompt).await;
    s.send(Generate {
        seq: 0,
        max_tokens: 0,
    })
    .await;
    match s.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, Some(0)), "{e}")
        }
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    // A second request while generating.
    let (_c, mut s, _) = started_session(&server, &prompt).await;
    s.send(Generate {
        seq: 0,
        max_tokens: 1000,
    })
    .await;
    s.send(Generate {
        seq: 1,
        max_tokens: 1,
    })
    .await;
    let end = loop {
        match s.recv().await {
            Some(Message::Tokens(_)) => {}
            other => break other,
        }
    };
    match end {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::UnexpectedMessage, "{e}"),
        other => panic!("expected UnexpectedMessage, got {other:?}"),
    }
    let stopped = wait_metric(&server, "uhlm_generations_stopped_total", |v| v == 1.0).await;
    assert_eq!(stopped, 1.0, "the refused stream's generation kept running");
    server.shutdown().await;
}
