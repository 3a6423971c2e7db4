//! uhlm-core's integration tests, one module per file, in one test binary, `core_it` (one link
//! instead of one per file; Cargo.toml says why it is not called `it`). `protocol_alloc.rs`
//! stays a binary of its own: its counting global allocator must see no other test's
//! allocations.

mod codec_properties;
mod combined_online;
mod exactness;
mod protocol_frames;
mod protocol_golden;
mod protocol_roundtrip;
mod protocol_stream;
mod protocol_support;
mod risk_control;
mod uncertainty_closed_form;
