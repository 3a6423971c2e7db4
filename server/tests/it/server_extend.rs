//! `Extend`: tokens a device committed, given to the server ahead of its next `Verify`, are
//! scored before that `Verify` comes, so that it pays for its own row only; and an `Extend` the
//! server refuses fails the session's next request with the reason.

use crate::common;
use crate::server_fairness::next;

use common::{API_KEY, Client, Stream, llm, prompt_tokens, start};
use uhlm_core::protocol::{ErrorCode, Extend, Message};
use uhlm_core::sampling::argmax;
use uhlm_server::{Server, ServerConfig, ServerHandle};

async fn server(max_context_tokens: u32) -> ServerHandle {
    Server::start_with_model(
        ServerConfig {
            workers: 1,
            max_context_tokens,
            ..ServerConfig::local(common::llm_path(), [API_KEY])
        },
        llm(),
    )
    .await
    .unwrap()
}

async fn open(s: &mut Stream, prompt: &[u32]) {
    s.send(start(1, prompt)).await;
    match s.recv().await {
        Some(Message::Started(_)) => {}
        other => panic!("expected Started, got {other:?}"),
    }
}

async fn wait_for_metric(server: &ServerHandle, name: &str, at_least: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while common::metric(server, name) < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} stayed below {at_least}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_sent_ahead_are_scored_before_the_verify_that_follows_them() {
    let model = llm();
    let server = server(4096).await;
    let (client, _control) = Client::ready_on(&server).await;
    let prompt = prompt_tokens(&model, "The capital of France is");
    let ahead = prompt_tokens(
        &model,
        " Paris, and the capital of Italy is Rome; of Spain,",
    );
    let mut s = client.session().await;
    open(&mut s, &prompt).await;
    // The prompt in (all but its last token, which the first Verify scores).
    wait_for_metric(
        &server,
        "uhlm_prefilled_tokens_total",
        (prompt.len() - 1) as f64,
    )
    .await;
    s.send(Extend {
        tokens: ahead.clone(),
    })
    .await;
    // Scored with no request waiting: everything but the last extended token.
    let scored = (prompt.len() - 1 + ahead.len()) as f64;
    wait_for_metric(&server, "uhlm_prefilled_tokens_total", scored).await;
    assert_eq!(
        common::metric(&server, "uhlm_extended_tokens_total"),
        ahead.len() as f64
    );
    let before = common::metric(&server, "uhlm_forward_tokens_total");
    let context: Vec<u32> = prompt.iter().chain(&ahead).copied().collect();
    s.send(next(0, context.len())).await;
    let token = match s.recv().await {
        Some(Message::Verdict(v)) => v.token,
        other => panic!("expected a Verdict, got {other:?}"),
    };
    // The Verify's pass scored one token: the last one sent ahead, whose logits decide it.
    assert_eq!(
        common::metric(&server, "uhlm_forward_tokens_total") - before,
        1.0
    );
    let mut session = model.session();
    assert_eq!(
        token,
        argmax(&session.score_last(&context).unwrap()).unwrap()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_extend_fails_the_next_request_with_its_reason() {
    let model = llm();
    let server = server(64).await;
    let (client, _control) = Client::ready_on(&server).await;
    let prompt = prompt_tokens(&model, "The capital of France is");
    let vocab = model.info().vocab_size as u32;
    for (tokens, code, words) in [
        (
            vec![1, vocab],
            ErrorCode::InvalidRequest,
            "outside the vocabulary",
        ),
        (
            vec![1; 64],
            ErrorCode::ContextTooLong,
            "over the limit of 64",
        ),
    ] {
        let mut s = client.session().await;
        open(&mut s, &prompt).await;
        s.send(Extend {
            tokens: tokens.clone(),
        })
        .await;
        s.send(next(0, prompt.len() + tokens.len())).await;
        match s.recv().await {
            Some(Message::Error(e)) => {
                assert_eq!((e.code, e.seq), (code, Some(0)));
                assert!(e.message.contains(words), "{}", e.message);
            }
            other => panic!("expected an Error, got {other:?}"),
        }
    }
    // An empty one is refused by the stream's rules at once.
    let mut s = client.session().await;
    open(&mut s, &prompt).await;
    s.send(Extend { tokens: vec![] }).await;
    match s.recv().await {
        Some(Message::Error(e)) => {
            assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, None));
            assert_eq!(e.message, "an Extend must carry tokens");
        }
        other => panic!("expected an Error, got {other:?}"),
    }
    server.shutdown().await;
}
