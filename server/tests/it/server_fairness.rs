//! One device's long prompt against another device's short requests: the worker catches the
//! long context up a chunk at a time, between the other requests, and stops once nobody wants
//! the work.

use crate::common;

use crate::server_sessions::greedy_chain;
use common::{API_KEY, Client, Mirror, Stream, llm, prompt_tokens, start};
use uhlm_core::codec::{self, Codec};
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
pub(crate) fn next(seq: u32, len: usize) -> Verify {
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

/// The attack of issue 39: one device's chain carries 1,200 skipped tokens in its links
/// (tokens a prompt would send chunked); another device's short request must not wait for
/// them, and once the first device is gone nothing more is computed for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_many_skipped_tokens_delays_another_device_by_a_chunk_not_by_the_chain() {
    // Four dense drafts of SmolLM2's vocabulary fill most of a frame.
    const LINKS: usize = 4;
    const SKIPPED: usize = 400;
    let model = llm();
    let server = server().await;
    let metric = |name: &str| common::metric(&server, name);
    // Two connections: the first device's goes away, the other's stays.
    let (client_a, control_a) = Client::ready_on(&server).await;
    let (client_b, _control_b) = Client::ready_on(&server).await;
    let prompt = prompt_tokens(&model, "A story:");
    let mut a = client_a.session().await;
    a.send(start(1, &prompt)).await;
    started(&mut a).await;
    // Drafts the LLM accepts (its own greedy tokens, each drafted from a spread distribution),
    // so that the whole chain has to be scored.
    let mut mirror = Mirror::new(&model, &prompt);
    let mut gaps = vec![SKIPPED; LINKS];
    gaps[0] = 0;
    let (verify, _) = tokio::task::block_in_place(|| greedy_chain(&mut mirror, &gaps, None));
    let chain_tokens: usize = verify.chain.iter().map(|l| l.skipped.len() + 1).sum();
    let started_at = metric("uhlm_forward_tokens_total");
    a.send(verify).await;
    // The chain is being scored when the other device asks.
    while metric("uhlm_forward_tokens_total") == started_at {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let short = prompt_tokens(&model, "The capital of France is");
    let mut b = client_b.session().await;
    b.send(start(2, &short)).await;
    started(&mut b).await;
    let asked_at = metric("uhlm_forward_tokens_total");
    b.send(next(0, short.len())).await;
    let b_token = tokio::select! {
        biased;
        m = a.recv() => panic!("the chain was answered first: {m:?}"),
        m = b.recv() => verdict_token(m),
    };
    let scored = metric("uhlm_forward_tokens_total") - asked_at;
    let greedy = {
        let mut session = model.session();
        argmax(&session.score_last(&short).unwrap()).unwrap()
    };
    assert_eq!(b_token, greedy);
    // Answered after the pass running when it came and its own, each holding at most a chunk
    // of the chain (the passes after it, until the metric was read, hold a chunk each too);
    // scored in one pass, the chain alone was 1,200 tokens.
    assert!(
        scored < (chain_tokens / 4) as f64,
        "{scored} tokens scored before the short request was answered (the chain: \
         {chain_tokens})"
    );
    // The first device goes away: its session is released and its chain no longer scored.
    drop(a);
    drop(client_a);
    drop(control_a);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric("uhlm_sessions") > 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gone device's session was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let settled = metric("uhlm_forward_tokens_total");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        metric("uhlm_forward_tokens_total"),
        settled,
        "the worker went on scoring for a device that had gone"
    );
    assert!(
        settled - started_at < (chain_tokens + short.len()) as f64,
        "the whole chain was scored for a device that had gone"
    );
    server.shutdown().await;
}

/// Issue 39's third attack in small: a chain of 32 links, each after a few skipped tokens,
/// asks for a row of logits per link (49,152 floats each for SmolLM2) besides its tokens'
/// activations: in one pass about 34 MB, more than the budget. The pass's memory counts
/// against the budget: the chain is decided in passes that each fit, whole and right, and the
/// worker's accounting (the model's `PassCost`, which `rust/model/tests/score_memory.rs` checks
/// against what a pass really allocates) never has caches and a pass over the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_many_links_is_scored_within_the_memory_budget() {
    const BUDGET: u64 = 30_000_000;
    let model = llm();
    let server = Server::start_with_model(
        ServerConfig {
            kv_memory_budget_bytes: BUDGET,
            workers: 1,
            ..ServerConfig::local(common::llm_path(), [API_KEY])
        },
        model.clone(),
    )
    .await
    .unwrap();
    let metric = |name: &str| common::metric(&server, name);
    let (client, _control) = Client::ready_on(&server).await;
    let prompt = prompt_tokens(&model, "A story:");
    let mut s = client.session().await;
    s.send(start(1, &prompt)).await;
    started(&mut s).await;
    let mut mirror = Mirror::new(&model, &prompt);
    let mut gaps = vec![3; 32];
    gaps[0] = 0;
    let (mut verify, greedy) =
        tokio::task::block_in_place(|| greedy_chain(&mut mirror, &gaps, None));
    // The drafts' distributions in the SDK's own codec: 32 dense ones exceed a frame.
    let compress = |q: &mut Vec<u8>| {
        let dense = codec::decode(q, None).unwrap();
        *q = codec::encode(&Codec::default(), &dense).unwrap().bytes;
    };
    compress(&mut verify.draft.as_mut().unwrap().q);
    verify
        .chain
        .iter_mut()
        .for_each(|link| compress(&mut link.draft.q));
    let rows: usize = verify
        .chain
        .iter()
        .map(|l| l.skipped.len() + 1)
        .sum::<usize>()
        + 1;
    let passes_before = metric("uhlm_forward_passes_total");
    s.send(verify).await;
    let v = match s.recv().await {
        Some(Message::Verdict(v)) => v,
        other => panic!("expected a Verdict, got {other:?}"),
    };
    assert!(v.accepted, "{v:?}");
    assert_eq!(v.link(), gaps.len() - 1, "every link decided: {v:?}");
    assert_eq!(v.token, *greedy.last().unwrap());
    let passes = metric("uhlm_forward_passes_total") - passes_before;
    assert!(
        passes >= 2.0,
        "{rows} rows and 32 rows of logits in {passes} pass(es)"
    );
    let peak = metric("uhlm_memory_peak_bytes");
    assert!(peak > 0.0, "the worker counts its passes");
    assert!(
        peak <= BUDGET as f64,
        "caches and a pass held {peak} bytes against a budget of {BUDGET}"
    );
    server.shutdown().await;
}
