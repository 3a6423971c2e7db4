//! The hybrid loop's test bench: an in-process server that follows a script, a draft model
//! whose drafts are a known function of its context, and a listener that records what the app
//! would see. The server passes every message it reads and writes through `uhlm-core`'s
//! stream state machines, so a script cannot drift from the protocol the real server speaks.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rustls::pki_types::PrivateKeyDer;
use sha2::{Digest, Sha256};
use uhlm_core::protocol::{
    ALPN, Acceptance, ControlStream, DEFAULT_MAX_FRAME_BYTES, ErrorCode, ErrorMessage,
    FrameDecoder, Message, PROTOCOL_VERSION, Prompt as WirePrompt, SessionStream, Side, Started,
    Verdict, Verify, Welcome, encode_frame,
};
use uhlm_sdk::{DraftModel, EngineConfig, HybridEngine, SdkError, TokenEvent, TokenListener};

/// `uhlm_model::DEFAULT_DRAFT_FILE_NAME` (behind `uhlm-model`'s `fetch` feature, which the SDK
/// does not enable).
const DRAFT_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_0-draft.gguf";

/// The cached default draft model, whose tokenizer the engine loads; `None` (the test skips)
/// when it is not cached, a failure when `UHLM_REQUIRE_MODELS` is set. The cache is where
/// `uhlm_model::fetch::models_dir` puts it: `$UHLM_MODELS`, else `<cache dir>/uhlm/models`.
pub fn draft_gguf() -> Option<PathBuf> {
    let dir = match std::env::var_os("UHLM_MODELS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => dirs::cache_dir()?.join("uhlm").join("models"),
    };
    let path = dir.join(DRAFT_FILE_NAME);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
        "{} is missing and UHLM_REQUIRE_MODELS is set",
        path.display()
    );
    eprintln!("skipping: {} not cached", path.display());
    None
}

/// What the scripted drafter drafts after `context`: a function of the whole context (its
/// length and last token), so a device that forgot to roll its model back drafts differently.
pub fn next_draft(context: &[u32]) -> u32 {
    let last = context.last().copied().unwrap_or(0);
    1000 + (last.wrapping_mul(7).wrapping_add(context.len() as u32)) % 500
}

/// The tokens the scripted drafter generates after `prompt` when every draft stands, except
/// where `overrides` says which token the server put at an output position instead.
pub fn expected_output(prompt: &[u32], n: usize, overrides: &[(usize, u32)]) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut out = Vec::new();
    for i in 0..n {
        let token = overrides
            .iter()
            .find(|(at, _)| *at == i)
            .map_or_else(|| next_draft(&context), |(_, t)| *t);
        context.push(token);
        out.push(token);
    }
    out
}

/// A draft model whose logits put all their mass on [`next_draft`] of its context, except that
/// a context whose length is a multiple of [`DrafterHooks::uncertain_every`] gets a flat row with the same
/// argmax (an uncertain draft an uncertainty policy sends). It counts how long a context it
/// has drafted from, so the server can wait for the device to draft ahead.
pub struct Scripted {
    tokens: Vec<u32>,
    vocab: usize,
    hooks: DrafterHooks,
}

/// What a test shares with (or sets for) its scripted drafter.
#[derive(Default)]
pub struct DrafterHooks {
    /// Drafts from a context whose length is a multiple of this are uncertain (0: none).
    pub uncertain_every: usize,
    /// Longest context a draft was computed from.
    pub drafted_from: Arc<AtomicUsize>,
    /// Every `truncate` the drafter asked for (the rollbacks).
    pub truncations: Arc<Mutex<Vec<usize>>>,
    /// The first draft from a context of this length blocks until the server opens the gate
    /// ([`Script::open_gate`]): a draft still running when its verdict arrives.
    pub gate: Option<(usize, mpsc::Receiver<()>)>,
}

impl Scripted {
    fn row(&mut self) -> Vec<f32> {
        let len = self.tokens.len();
        self.hooks.drafted_from.fetch_max(len, Ordering::SeqCst);
        if self.hooks.gate.as_ref().is_some_and(|(at, _)| *at == len)
            && let Some((_, open)) = self.hooks.gate.take()
        {
            // A server that dropped the sender has nothing to wait for.
            let _ = open.recv();
        }
        let uncertain_every = self.hooks.uncertain_every;
        let uncertain = uncertain_every > 0 && len.is_multiple_of(uncertain_every);
        let mut logits = vec![0.0; self.vocab];
        logits[next_draft(&self.tokens) as usize] = if uncertain { 1.0 } else { 30.0 };
        logits
    }
}

