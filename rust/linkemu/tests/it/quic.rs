//! A real QUIC connection (quinn, TLS 1.3) through the emulator on the `poor` profile: the
//! handshake pays the emulated RTT, and a stream survives the 3% loss each way intact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::Endpoint;
use tokio::time::{Instant, timeout};
use uhlm_linkemu::{LinkEmulator, LinkProfile};

const ALPN: &[u8] = b"linkemu-test";

fn server_endpoint() -> (Endpoint, Vec<u8>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_der = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let endpoint = Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    (endpoint, cert_der.to_vec())
}

fn client_endpoint(cert_der: Vec<u8>) -> Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der.into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Echoes every bidirectional stream of the first connection.
fn serve_echo(endpoint: Endpoint) {
    tokio::spawn(async move {
        let Some(incoming) = endpoint.accept().await else {
            return;
        };
        let Ok(connection) = incoming.await else {
            return;
        };
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            tokio::spawn(async move {
                if let Ok(data) = recv.read_to_end(1 << 20).await {
                    let _ = send.write_all(&data).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                }
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_handshake_and_stream_survive_the_poor_profile() {
    let (server, cert_der) = server_endpoint();
    let server_addr: SocketAddr = server.local_addr().unwrap();
    serve_echo(server);
    let profile = LinkProfile::poor();
    let emu = LinkEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        server_addr,
        profile.clone(),
        11,
    )
    .await
    .unwrap();
    let client = client_endpoint(cert_der);

    let started = Instant::now();
    let connection = timeout(
        Duration::from_secs(20),
        client.connect(emu.local_addr(), "localhost").unwrap(),
    )
    .await
    .expect("handshake within 20 s")
    .expect("handshake");
    let handshake = started.elapsed();
    // At least one emulated round trip (minus jitter both ways).
    let floor = profile.rtt() - profile.uplink.jitter - profile.downlink.jitter;
    assert!(
        handshake >= floor,
        "handshake took {handshake:?} < {floor:?}"
    );

    let payload: Vec<u8> = (0..32 * 1024u32).map(|i| (i % 251) as u8).collect();
    let echoed = timeout(Duration::from_secs(40), async {
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(1 << 20).await.unwrap()
    })
    .await
    .expect("echo within 40 s");
    assert_eq!(echoed, payload);
    let transfer = started.elapsed();
    // 32 KiB each way cannot cross a 256 kbit/s uplink in under 1 s.
    let serialisation = profile.uplink.serialisation(payload.len());
    assert!(
        transfer >= serialisation,
        "{transfer:?} < {serialisation:?}"
    );
    connection.close(0u32.into(), b"done");

    let stats = emu.shutdown().await;
    // One 4-tuple: one session; QUIC's own packets went through the emulated link.
    assert_eq!(stats.sessions_opened, 1);
    assert!(stats.uplink.delivered.bytes >= payload.len() as u64);
    assert!(stats.downlink.delivered.bytes >= payload.len() as u64);
    eprintln!("handshake {handshake:?}, echo done at {transfer:?}, stats {stats:?}");
}
