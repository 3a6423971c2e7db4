//! Why the server could not start. Errors on a connection or a session never surface here: they
//! become `Error` frames for the peer and log lines, so one bad client cannot stop the server.

use std::path::PathBuf;

/// What went wrong starting (or configuring) a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is inconsistent or incomplete; the message says what to change.
    #[error("invalid server configuration: {0}")]
    Config(String),
    /// Loading the LLM failed.
    #[error(transparent)]
    Model(#[from] uhlm_model::ModelError),
    /// The remote inference engine cannot be used: unreachable, or serving another vocabulary.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// A model name could not be resolved to a file.
    #[cfg(feature = "fetch")]
    #[error(transparent)]
    Fetch(#[from] uhlm_model::fetch::FetchError),
    /// Reading or writing a file (certificate, key, API keys, config) failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The async runtime of a [`LoopbackServer`](crate::LoopbackServer) could not start.
    #[error("cannot start the server's async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A certificate or key could not be generated, parsed or used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Binding a socket failed.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for [`ServerConfig`](crate::ServerConfig).
    #[error("cannot parse config file {}: {source}", path.display())]
    ConfigFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl ServerError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
