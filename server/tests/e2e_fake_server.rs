//! The SDK against a fake server that breaks the protocol on purpose.

mod e2e_common;

use std::sync::Arc;

use e2e_common::{Recorder, draft_path};
use rustls::pki_types::PrivateKeyDer;
use uhlm_core::protocol::{
    ALPN, DEFAULT_MAX_FRAME_BYTES, FrameDecoder, Message, PROTOCOL_VERSION, Welcome, encode_frame,
};
use uhlm_sdk::{
    CancelToken, EngineConfig, GenerationOptions, HybridEngine, Mode, PolicyConfig, Prompt,
    SamplingOptions,
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

/// A server that says it accepts frames of any size, then answers `Start` with the header of
/// a 2 MiB frame. The protocol caps frames at 1 MiB whatever the server accepts: the device
/// refuses the frame at its header (it used to wait for the 2 MiB, here until its 5 s timeout).
#[test]
fn a_server_frame_over_the_protocol_limit_is_refused_at_its_header() {
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
        });
        control_send
            .write_all(&encode_frame(&welcome, u32::MAX).unwrap())
            .await
            .unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        assert!(matches!(read_message(&mut recv).await, Message::Start(_)));
        send.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
        // Hold everything open; the test ends the task.
        std::future::pending::<()>().await;
        drop((control_send, control_recv, send, recv, conn, endpoint));
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
                sampling: SamplingOptions::greedy(2),
                chat_template: false,
            },
            rec.clone(),
            CancelToken::new(),
        )
        .unwrap();
    assert_eq!(summary.stats.offline, summary.token_ids.len() as u64);
    let links = rec.links.lock().unwrap().clone();
    assert!(
        links
            .iter()
            .any(|(online, why)| !online && why.contains("exceeds the limit")),
        "{links:?}"
    );
    fake.abort();
}
