//! One device's long prompt against another device's short requests: the worker catches the
//! long context up a chunk at a time, between the other requests, and stops once nobody wants
//! the work.

use crate::common;

use common::{API_KEY, Client, Stream, llm, prompt_tokens, start};
use uhlm_core::protocol::{Message, Verify};
use uhlm_core::sampling::argmax;
use uhlm_server::{Server, ServerConfig, ServerHandle};

const CHUNK: usize = 8;

async fn server() -> ServerHandle {
    Server::start_with_model(
        ServerConfig {
            prefill_chunk_tokens: CHUNK,
            workers: 1,
            ..ServerConfig::local(common::llm_path(), [API_KEY])
        },
        llm(),
    )
    .await
    .unwrap()
}

/// About `n` tokens of plain English.
fn long_prompt(n: usize) -> Vec<u32> {
    let model = llm();
    let sentence = prompt_tokens(&model, "The quick brown fox jumps over the lazy dog. ");
    let mut tokens = prompt_tokens(&model, "A story:");
    while tokens.len() < n {
        tokens.extend_from_slice(&sentence[1.min(sentence.len())..]);
    }
    tokens.truncate(n);
    tokens
}

/// `Verify` without a draft (the server samples; greedy here): the next token of a context of
/// `len` tokens.
fn next(seq: u32, len: usize) -> Verify {
    Verify {
        seq,
        position: len as u32,
        skipped: Vec::new(),
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    }
}

async fn started(s: &mut Stream) {
    match s.recv().await {
        Some(Message::Started(_)) => {}
        other => panic!("expected Started, got {other:?}"),
    }
}

fn verdict_token(m: Option<Message>) -> u32 {
    match m {
        Some(Message::Verdict(v)) => v.token,
        other => panic!("expected a Verdict, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_delays_another_device_by_a_chunk_not_by_its_whole_prefill() {
    let model = llm();
    let server = server().await;
    let (client, _control) = Client::ready_on(&server).await;
    let long = long_prompt(400);
    let short = prompt_tokens(&model, "The capital of France is");

    let mut a = client.session().await;
    a.send(start(1, &long)).await;
    started(&mut a).await;
    a.send(next(0, long.len())).await;
    // Another device starts and asks for a token while the long prompt is being scored.
    let mut b = client.session().await;
    b.send(start(2, &short)).await;
    started(&mut b).await;
    b.send(next(0, short.len())).await;
    // The long prompt's answer must not come first: it needs 50 chunks, the short one's a
    // single forward pass between two of them. (Scored in one pass, the long prompt held the
    // worker until its own Verify was answered, and only then did the other device get in.)
    let b_token = tokio::select! {
        biased;
        m = a.recv() => panic!("the long prompt was answered first: {m:?}"),
        m = b.recv() => verdict_token(m),
    };
    let a_token = verdict_token(a.recv().await);

    // Chunked or not, the answers are the model's greedy tokens for the whole context.
    let greedy = |context: &[u32]| {
        let mut session = model.session();
        argmax(&session.score_last(context).unwrap()).unwrap()
    };
    assert_eq!(b_token, greedy(&short));
    assert_eq!(a_token, greedy(&long));
    // The long prompt but its last token went through the catch-up queue (the short one
    // too, unless its Verify came before its turn and scored it directly: one chunk either way).
    let prefilled = common::metric(&server, "uhlm_prefilled_tokens_total") as usize;
    assert!(
        (long.len() - 1..=long.len() + short.len() - 2).contains(&prefilled),
        "{prefilled}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_stops_when_the_device_is_gone() {
    let server = server().await;
    let (client, _control) = Client::ready_on(&server).await;
    let long = long_prompt(2000);
    let mut a = client.session().await;
    a.send(start(1, &long)).await;
    started(&mut a).await;
    a.send(next(0, long.len())).await;
    // The device gives up at once: its stream goes away, the server closes the session.
    drop(a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let metric = |name: &str| common::metric(&server, name);
    while metric("uhlm_sessions") > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the session never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Another device's request through the one worker: once it is answered, the worker has
    // finished whatever pass it was in; nothing more was scored for the closed session.
    let short = [1, 2, 3];
    let mut b = client.session().await;
    b.send(start(2, &short)).await;
    started(&mut b).await;
    b.send(next(0, short.len())).await;
    verdict_token(b.recv().await);
    let prefilled = metric("uhlm_prefilled_tokens_total") - (short.len() - 1) as f64;
    assert!(
        prefilled < (long.len() - 1) as f64,
        "the whole prompt was scored for a device that had gone: {prefilled}"
    );
    server.shutdown().await;
}
