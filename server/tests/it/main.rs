//! uhlm-server's integration and end-to-end tests, one module per file, in one test binary (one
//! link instead of one per file; the model a module loads once is shared by the others).

mod common;
mod e2e_common;
mod e2e_errors;
mod e2e_fake_server;
mod e2e_hybrid;
mod e2e_llm;
mod e2e_offline;
mod e2e_pipeline;
mod engine_llama_server;
mod engine_vllm;
#[path = "../../../rust/model/tests/runtime_support/mod.rs"]
mod runtime_support;
mod server_extend;
mod server_fairness;
mod server_generate;
mod server_handshake;
mod server_process;
mod server_robustness;
mod server_sessions;
