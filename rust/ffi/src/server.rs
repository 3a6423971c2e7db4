//! [`EmbeddedServer`]: a `uhlm-server` on loopback inside the app or test process, so the
//! whole hybrid loop runs on one machine.
//!
//! Only with the `desktop` feature: a phone app links the engine without the server. Without
//! it the type still exists, so that every build exports the same interface (uniffi checks
//! it when the bindings load), and [`EmbeddedServer::start`] answers
//! [`UhlmError::Unsupported`].

use std::sync::Arc;

use crate::error::UhlmError;

/// A loopback server with a fresh self-signed certificate. For demos and tests, not production.
#[derive(uniffi::Object)]
pub struct EmbeddedServer {
    #[cfg(feature = "desktop")]
    server: uhlm_server::LoopbackServer,
    address: String,
    fingerprint: String,
    api_key: String,
}

#[uniffi::export]
impl EmbeddedServer {
    /// Loads the LLM at `model_path` (blocking) and listens on `127.0.0.1` on a free port.
    /// Without `api_key` a random one is made; read it back with [`api_key`](Self::api_key).
    #[uniffi::constructor]
    pub fn start(model_path: String, api_key: Option<String>) -> Result<Arc<Self>, UhlmError> {
        #[cfg(not(feature = "desktop"))]
        {
            let _ = (model_path, api_key);
            Err(UhlmError::not_in_phone_build("an embedded server"))
        }
        #[cfg(feature = "desktop")]
        Self::start_desktop(model_path, api_key)
    }

    /// `host:port` for [`EngineConfig::server`](crate::EngineConfig).
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The certificate pin for [`EngineConfig::pin`](crate::EngineConfig).
    pub fn cert_fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// The one API key the server accepts.
    pub fn api_key(&self) -> String {
        self.api_key.clone()
    }

    /// Stops gracefully (in-flight requests are answered first). Idempotent; dropping the
    /// object without calling it stops the server abruptly.
    pub fn stop(&self) {
        #[cfg(feature = "desktop")]
        self.server.stop();
    }
}

#[cfg(feature = "desktop")]
impl EmbeddedServer {
    fn start_desktop(model_path: String, api_key: Option<String>) -> Result<Arc<Self>, UhlmError> {
        let server =
            uhlm_server::LoopbackServer::start(model_path, api_key).map_err(server_error)?;
        Ok(Arc::new(Self {
            address: server.local_addr().to_string(),
            fingerprint: server.cert_fingerprint().to_string(),
            api_key: server.api_key().to_string(),
            server,
        }))
    }
}

/// Model errors keep their typed variants; everything else is a server failure.
#[cfg(feature = "desktop")]
fn server_error(e: uhlm_server::ServerError) -> UhlmError {
    match e {
        uhlm_server::ServerError::Model(m) => m.into(),
        other => UhlmError::Server {
            reason: other.to_string(),
        },
    }
}
