//! Which protocol a peer speaks: the version `Hello` carries and the TLS ALPN names.

/// Version of this protocol; a server refuses a `Hello` with any other version.
pub const PROTOCOL_VERSION: u16 = 5;

/// TLS application-layer protocol name negotiated on every QUIC connection.
pub const ALPN: &[u8] = b"uhlm/5";

/// ALPN names a server also accepts so that clients of older versions reach `Hello` and are
/// told `UnsupportedVersion` instead of failing the TLS handshake without a reason.
pub const LEGACY_ALPNS: &[&[u8]] = &[b"uhlm/1", b"uhlm/2", b"uhlm/3", b"uhlm/4"];
