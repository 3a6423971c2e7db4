//! Hostile bytes on session streams: garbage, a truncated frame and an oversized length prefix
//! each end only their own stream (with an Error frame), while a well-behaved session on
//! another connection runs to the end with correct verdicts.

use crate::common;

use std::time::Duration;

use common::{API_KEY, Client, Mirror, Stream, greedy_verifies, llm, prompt_tokens, start};
use uhlm_core::protocol::{ErrorCode, Message};
use uhlm_server::{Server, ServerConfig};

/// Reads until the stream ends; returns the first Error code seen, if any.
async fn error_then_end(stream: &mut Stream) -> Option<ErrorCode> {
    let mut code = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(30), stream.recv())
        .await
        .expect("the server neither answered nor closed the stream")
    {
        if let (None, Message::Error(e)) = (code, &msg) {
            code = Some(e.code);
        }
    }
    code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_end_their_stream_only() {
    let model = llm();
    let config = ServerConfig::local(common::llm_path(), [API_KEY]);
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (addr, cert, fp) = (
        server.local_addr(),
        server.cert_der().to_vec(),
        server.model_fingerprint(),
    );

    let good = tokio::spawn({
        let (cert, model) = (cert.clone(), model.clone());
        async move {
            let (client, _control) = Client::ready(addr, &cert, fp).await;
            let mut s = client.session().await;
            let prompt = prompt_tokens(&model, "The three primary colours are");
            s.send(start(1, &prompt)).await;
            assert!(matches!(s.recv().await, Some(Message::Started(_))));
            let mut mirror = Mirror::new(&model, &prompt);
            greedy_verifies(&mut s, &mut mirror, 8, 3).await
        }
    });

    let (bad_client, _control) = Client::ready(addr, &cert, fp).await;
    // Garbage: a plausible length prefix followed by bytes that are no message.
    let mut garbage = bad_client.session().await;
    garbage
        .send_raw(&[0, 0, 0, 6, 0xff, 0xfe, 0xfd, 0x00, 0x13, 0x37])
        .await;
    assert_eq!(
        error_then_end(&mut garbage).await,
        Some(ErrorCode::MalformedFrame)
    );

    // Truncated: a frame announcing 100 bytes, 10 sent, then the stream finished.
    let mut truncated = bad_client.session().await;
    truncated
        .send_raw(&[0, 0, 0, 100, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .await;
    truncated.send.finish().unwrap();
    assert_eq!(
        error_then_end(&mut truncated).await,
        Some(ErrorCode::MalformedFrame)
    );

    // Oversized: a length prefix beyond the server's limit.
    let mut oversized = bad_client.session().await;
    oversized.send_raw(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await;
    assert_eq!(
        error_then_end(&mut oversized).await,
        Some(ErrorCode::FrameTooLarge)
    );

    // A valid message in the wrong place: Verify before Start.
    let mut early = bad_client.session().await;
    early
        .send(uhlm_core::protocol::Verify {
            seq: 0,
            position: 0,
            skipped: vec![],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        })
        .await;
    assert_eq!(
        error_then_end(&mut early).await,
        Some(ErrorCode::UnexpectedMessage)
    );

    // The connection that sent all this still works.
    let mut fine = bad_client.session().await;
    let prompt = prompt_tokens(&model, "Rust is a programming language that");
    fine.send(start(2, &prompt)).await;
    assert!(
        matches!(fine.recv().await, Some(Message::Started(_))),
        "connection unusable after bad streams"
    );
    let mut mirror = Mirror::new(&model, &prompt);
    greedy_verifies(&mut fine, &mut mirror, 2, 0).await.unwrap();

    good.await.unwrap().unwrap();
    let metrics = server.metrics_text();
    assert!(
        metrics.contains("uhlm_errors_total{code=\"MalformedFrame\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("uhlm_errors_total{code=\"FrameTooLarge\"} 1"),
        "{metrics}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_typed_errors() {
    let model = llm();
    let mut config = ServerConfig::local(common::llm_path(), [API_KEY]);
    config.max_context_tokens = 16;
    let server = Server::start_with_model(config, model.clone())
        .await
        .unwrap();
    let (client, _control) = Client::ready_on(&server).await;

    // A prompt longer than the context limit.
    let mut s = client.session().await;
    s.send(start(1, &[1; 17])).await;
    let Some(Message::Error(e)) = s.recv().await else {
        panic!("expected an error")
    };
    assert_eq!(e.code, ErrorCode::ContextTooLong);

    // A token outside the vocabulary.
    let mut s = client.session().await;
    s.send(start(2, &[1, 2, u32::MAX])).await;
    let Some(Message::Error(e)) = s.recv().await else {
        panic!("expected an error")
    };
    assert_eq!(e.code, ErrorCode::InvalidRequest);

    // Undecodable draft bytes, and a wrong position.
    let mut s = client.session().await;
    s.send(start(3, &[1, 2, 3])).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    s.send(uhlm_core::protocol::Verify {
        seq: 5,
        position: 4,
        skipped: vec![],
        draft: None,
        uncertainty: 0.0,
        chain: Vec::new(),
    })
    .await;
    let Some(Message::Error(e)) = s.recv().await else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.seq), (ErrorCode::PositionMismatch, Some(5)));
    s.send(uhlm_core::protocol::Resync {
        context: vec![1, 2, 3],
    })
    .await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    s.send(uhlm_core::protocol::Verify {
        seq: 6,
        position: 3,
        skipped: vec![],
        draft: Some(uhlm_core::protocol::Draft {
            token: 1,
            q: vec![9, 9, 9],
        }),
        uncertainty: 0.0,
        chain: Vec::new(),
    })
    .await;
    let Some(Message::Error(e)) = s.recv().await else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, Some(6)));

    // A generation of no token: said in words, not as a wrong phase.
    let mut s = client.session().await;
    s.send(start(4, &[1, 2, 3])).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    s.send(uhlm_core::protocol::Generate {
        seq: 7,
        max_tokens: 0,
    })
    .await;
    let Some(Message::Error(e)) = s.recv().await else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.seq), (ErrorCode::InvalidRequest, Some(7)));
    assert_eq!(e.message, "Generate.max_tokens must be at least 1");
    server.shutdown().await;
}