impl DraftModel for Scripted {
    fn context_length(&self) -> usize {
        8192
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn truncate(&mut self, n: usize) {
        self.hooks.truncations.lock().unwrap().push(n);
        self.tokens.truncate(n);
    }
    fn score_last(&mut self, tokens: &[u32]) -> Result<Vec<f32>, SdkError> {
        self.tokens.extend_from_slice(tokens);
        Ok(self.row())
    }
}

/// What the app saw.
#[derive(Default)]
pub struct Recorder {
    pub tokens: Mutex<Vec<TokenEvent>>,
    pub links: Mutex<Vec<(bool, String)>>,
}

impl Recorder {
    pub fn token_ids(&self) -> Vec<u32> {
        self.tokens
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.token_id)
            .collect()
    }
    pub fn sources(&self) -> Vec<uhlm_sdk::TokenSource> {
        self.tokens
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.source)
            .collect()
    }
    pub fn links(&self) -> Vec<(bool, String)> {
        self.links.lock().unwrap().clone()
    }
}

impl TokenListener for Recorder {
    fn on_token(&self, event: TokenEvent) {
        self.tokens.lock().unwrap().push(event);
    }
    fn on_link_change(&self, online: bool, detail: String) {
        self.links.lock().unwrap().push((online, detail));
    }
}

/// What the scripted server does beyond accepting every draft.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// Rejects the draft at this output position (0: the first generated token), putting this
    /// token there instead.
    pub reject: Option<(usize, u32)>,
    /// Holds the verdict that rejects until the device has drafted this many tokens past the
    /// rejected one, or for 2 s: the lookahead adapts to the measured round trip and may allow
    /// only one draft past it, which (drafting takes microseconds) is in the window by then.
    pub reject_after_drafting: usize,
    /// Closes the connection when a `Verify` arrives after this many verdicts.
    pub drop_after_verdicts: Option<usize>,
    /// Answers the `Verify` with this index (0: the first) with `Error{NeedResync}`, once.
    pub need_resync_at: Option<usize>,
    /// Never answers the `Verify` with this index.
    pub hold_at: Option<usize>,
    /// Opens the drafter's gate ([`DrafterHooks::gate`]) once the device's QUIC stack has
    /// acknowledged the rejecting verdict, so that the verdict is there before the draft ends.
    pub open_gate: Option<mpsc::Sender<()>>,
}

/// A message the server received on the session stream, or how the stream ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    Start(Vec<u32>),
    Verify(Verify),
    Extend(Vec<u32>),
    Resync(Vec<u32>),
    Close(String),
    /// The device ended or reset the stream, or the connection went away, without a `Close`.
    Ended(String),
}

/// What the server saw and did.
#[derive(Debug, Default)]
pub struct Log {
    pub seen: Vec<Seen>,
    /// The server's context: the prompt, every decided token, every local token given.
    pub context: Vec<u32>,
    pub verdicts: usize,
    /// A `Verify` is being held unanswered (`Script::hold_at`).
    pub holding: bool,
    /// The server closed the connection (`Script::drop_after_verdicts`).
    pub dropped: bool,
    /// Connections refused after the first one.
    pub refused: usize,
    /// Messages that broke the protocol, either way: every test expects none.
    pub violations: Vec<String>,
}

/// The scripted server, running on `rt` until dropped.
pub struct ScriptedServer {
    pub addr: SocketAddr,
    /// The certificate pin the engine is configured with.
    pub pin: String,
    pub log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedServer {
    /// Starts a server on loopback that serves one connection by `script`; `drafted_from` is
    /// the drafter's counter the rejection waits on.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        script: Script,
        drafted_from: Arc<AtomicUsize>,
    ) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = certified.cert.der().clone();
        let pin = hex::encode(Sha256::digest(&der));
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der], key)
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
        let log = Arc::new(Mutex::new(Log::default()));
        let task = rt.spawn(serve(endpoint, script, log.clone(), drafted_from));
        Self {
            addr,
            pin,
            log,
            task,
        }
    }

    /// An engine configured for this server, drafting with a [`Scripted`] model with `hooks`;
    /// the backoff is long so that a dropped link stays down.
    pub fn engine(
        &self,
        rt: &tokio::runtime::Runtime,
        slm_path: PathBuf,
        config: EngineConfig,
        hooks: DrafterHooks,
    ) -> HybridEngine {
        let config = EngineConfig {
            slm_path,
            server: Some(self.addr.to_string()),
            pin: Some(self.pin.clone()),
            api_key: "k".into(),
            threads: Some(1),
            request_timeout_ms: 30_000,
            reconnect_backoff_ms: 600_000,
            reconnect_backoff_max_ms: 600_000,
            ..config
        };
        HybridEngine::with_draft_model(config, rt.handle().clone(), move |model| {
            Ok(Box::new(Scripted {
                tokens: Vec::new(),
                vocab: model.info().vocab_size,
                hooks,
            }))
        })
        .unwrap()
    }

    /// Waits (up to 10 s) until `done` holds for the log; returns whether it did.
    pub fn wait_for(&self, done: impl Fn(&Log) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done(&self.log.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// The log, checked for protocol violations.
    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        let log = self.log.lock().unwrap();
        assert!(log.violations.is_empty(), "{:?}", log.violations);
        log
    }
}

