//! uhlm-linkemu's integration tests, one module per file, in one test binary (one link
//! instead of one per file).

mod link_model;
mod quic;
mod relay;
