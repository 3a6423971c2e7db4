//! uhlm-eval's integration tests, one module per file, in one test binary.

mod calibrate_batch;
mod humaneval_exec;