async fn serve(
    endpoint: quinn::Endpoint,
    script: Script,
    log: Arc<Mutex<Log>>,
    drafted_from: Arc<AtomicUsize>,
) {
    let Some(incoming) = endpoint.accept().await else {
        return;
    };
    let conn = incoming.await.unwrap();
    // Later connections (a reconnect after a scripted drop) are refused: the device stays
    // offline, which is what a test of the fallback asserts.
    let refuser = {
        let (endpoint, log) = (endpoint.clone(), log.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                incoming.refuse();
                log.lock().unwrap().refused += 1;
            }
        })
    };
    let (mut control_send, mut control_recv) = conn.accept_bi().await.unwrap();
    let mut control = ControlStream::new();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let hello = read(&mut control_recv, &mut decoder).await;
    let violation = |log: &Arc<Mutex<Log>>, what: String| log.lock().unwrap().violations.push(what);
    match &hello {
        Ok(m @ Message::Hello(_)) => {
            if let Err(c) = control.on_message(Side::Device, m) {
                violation(&log, format!("Hello: {c}"));
            }
        }
        other => {
            violation(&log, format!("expected Hello, got {other:?}"));
            return;
        }
    }
    let welcome = Message::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        server: "scripted".into(),
        max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        max_context_tokens: 8192,
        max_generate_tokens: 64,
        max_chain_links: 16,
    });
    if let Err(c) = control.on_message(Side::Server, &welcome) {
        violation(&log, format!("Welcome: {c}"));
    }
    write(&mut control_send, &welcome).await;
    let (send, recv) = conn.accept_bi().await.unwrap();
    session(send, recv, &conn, &script, &log, &drafted_from).await;
    // Hold everything open; the test drops the server.
    std::future::pending::<()>().await;
    drop((control_send, control_recv, conn, endpoint, refuser));
}

