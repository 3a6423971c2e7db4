//! A server on loopback inside another program ([`LoopbackServer`]): the CLI's demo and the
//! bindings' embedded server run the whole hybrid loop on one machine with it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::{Server, ServerConfig, ServerError, ServerHandle};

/// [`Server`] on a loopback port with a fresh self-signed certificate, on an async runtime of
/// its own so that synchronous callers can hold it. [`stop`](Self::stop) shuts it down
/// gracefully; dropping it without that stops it at once, on any thread.
pub struct LoopbackServer {
    handle: Mutex<Option<ServerHandle>>,
    local_addr: SocketAddr,
    cert_fingerprint: String,
    api_key: String,
    /// Taken only on drop; the handle's tasks run on it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl LoopbackServer {
    /// Starts a server for `model` (a path or a model name) accepting `api_key`, or a random
    /// one when `None` ([`api_key`](Self::api_key) tells which).
    pub fn start(model: impl Into<PathBuf>, api_key: Option<String>) -> Result<Self, ServerError> {
        let api_key = api_key.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("uhlm-loopback-server")
            .enable_all()
            .build()
            .map_err(ServerError::Runtime)?;
        let config = ServerConfig::local(model, [api_key.clone()]);
        let handle = runtime.block_on(Server::start(config))?;
        let runtime = Some(runtime);
        Ok(Self {
            local_addr: handle.local_addr(),
            cert_fingerprint: handle.cert_fingerprint().to_string(),
            handle: Mutex::new(Some(handle)),
            api_key,
            runtime,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The certificate's SHA-256, which a device pins.
    pub fn cert_fingerprint(&self) -> &str {
        &self.cert_fingerprint
    }

    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// Shuts the server down (a second call does nothing). Must not be called from inside an
    /// async task.
    pub fn stop(&self) {
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        if let (Some(handle), Some(runtime)) = (handle, &self.runtime) {
            runtime.block_on(handle.shutdown());
        }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        // Without blocking (a UI thread may drop it; inside an async task blocking panics):
        // the runtime's tasks, the server's among them, are dropped where they stand.
        if let Ok(mut handle) = self.handle.lock() {
            handle.take();
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
