//! Connection admission over real QUIC: wrong key, wrong vocabulary and wrong version each get
//! their own typed error, then the server closes the connection.

use crate::common;

use common::{API_KEY, Client, llm};
use uhlm_core::protocol::{ErrorCode, Message, PROTOCOL_VERSION};
use uhlm_server::{Server, ServerConfig, ServerHandle};

async fn server() -> ServerHandle {
    Server::start_with_model(ServerConfig::local(common::llm_path(), [API_KEY]), llm())
        .await
        .expect("start server")
}

/// Asserts an `Error` with `code`, then a connection closed by the server.
async fn assert_refused(client: &Client, answer: Option<Message>, code: ErrorCode) -> String {
    let Some(Message::Error(e)) = answer else {
        panic!("expected Error({code}), got {answer:?}");
    };
    assert_eq!(e.code, code, "{e}");
    match client.conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(c.error_code.into_inner(), 0),
        other => panic!("expected an application close, got {other:?}"),
    }
    e.message
}

#[tokio::test]
async fn wrong_api_key_is_unauthorized() {
    let server = server().await;
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    let (_control, answer) = client
        .hello("not-the-key", server.model_fingerprint(), PROTOCOL_VERSION)
        .await;
    assert_refused(&client, answer, ErrorCode::Unauthorized).await;
    server.shutdown().await;
}

#[tokio::test]
async fn mismatched_vocabulary_names_both_fingerprints() {
    let server = server().await;
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    let mut other = server.model_fingerprint();
    other[0] ^= 0xff;
    let (_control, answer) = client.hello(API_KEY, other, PROTOCOL_VERSION).await;
    let message = assert_refused(&client, answer, ErrorCode::VocabularyMismatch).await;
    assert!(message.contains(&hex::encode(other)), "{message}");
    assert!(
        message.contains(&hex::encode(server.model_fingerprint())),
        "{message}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_protocol_version_is_refused() {
    let server = server().await;
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    let (_control, answer) = client
        .hello(API_KEY, server.model_fingerprint(), PROTOCOL_VERSION + 1)
        .await;
    assert_refused(&client, answer, ErrorCode::UnsupportedVersion).await;
    server.shutdown().await;
}

/// Clients of earlier versions, which offer ALPN `uhlm/1` to `uhlm/4`, still complete the TLS
/// handshake and learn why they cannot continue.
#[tokio::test]
async fn older_clients_are_told_the_version_is_unsupported() {
    let server = server().await;
    for version in [1u16, 2, 3, 4] {
        let alpn = format!("uhlm/{version}");
        let endpoint = common::client_endpoint_with_alpn(server.cert_der(), alpn.as_bytes());
        let client = Client::connect_with(endpoint, server.local_addr()).await;
        let (_control, answer) = client
            .hello(API_KEY, server.model_fingerprint(), version)
            .await;
        let message = assert_refused(&client, answer, ErrorCode::UnsupportedVersion).await;
        assert!(message.contains("version 5"), "{message}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn right_key_and_vocabulary_are_welcome() {
    let server = server().await;
    let client = Client::connect(server.local_addr(), server.cert_der()).await;
    let (_control, answer) = client
        .hello(API_KEY, server.model_fingerprint(), PROTOCOL_VERSION)
        .await;
    let Some(Message::Welcome(w)) = answer else {
        panic!("expected Welcome, got {answer:?}")
    };
    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    assert_eq!(w.max_frame_bytes, ServerConfig::default().max_frame_bytes);
    assert!(w.max_context_tokens >= 2048);
    assert_eq!(
        w.max_generate_tokens,
        ServerConfig::default().max_generate_tokens
    );
    assert_eq!(w.max_chain_links, ServerConfig::default().max_chain_links);
    // The pin a device would configure is the SHA-256 of the certificate it received.
    let fp = server.cert_fingerprint().to_string();
    assert_eq!(fp, uhlm_server::cert_fingerprint(server.cert_der()));
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_without_the_alpn_cannot_connect() {
    let server = server().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server.cert_der().to_vec().into()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let result = endpoint
        .connect(server.local_addr(), "localhost")
        .unwrap()
        .await;
    assert!(
        result.is_err(),
        "a connection without a uhlm ALPN was accepted"
    );
    server.shutdown().await;
}

/// Connections beyond `max_connections` are refused at the handshake (there was no limit);
/// once one closes, a new one gets in.
#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::local(common::llm_path(), [API_KEY])
    };
    let server = Server::start_with_model(config, llm()).await.unwrap();
    let (first, _control) = Client::ready_on(&server).await;
    let endpoint = common::client_endpoint(server.cert_der());
    let refused = endpoint
        .connect(server.local_addr(), "localhost")
        .unwrap()
        .await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    first.conn.close(0u32.into(), b"done");
    drop(first);
    // The server notices the close and makes room.
    let mut admitted = None;
    for _ in 0..100 {
        let endpoint = common::client_endpoint(server.cert_der());
        if let Ok(c) = endpoint
            .connect(server.local_addr(), "localhost")
            .unwrap()
            .await
        {
            admitted = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        admitted.is_some(),
        "no connection admitted after the first closed"
    );
    server.shutdown().await;
}
