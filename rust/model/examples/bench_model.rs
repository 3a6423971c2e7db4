//! Prints a [`uhlm_model::BenchReport`] as JSON: load time, prefill and decode speed, peak RSS.
//!
//! ```text
//! cargo run --release -p uhlm-model --example bench_model -- MODEL.gguf THREADS [PROMPT] [DECODE] [BATCH]
//! ```
//! candle sizes its kernel thread pool once per process, so run one process per thread count.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_model MODEL.gguf THREADS [PROMPT_TOKENS] [DECODE_TOKENS] [BATCH]";
    let path = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let threads: usize = args.next().ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let prompt: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(128);
    let decode: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    let report = uhlm_model::bench_model(
        path.as_ref(),
        Some(threads),
        uhlm_model::Device::Cpu,
        prompt,
        decode,
        batch,
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
