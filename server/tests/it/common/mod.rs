//! A raw QUIC test client for the server: frames by hand, no SDK, so tests can also send what a
//! well-behaved device never would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use uhlm_core::codec::{self, Codec};
use uhlm_core::protocol::{
    ALPN, DEFAULT_MAX_FRAME_BYTES, Draft, FrameDecoder, Hello, Message, PROTOCOL_VERSION, Prompt,
    Start, Verify, encode_frame,
};
use uhlm_core::sampling::{SamplingOptions, argmax, probabilities_into};
use uhlm_model::{LoadOptions, Model, Session};

/// The default LLM in the model cache (`$UHLM_MODELS`, else the user's cache dir).
pub fn llm_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| cached_file("SmolLM2-135M-Instruct.Q4_1.gguf"))
}
pub const API_KEY: &str = "test-key-1";

/// The LLM, loaded once per test binary.
pub fn llm() -> Arc<Model> {
    static MODEL: OnceLock<Arc<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            Model::load(llm_path().as_ref(), &LoadOptions::default()).expect("load the LLM")
        })
        .clone()
}

/// A client endpoint trusting exactly `cert_der` (the server's self-signed certificate).
pub fn client_endpoint(cert_der: &[u8]) -> Endpoint {
    client_endpoint_with_alpn(cert_der, ALPN)
}

/// Like [`client_endpoint`], offering `alpn` (e.g. an older version's) instead of ours.
pub fn client_endpoint_with_alpn(cert_der: &[u8], alpn: &[u8]) -> Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert_der.to_vec().into())
        .expect("add server certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_millis(300)));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    endpoint
}

/// One bidirectional stream with frame-level send and receive.
pub struct Stream {
    pub send: SendStream,
    pub recv: RecvStream,
    decoder: FrameDecoder,
}