async fn session(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    conn: &quinn::Connection,
    script: &Script,
    log: &Arc<Mutex<Log>>,
    drafted_from: &AtomicUsize,
) {
    let mut state = SessionStream::new();
    let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME_BYTES);
    let mut prompt_len = 0;
    let mut verifies = 0;
    let mut resynced = false;
    let mut rejected = false;
    loop {
        let msg = match read(&mut recv, &mut decoder).await {
            Ok(m) => m,
            Err(why) => {
                log.lock().unwrap().seen.push(Seen::Ended(why));
                return;
            }
        };
        if let Err(c) = state.on_message(Side::Device, &msg) {
            let why = state.refusal(c, &msg);
            log.lock()
                .unwrap()
                .violations
                .push(format!("device: {why}"));
            return;
        }
        let reply = match msg {
            Message::Start(start) => {
                let WirePrompt::Tokens(prompt) = start.prompt else {
                    log.lock().unwrap().violations.push("a chat prompt".into());
                    return;
                };
                prompt_len = prompt.len();
                let mut l = log.lock().unwrap();
                l.seen.push(Seen::Start(prompt.clone()));
                l.context = prompt.clone();
                Some(Message::Started(Started {
                    session_id: start.session_id,
                    context_len: prompt.len() as u32,
                    rendered: None,
                }))
            }
            Message::Resync(r) => {
                let mut l = log.lock().unwrap();
                l.seen.push(Seen::Resync(r.context.clone()));
                l.context = r.context.clone();
                Some(Message::Started(Started {
                    session_id: state.session_id().unwrap_or_default(),
                    context_len: r.context.len() as u32,
                    rendered: None,
                }))
            }
            Message::Extend(e) => {
                let mut l = log.lock().unwrap();
                l.seen.push(Seen::Extend(e.tokens.clone()));
                l.context.extend_from_slice(&e.tokens);
                None
            }
            Message::Close(c) => {
                log.lock().unwrap().seen.push(Seen::Close(c.reason));
                return;
            }
            Message::Verify(v) => {
                let index = verifies;
                verifies += 1;
                let verdicts = {
                    let mut l = log.lock().unwrap();
                    l.seen.push(Seen::Verify(v.clone()));
                    l.verdicts
                };
                if script.drop_after_verdicts == Some(verdicts) {
                    log.lock().unwrap().dropped = true;
                    conn.close(0u32.into(), b"scripted drop");
                    return;
                }
                if script.hold_at == Some(index) {
                    log.lock().unwrap().holding = true;
                    None
                } else if script.need_resync_at == Some(index) && !resynced {
                    resynced = true;
                    Some(Message::Error(ErrorMessage::for_seq(
                        ErrorCode::NeedResync,
                        "scripted: the context was lost",
                        v.seq,
                    )))
                } else {
                    let rejects_here = script.reject.is_some_and(|(at, _)| {
                        v.positions()
                            .unwrap_or_default()
                            .contains(&((prompt_len + at) as u32))
                    });
                    if let (true, Some((at, _))) = (rejects_here, script.reject) {
                        // Let the device draft ahead of the rejected token, so that the
                        // rejection has drafts to drop.
                        let want = prompt_len + at + script.reject_after_drafting;
                        let deadline = Instant::now() + Duration::from_secs(2);
                        while drafted_from.load(Ordering::SeqCst) < want
                            && Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    let mut l = log.lock().unwrap();
                    let verdict = decide(&v, &mut l.context, prompt_len, script.reject);
                    l.verdicts += 1;
                    rejected = !verdict.accepted;
                    Some(Message::Verdict(verdict))
                }
            }
            other => {
                let kind = other.kind();
                log.lock()
                    .unwrap()
                    .violations
                    .push(format!("unexpected {kind}"));
                return;
            }
        };
        if let Some(reply) = reply {
            if let Err(c) = state.on_message(Side::Server, &reply) {
                log.lock()
                    .unwrap()
                    .violations
                    .push(format!("server: {} refused: {c}", reply.kind()));
                return;
            }
            let acks = conn.stats().frame_rx.acks;
            write(&mut send, &reply).await;
            if std::mem::take(&mut rejected)
                && let Some(open) = &script.open_gate
            {
                let deadline = Instant::now() + Duration::from_secs(2);
                while conn.stats().frame_rx.acks == acks && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let _ = open.send(());
            }
        }
    }
}

/// The verdict on `v`: every draft accepted, except the one at the scripted rejection's output
/// position, which is replaced by its token (and ends the verdict). `context` grows by what
/// the verdict decides.
fn decide(
    v: &Verify,
    context: &mut Vec<u32>,
    prompt_len: usize,
    reject: Option<(usize, u32)>,
) -> Verdict {
    let links: Vec<(&[u32], u32)> = v
        .draft
        .iter()
        .map(|d| (v.skipped.as_slice(), d.token))
        .chain(
            v.chain
                .iter()
                .map(|l| (l.skipped.as_slice(), l.draft.token)),
        )
        .collect();
    let mut accepted_links = Vec::new();
    for (i, (skipped, draft)) in links.iter().enumerate() {
        context.extend_from_slice(skipped);
        let at = context.len() - prompt_len;
        if let Some((_, token)) = reject.filter(|(p, _)| *p == at) {
            context.push(token);
            return Verdict {
                seq: v.seq,
                token,
                accepted: false,
                beta: 1.0,
                tv_distance: 1.0,
                accepted_links,
                window: None,
            };
        }
        context.push(*draft);
        if i + 1 == links.len() {
            return Verdict {
                seq: v.seq,
                token: *draft,
                accepted: true,
                beta: 0.0,
                tv_distance: 0.0,
                accepted_links,
                window: None,
            };
        }
        accepted_links.push(Acceptance {
            beta: 0.0,
            tv_distance: 0.0,
        });
    }
    unreachable!("a Verify without a draft (the SDK always drafts in these modes)")
}

/// Reads one message; `Err` says how the stream or connection ended.
async fn read(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> Result<Message, String> {
    let mut buf = vec![0u8; 4096];
    loop {
        match decoder.next_frame() {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame: {e}")),
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.push(&buf[..n]),
            Ok(None) => return Err("finished".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn write(send: &mut quinn::SendStream, msg: &Message) {
    // The device may be gone (a cancelled generation): its absence is what the log shows.
    let _ = send
        .write_all(&encode_frame(msg, DEFAULT_MAX_FRAME_BYTES).unwrap())
        .await;
}
