//! The SDK against a fake server that breaks the protocol on purpose.

use crate::e2e_common;

use std::sync::Arc;

use e2e_common::{Recorder, draft_path};
use rustls::pki_types::PrivateKeyDer;
use uhlm_core::protocol::{
    ALPN, DEFAULT_MAX_FRAME_BYTES, FrameDecoder, Message, PROTOCOL_VERSION, Prompt as WirePrompt,
    Started, Verdict, Welcome, encode_frame,
};
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationOptions, HybridEngine, Mode, PolicyConfig, Prompt,
    SamplingOptions, TokenSource,
};

/// Reads one message from a stream.
async fn read_message(recv: &mut quinn::RecvStream) -> Message {
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(m) = decoder.next_frame().unwrap() {
            return m;
        }
        let n = recv.read(&mut buf).await.unwrap().expect("stream ended");
        decoder.push(&buf[..n]);
    }
}

async fn write_message(send: &mut quinn::SendStream, msg: &Message) {
    send.write_all(&encode_frame(msg, u32::MAX).unwrap())
        .await
        .unwrap();
}

/// What a fake server does on a session stream after the handshake.
type Script = fn(
    quinn::SendStream,
    quinn::RecvStream,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Runs `script` as a fake server's first session (after an honest handshake whose `Welcome`
/// accepts frames of any size), lets an engine generate `tokens` greedily in HLM mode (every
/// token sent), and returns the summary with the link events the listener saw.
fn generate_against(
    script: Script,
    tokens: u32,
) -> (uhlm_sdk::GenerationSummary, Vec<(bool, String)>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = rt.block_on(async {
        quinn::Endpoint::server(
            quinn::ServerConfig::with_crypto(Arc::new(crypto)),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap()
    });
    let addr = endpoint.local_addr().unwrap();
    let fake = rt.spawn(async move {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut control_send, mut control_recv) = conn.accept_bi().await.unwrap();
        assert!(matches!(
            read_message(&mut control_recv).await,
            Message::Hello(_)
        ));
        let welcome = Message::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            server: "fake".into(),
            max_frame_bytes: u32::MAX,
            max_context_tokens: 8192,
            max_generate_tokens: 64,
            max_chain_links: 16,
        });
        write_message(&mut control_send, &welcome).await;
        let (send, recv) = conn.accept_bi().await.unwrap();
        script(send, recv).await;
        // Hold everything open; the test ends the task.
        std::future::pending::<()>().await;
        drop((control_send, control_recv, conn, endpoint));
    });

    let engine = HybridEngine::with_runtime(
        EngineConfig {
            slm_path: draft_path(),
            server: Some(addr.to_string()),
            pin: Some(uhlm_server::cert_fingerprint(&der)),
            api_key: "k".into(),
            mode: Mode::Hlm,
            policy: PolicyConfig::send_all(),
            threads: Some(1),
            request_timeout_ms: 5_000,
            ..EngineConfig::default()
        },
        rt.handle().clone(),
    )
    .unwrap();
    let rec = Arc::new(Recorder::default());
    let summary = engine
        .generate_blocking(
            Prompt::Text("Hello".into()),
            GenerationOptions {
                sampling: SamplingOptions::greedy(tokens),
                chat_template: false,
            },
            rec.clone(),
            CancelToken::new(),
        )
        .unwrap();
    fake.abort();
    let links = rec.links.lock().unwrap().clone();
    (summary, links)
}

/// A server that says it accepts frames of any size, then answers `Start` with the header of
/// a 2 MiB frame. The protocol caps frames at 1 MiB whatever the server accepts: the device
/// refuses the frame at its header (it used to wait for the 2 MiB, here until its 5 s timeout).
#[test]
fn a_server_frame_over_the_protocol_limit_is_refused_at_its_header() {
    let (summary, links) = generate_against(
        |mut send, mut recv| {
            Box::pin(async move {
                assert!(matches!(read_message(&mut recv).await, Message::Start(_)));
                send.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
                std::future::pending::<()>().await;
            })
        },
        2,
    );
    assert_eq!(summary.stats.offline, summary.token_ids.len() as u64);
    assert!(
        links
            .iter()
            .any(|(online, why)| !online && why.contains("exceeds the limit")),
        "{links:?}"
    );
}

/// A server whose `Verdict` names a token id outside the vocabulary (here `u32::MAX`): the
/// device refuses the answer rather than feed the id to its model, ends the session and
/// finishes the generation on its own, every token its own draft.
#[test]
fn a_verdict_outside_the_vocabulary_ends_the_session_not_the_generation() {
    let (summary, links) = generate_against(
        |mut send, mut recv| {
            Box::pin(async move {
                let Message::Start(start) = read_message(&mut recv).await else {
                    panic!("expected Start");
                };
                let WirePrompt::Tokens(prompt) = &start.prompt else {
                    panic!("expected a token prompt");
                };
                let started = Message::Started(Started {
                    session_id: start.session_id,
                    context_len: prompt.len() as u32,
                    rendered: None,
                });
                write_message(&mut send, &started).await;
                let Message::Verify(v) = read_message(&mut recv).await else {
                    panic!("expected Verify");
                };
                let verdict = Message::Verdict(Verdict {
                    seq: v.seq,
                    token: u32::MAX,
                    accepted: false,
                    beta: 1.0,
                    tv_distance: 1.0,
                    accepted_links: Vec::new(),
                    window: None,
                });
                write_message(&mut send, &verdict).await;
                std::future::pending::<()>().await;
            })
        },
        4,
    );
    assert!(!summary.token_ids.is_empty(), "{summary:?}");
    assert!(summary.sources.iter().all(|s| *s == TokenSource::Offline));
    assert!(!summary.token_ids.contains(&u32::MAX));
    assert!(
        links
            .iter()
            .any(|(online, why)| !online && why.contains("unexpected Verdict")),
        "{links:?}"
    );
}