impl Stream {
    pub fn new((send, recv): (SendStream, RecvStream)) -> Self {
        Self {
            send,
            recv,
            decoder: FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES),
        }
    }

    pub async fn send(&mut self, msg: impl Into<Message>) {
        let frame = encode_frame(&msg.into(), DEFAULT_MAX_FRAME_BYTES).expect("encode");
        self.send.write_all(&frame).await.expect("write frame");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("write bytes");
    }

    /// The next message; `None` when the stream ended (cleanly or not) without one.
    pub async fn recv(&mut self) -> Option<Message> {
        let mut buf = [0u8; 65536];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(m)) => return Some(m),
                Ok(None) => {}
                Err(e) => panic!("server sent a bad frame: {e}"),
            }
            match self.recv.read(&mut buf).await {
                Ok(Some(n)) => self.decoder.push(&buf[..n]),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// A connected, not yet greeted client.
pub struct Client {
    pub endpoint: Endpoint,
    pub conn: Connection,
}

impl Client {
    pub async fn connect(addr: SocketAddr, cert_der: &[u8]) -> Self {
        Self::connect_with(client_endpoint(cert_der), addr).await
    }

    /// Connects through an endpoint of the caller's making (another ALPN, ...).
    pub async fn connect_with(endpoint: Endpoint, addr: SocketAddr) -> Self {
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("QUIC handshake");
        Self { endpoint, conn }
    }

    /// Opens the control stream and sends `Hello`; returns the stream and the server's answer.
    pub async fn hello(
        &self,
        api_key: &str,
        fingerprint: [u8; 32],
        version: u16,
    ) -> (Stream, Option<Message>) {
        let mut control = Stream::new(self.conn.open_bi().await.expect("open control stream"));
        control
            .send(Hello {
                protocol_version: version,
                model_fingerprint: fingerprint,
                api_key: api_key.into(),
                client: "uhlm-server-tests".into(),
            })
            .await;
        let answer = control.recv().await;
        (control, answer)
    }

    /// [`ready`](Self::ready) against an in-process server.
    pub async fn ready_on(server: &uhlm_server::ServerHandle) -> (Self, Stream) {
        Self::ready(
            server.local_addr(),
            server.cert_der(),
            server.model_fingerprint(),
        )
        .await
    }

    /// Connects and completes the handshake with the right key and fingerprint.
    pub async fn ready(addr: SocketAddr, cert_der: &[u8], fingerprint: [u8; 32]) -> (Self, Stream) {
        let client = Self::connect(addr, cert_der).await;
        let (control, answer) = client.hello(API_KEY, fingerprint, PROTOCOL_VERSION).await;
        assert!(
            matches!(answer, Some(Message::Welcome(_))),
            "expected Welcome, got {answer:?}"
        );
        (client, control)
    }

    pub async fn session(&self) -> Stream {
        Stream::new(self.conn.open_bi().await.expect("open session stream"))
    }
}

/// The device side of a session, with the LLM itself as the "SLM": it scores exactly the chunks
/// the server scores, so its argmax is what a greedy server must answer.
pub struct Mirror {
    pub session: Session,
    /// Committed tokens the server has not scored yet (the prompt, then the last verdict).
    pub pending: Vec<u32>,
    /// Every committed token: what a `Resync` sends.
    pub context: Vec<u32>,
}

impl Mirror {
    pub fn new(model: &Arc<Model>, prompt: &[u32]) -> Self {
        Self {
            session: model.session(),
            pending: prompt.to_vec(),
            context: prompt.to_vec(),
        }
    }

    /// Logits after `pending ++ skipped`, scored in one pass like the server's catch-up.
    pub fn score(&mut self, skipped: &[u32]) -> Vec<f32> {
        let mut chunk = self.pending.clone();
        chunk.extend_from_slice(skipped);
        self.session.score(&chunk).expect("score").last().to_vec()
    }

    /// Records a verdict after a Verify that carried `skipped`.
    pub fn commit(&mut self, skipped: &[u32], token: u32) {
        self.context.extend_from_slice(skipped);
        self.context.push(token);
        self.pending = vec![token];
    }

    /// After a resync the server scores the whole context again; so does the mirror.
    pub fn resync(&mut self) {
        self.session.reset();
        self.pending = self.context.clone();
    }
}

pub fn prompt_tokens(model: &Model, text: &str) -> Vec<u32> {
    model.tokenizer().encode(text, true).expect("tokenize")
}

/// A dense (f32) draft distribution: the softmax of `logits` at temperature 1.
pub fn dense_q(logits: &[f32]) -> Vec<u8> {
    let mut q = Vec::new();
    let opts = SamplingOptions {
        temperature: 1.0,
        ..SamplingOptions::default()
    };
    assert!(probabilities_into(logits, &opts, &mut q, &mut Vec::new()));
    codec::encode(&Codec::DenseF32, &q).expect("encode q").bytes
}

pub fn start(session_id: u64, prompt: &[u32]) -> Start {
    Start {
        session_id,
        prompt: Prompt::Tokens(prompt.to_vec()),
        sampling: SamplingOptions::greedy(64),
    }
}

/// Runs a greedy session of `steps` verifies on `stream` (already `Started`). Every `skip_every`-th
/// token (if > 0) is committed locally and sent as `skipped` with the next Verify. Drafts are the
/// second most likely token on odd steps (forcing a resample) and the argmax on even ones.
/// Returns an error describing the first wrong verdict.
pub async fn greedy_verifies(
    stream: &mut Stream,
    mirror: &mut Mirror,
    steps: u32,
    skip_every: u32,
) -> Result<(), String> {
    let mut skipped = Vec::new();
    let mut seq = 0u32;
    let mut step = 0u32;
    while seq < steps {
        let base = mirror.session.len();
        // Model compute blocks; keep it off the async scheduler's core loop.
        let logits = tokio::task::block_in_place(|| mirror.score(&skipped));
        let best = argmax(&logits).expect("finite logits");
        step += 1;
        if skip_every > 0 && step.is_multiple_of(skip_every) {
            // Commit `best` locally; the next Verify carries it and the server catches up.
            mirror.session.truncate(base);
            skipped.push(best);
            continue;
        }
        let draft = if seq % 2 == 1 {
            second_best(&logits, best)
        } else {
            best
        };
        let position = (mirror.context.len() + skipped.len()) as u32;
        stream
            .send(Verify {
                seq,
                position,
                skipped: skipped.clone(),
                draft: Some(Draft {
                    token: draft,
                    q: dense_q(&logits),
                }),
                uncertainty: 0.5,
                chain: Vec::new(),
            })
            .await;
        match stream.recv().await {
            Some(Message::Verdict(v)) => {
                if v.seq != seq || v.token != best || v.accepted != (draft == best) {
                    return Err(format!(
                        "step {seq}: verdict {v:?}, expected token {best} (draft {draft})"
                    ));
                }
                mirror.commit(&skipped, v.token);
                skipped.clear();
            }
            other => return Err(format!("step {seq}: expected a Verdict, got {other:?}")),
        }
        seq += 1;
    }
    Ok(())
}

fn second_best(logits: &[f32], best: u32) -> u32 {
    let mut masked = logits.to_vec();
    masked[best as usize] = f32::NEG_INFINITY;
    argmax(&masked).expect("a second token")
}

fn cached_file(file: &str) -> String {
    let dir = uhlm_model::fetch::models_dir().expect("the model cache directory");
    dir.join(file).to_string_lossy().into_owned()
}

/// One sample of an in-process server's metrics (`uhlm_sessions`, ...).
pub fn metric(server: &uhlm_server::ServerHandle, name: &str) -> f64 {
    let text = server.metrics_text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}
