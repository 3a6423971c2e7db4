//! TLS for the QUIC client: TLS 1.3 only, ALPN `uhlm/5`, ring as the crypto provider (same as
//! the server; it cross-compiles to Android and iOS).
//!
//! A self-hosted server has no CA-signed certificate, so the device pins it by the SHA-256 of
//! its DER end-entity certificate. The pinned verifier still checks the handshake signature,
//! so a peer that merely replays the certificate cannot impersonate the server. It remembers
//! the fingerprint it saw, so a mismatch surfaces as a typed error rather than a TLS alert.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use uhlm_core::protocol::ALPN;

use crate::error::SdkError;

/// Parses a pin: 64 hex digits (colons allowed, case ignored).
pub(crate) fn parse_pin(pin: &str) -> Result<[u8; 32], SdkError> {
    let clean: String = pin
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let mut out = [0u8; 32];
    hex::decode_to_slice(&clean, &mut out).map_err(|_| {
        SdkError::InvalidConfig(format!(
            "pin must be the 64-hex-digit SHA-256 of the server certificate, got {pin:?}"
        ))
    })?;
    Ok(out)
}

/// Accepts exactly the certificate whose SHA-256 is the pin.
#[derive(Debug)]
pub(crate) struct PinnedVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Fingerprint of the last certificate that did not match.
    mismatch: Mutex<Option<String>>,
}

impl PinnedVerifier {
    fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            pin,
            provider,
            mismatch: Mutex::new(None),
        }
    }

    /// The mismatch seen during a failed handshake, as `CertificateMismatch`.
    pub(crate) fn take_mismatch(&self) -> Option<SdkError> {
        let actual = self.mismatch.lock().ok()?.take()?;
        Some(SdkError::CertificateMismatch {
            expected: hex::encode(self.pin),
            actual,
        })
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut slot) = self.mismatch.lock() {
            *slot = Some(hex::encode(seen));
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The quinn client configuration, and the pinned verifier when pinning.
pub(crate) struct ClientTls {
    pub quinn: quinn::ClientConfig,
    pub pinned: Option<Arc<PinnedVerifier>>,
}

pub(crate) fn client_config(
    pin: Option<&str>,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<ClientTls, SdkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SdkError::Tls(e.to_string()))?;
    let (mut tls, pinned) = match pin {
        Some(pin) => {
            let verifier = Arc::new(PinnedVerifier::new(parse_pin(pin)?, provider));
            let tls = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            (tls, Some(verifier))
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            (
                builder.with_root_certificates(roots).with_no_client_auth(),
                None,
            )
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| SdkError::Tls(format!("TLS config unusable for QUIC: {e}")))?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle_timeout)
            .map_err(|_| SdkError::InvalidConfig("idle timeout too large".into()))?,
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(ClientTls {
        quinn: config,
        pinned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        assert_eq!(parse_pin(&hex64).unwrap(), [0xab; 32]);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_pin(&colons).unwrap(), [0xab; 32]);
        assert!(matches!(parse_pin("abc"), Err(SdkError::InvalidConfig(_))));
    }

    #[test]
    fn verifier_accepts_only_the_pinned_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().clone();
        let pin: [u8; 32] = Sha256::digest(der.as_ref()).into();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let name = ServerName::try_from("localhost").unwrap();
        let ok = PinnedVerifier::new(pin, provider.clone());
        assert!(
            ok.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        assert!(ok.take_mismatch().is_none());
        let wrong = PinnedVerifier::new([0; 32], provider);
        assert!(
            wrong
                .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_err()
        );
        match wrong.take_mismatch() {
            Some(SdkError::CertificateMismatch { expected, actual }) => {
                assert_eq!(expected, "00".repeat(32));
                assert_eq!(actual, hex::encode(pin));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }
}
