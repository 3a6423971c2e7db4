//! The server's TLS identity and QUIC crypto: TLS 1.3 only, ALPN `uhlm/5`, ring as the crypto
//! provider (the SDK uses the same, so both cross-compile to phones).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use uhlm_core::protocol::{ALPN, LEGACY_ALPNS};

use crate::config::ServerConfig;
use crate::error::ServerError;

/// File name of the self-signed certificate inside `cert_dir`.
pub const SELF_SIGNED_CERT_FILE: &str = "uhlm-server-cert.pem";
/// File name of the self-signed certificate's private key inside `cert_dir`.
pub const SELF_SIGNED_KEY_FILE: &str = "uhlm-server-key.pem";

/// A certificate chain and its key.
pub(crate) struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The end-entity certificate (DER), the one clients pin.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `load` never returns an empty chain.
        &self.chain[0]
    }
}

/// Lowercase hex SHA-256 of a DER certificate: the pin clients configure.
pub fn cert_fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Loads the configured certificate, or reuses/creates the self-signed one.
pub(crate) fn load_identity(config: &ServerConfig) -> Result<Identity, ServerError> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => read_pem(cert, key),
        _ => match &config.cert_dir {
            Some(dir) => {
                let (cert, key) = (
                    dir.join(SELF_SIGNED_CERT_FILE),
                    dir.join(SELF_SIGNED_KEY_FILE),
                );
                if cert.is_file() && key.is_file() {
                    check_private(&key)?;
                    tracing::info!(cert = %cert.display(), "reusing self-signed certificate");
                    read_pem(&cert, &key)
                } else {
                    write_self_signed(dir, &cert, &key)
                }
            }
            None => generate_self_signed().map(|(id, _, _)| id),
        },
    }
}

fn read_pem(cert: &Path, key: &Path) -> Result<Identity, ServerError> {
    let pem_err = |p: &PathBuf, e: rustls::pki_types::pem::Error| {
        ServerError::Tls(format!("cannot read PEM {}: {e}", p.display()))
    };
    let cert_path = cert.to_path_buf();
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(&cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(&cert_path, e))?;
    if chain.is_empty() {
        return Err(ServerError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(&key.to_path_buf(), e))?;
    Ok(Identity { chain, key })
}

/// A fresh certificate for the names a loopback or LAN client uses, with its PEM texts.
fn generate_self_signed() -> Result<(Identity, String, String), ServerError> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Tls(format!("cannot generate a self-signed certificate: {e}")))?;
    let cert_pem = certified.cert.pem();
    let key_pem = certified.signing_key.serialize_pem();
    let identity = Identity {
        chain: vec![certified.cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
    };
    Ok((identity, cert_pem, key_pem))
}

fn write_self_signed(dir: &Path, cert: &Path, key: &Path) -> Result<Identity, ServerError> {
    let (identity, cert_pem, key_pem) = generate_self_signed()?;
    std::fs::create_dir_all(dir).map_err(|e| ServerError::io(dir, e))?;
    write_new(key, key_pem.as_bytes(), 0o600)?;
    write_new(cert, cert_pem.as_bytes(), 0o644)?;
    tracing::info!(cert = %cert.display(), key = %key.display(), "wrote a new self-signed certificate");
    Ok(identity)
}

/// Writes a new file with `mode` (0600 for the private key). It must not exist: `O_EXCL` also
/// refuses a symlink planted at the path, which would otherwise redirect the write into a file
/// of the attacker's choosing (keeping that file's permissions).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ServerError> {
    use std::io::Write;
    if path.symlink_metadata().is_ok() {
        return Err(ServerError::Tls(format!(
            "{} exists without the rest of the self-signed pair: remove it (or give --cert and \
             --key)",
            path.display()
        )));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(|e| ServerError::io(path, e))?;
    f.write_all(bytes).map_err(|e| ServerError::io(path, e))
}

