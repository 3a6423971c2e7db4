//! uhlm-model's integration tests, one module per file, in one test binary (one link instead
//! of one per file). Two stay binaries of their own: `score_memory.rs` (its counting global
//! allocator must see no other test's allocations) and `cross_arch.rs` (the test the phones'
//! CPU runs under qemu, built alone for it).

mod chat_template_gguf;
mod fetch_wheels;
mod runtime_real;
mod runtime_toy;
#[path = "../runtime_support/mod.rs"]
mod support;
mod tokenizer_gguf;
mod tokenizer_qwen2;
