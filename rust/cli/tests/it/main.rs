//! The `uhlm` binary's tests, one module per file, in one test binary.

mod cli;
mod cli_hybrid;