/// Before it has said Hello, a peer may make the server buffer no more than the connection's
/// receive window (4 frames' worth): eight streams each pushing 2 MiB that the server never
/// reads get about 4 MiB through in all, then QUIC's flow control stops them. (quinn's default
/// connection window is unlimited: the same peer used to park ~10 MB here, and hundreds of MB
/// with more streams.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_can_make_the_server_buffer_only_its_window() {
    let config = ServerConfig::local(common::llm_path(), [API_KEY]);
    let window = 4 * (u64::from(config.max_frame_bytes) + 64 * 1024);
    let server = Server::start_with_model(config, llm()).await.unwrap();
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    // The control stream: the start of a Hello that never comes (the server waits for it).
    let (mut control, _control_recv) = client.conn.open_bi().await.unwrap();
    control.write_all(&100u32.to_be_bytes()).await.unwrap();
    let mut pushers = Vec::new();
    for _ in 0..8 {
        let (mut send, _recv) = client.conn.open_bi().await.unwrap();
        pushers.push(tokio::spawn(async move {
            let chunk = vec![0x55u8; 16 * 1024];
            let mut sent = 0u64;
            // Each write returns once QUIC has credit for it; a stalled one means none is left.
            while sent < 2 << 20 {
                match tokio::time::timeout(Duration::from_secs(3), send.write(&chunk)).await {
                    Ok(Ok(n)) => sent += n as u64,
                    _ => break,
                }
            }
            sent
        }));
    }
    let mut total = 0;
    for p in pushers {
        total += p.await.unwrap();
    }
    assert!(
        total <= window,
        "the peer got {total} bytes into the server, over the {window}-byte window"
    );
    // It did get some through: the streams were open and the window was used.
    assert!(total >= window / 2, "only {total} bytes went through");
    server.shutdown().await;
}