/// Refuses a self-signed key that is not a regular file or that others can read: it
/// authenticates this server to every device that pinned it.
fn check_private(path: &Path) -> Result<(), ServerError> {
    let meta = path
        .symlink_metadata()
        .map_err(|e| ServerError::io(path, e))?;
    if !meta.file_type().is_file() {
        return Err(ServerError::Tls(format!(
            "{} is not a regular file (a symlink?); refusing to use it as the private key",
            path.display()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ServerError::Tls(format!(
                "{} is readable by others (mode {mode:o}); `chmod 600` it or remove it for a new pair",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The QUIC server configuration: TLS 1.3 only, ALPN `uhlm/5` (and the older `uhlm/1` to
/// `uhlm/4`, only so that old clients reach `Hello` and learn `UnsupportedVersion`), no client
/// certificates.
pub(crate) fn quic_server_config(
    identity: &Identity,
    config: &ServerConfig,
) -> Result<quinn::ServerConfig, ServerError> {
    let tls_err = |e: rustls::Error| ServerError::Tls(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = std::iter::once(ALPN)
        .chain(LEGACY_ALPNS.iter().copied())
        .map(<[u8]>::to_vec)
        .collect();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The control stream, the sessions, and some headroom so that a stream over the session
    // limit can still be opened and be told `SessionLimit` instead of blocking in QUIC.
    let streams = u32::try_from(config.max_sessions.saturating_add(17)).unwrap_or(u32::MAX);
    transport.max_concurrent_bidi_streams(streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Explicit flow-control windows: quinn's connection window is unlimited by default, which
    // let a peer make the server buffer hundreds of MB before it had even said Hello. A stream
    // needs room for one frame; a connection for a few streams' worth at once.
    let frame = u64::from(config.max_frame_bytes) + 64 * 1024;
    transport.stream_receive_window(quinn::VarInt::from_u64(frame).unwrap_or(quinn::VarInt::MAX));
    transport.receive_window(quinn::VarInt::from_u64(4 * frame).unwrap_or(quinn::VarInt::MAX));
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| ServerError::Config(format!("idle_timeout: {e}")))?;
    transport.max_idle_timeout(Some(idle));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_is_written_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::local("/m.gguf", ["k"]);
        config.cert_dir = Some(dir.path().to_path_buf());
        let first = load_identity(&config).unwrap();
        let second = load_identity(&config).unwrap();
        assert_eq!(first.leaf(), second.leaf());
        let fp = cert_fingerprint(first.leaf());
        assert_eq!(fp.len(), 64);
        assert!(
            fp.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        quic_server_config(&first, &config).unwrap();
        // A fresh in-memory identity differs.
        config.cert_dir = None;
        assert_ne!(load_identity(&config).unwrap().leaf(), first.leaf());
    }

    #[cfg(unix)]
    #[test]
    fn the_self_signed_key_is_private_and_never_written_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::local("/m.gguf", ["k"]);
        config.cert_dir = Some(dir.path().to_path_buf());
        load_identity(&config).unwrap();
        let key = dir.path().join(SELF_SIGNED_KEY_FILE);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        // A key others can read is refused, not reused.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_identity(&config).err().expect("refused");
        assert!(err.to_string().contains("readable by others"), "{err}");

        // A link planted where the key goes: nothing is written through it.
        let planted = tempfile::tempdir().unwrap();
        let victim = planted.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fresh = planted.path().join("certs");
        std::fs::create_dir(&fresh).unwrap();
        std::os::unix::fs::symlink(&victim, fresh.join(SELF_SIGNED_KEY_FILE)).unwrap();
        config.cert_dir = Some(fresh);
        assert!(load_identity(&config).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(mode(&victim), 0o644);
    }

    #[test]
    fn garbage_pem_is_a_tls_error() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, "not a certificate").unwrap();
        std::fs::write(&k, "not a key").unwrap();
        assert!(matches!(read_pem(&c, &k), Err(ServerError::Tls(_))));
    }
}
