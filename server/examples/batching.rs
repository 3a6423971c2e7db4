//! Verify throughput of one server with batching off (`max_batch` 1: one session per forward
//! pass) and on (`max_batch` 16, continuous batching as by default): 16 concurrent sessions
//! over 4 QUIC connections, each sending `VERIFIES` remote-decided Verify requests (no draft,
//! so the client does no model work).
//!
//! `cargo run -p uhlm-server --example batching [-- MODEL.gguf [VERIFIES]]`

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{API_KEY, Client, prompt_tokens, start};
use uhlm_core::protocol::{Message, Verify};
use uhlm_model::{LoadOptions, Model};
use uhlm_server::{Server, ServerConfig};

const SESSIONS: usize = 16;
const CONNECTIONS: usize = 4;

/// A sample's value in a Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn run(model: Arc<Model>, max_batch: usize, verifies: u32) -> anyhow::Result<(f64, f64)> {
    let mut config = ServerConfig::local(model.path(), [API_KEY]);
    config.max_batch = max_batch;
    let server = Server::start_with_model(config, model.clone()).await?;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Arc::new(
            Client::ready(
                server.local_addr(),
                server.cert_der(),
                server.model_fingerprint(),
            )
            .await,
        ));
    }
    let prompt = prompt_tokens(&model, "Write a short story about a lighthouse keeper who");
    // Open every session and prefill its prompt before timing.
    let mut streams = Vec::new();
    for i in 0..SESSIONS {
        let mut s = clients[i % CONNECTIONS].0.session().await;
        s.send(start(i as u64, &prompt)).await;
        anyhow::ensure!(
            matches!(s.recv().await, Some(Message::Started(_))),
            "no Started"
        );
        s.send(Verify {
            seq: 0,
            position: prompt.len() as u32,
            skipped: vec![],
            draft: None,
            uncertainty: 0.0,
            chain: Vec::new(),
        })
        .await;
        anyhow::ensure!(
            matches!(s.recv().await, Some(Message::Verdict(_))),
            "no Verdict"
        );
        streams.push(s);
    }
    let before = server.metrics_text();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        let base = prompt.len() as u32 + 1;
        tasks.push(tokio::spawn(async move {
            for seq in 1..=verifies {
                s.send(Verify {
                    seq,
                    position: base + seq - 1,
                    skipped: vec![],
                    draft: None,
                    uncertainty: 0.0,
                    chain: Vec::new(),
                })
                .await;
                match s.recv().await {
                    Some(Message::Verdict(_)) => {}
                    other => anyhow::bail!("expected a Verdict, got {other:?}"),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = server.metrics_text();
    let batches =
        sample(&after, "uhlm_batch_size_count") - sample(&before, "uhlm_batch_size_count");
    let requests = sample(&after, "uhlm_batch_size_sum") - sample(&before, "uhlm_batch_size_sum");
    server.shutdown().await;
    Ok((
        (SESSIONS as u32 * verifies) as f64 / secs,
        requests / batches.max(1.0),
    ))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| common::llm_path().to_string());
    let verifies: u32 = args.next().map(|v| v.parse()).transpose()?.unwrap_or(16);
    let model = Model::load(path.as_ref(), &LoadOptions::default())?;
    println!("| max_batch | verifies/s (16 sessions) | sessions per forward pass |");
    println!("|---|---|---|");
    for max_batch in [1, 16] {
        let (rate, mean) = run(model.clone(), max_batch, verifies).await?;
        println!("| {max_batch} | {rate:.1} | {mean:.2} |");
    }
    Ok(())
}
