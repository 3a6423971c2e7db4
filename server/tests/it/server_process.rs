//! The real `uhlm-server` binary: startup line, config file + flags, certificate reuse,
//! `/healthz` + `/metrics`, and SIGTERM during a request (the request is still answered).

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{Client, Mirror, llm, prompt_tokens, start};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uhlm_core::protocol::{Draft, ErrorCode, Message, Verify};
use uhlm_core::sampling::argmax;
use uhlm_model::Model;

const FILE_KEY: &str = "file-key-42";

struct Running {
    child: Child,
    addr: SocketAddr,
    fingerprint: String,
    metrics: Option<SocketAddr>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_keys(dir: &Path) {
    std::fs::write(
        dir.join("keys.txt"),
        format!("# test keys\n\n{FILE_KEY}\nother-key\n"),
    )
    .unwrap();
}

/// Spawns the binary and reads its startup lines.
fn spawn(args: &[&str], dir: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_uhlm-server"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn uhlm-server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("no startup line");
    // uhlm-server listening on ADDR fingerprint HEX
    let words: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(words[..3], ["uhlm-server", "listening", "on"], "{first}");
    assert_eq!(words[4], "fingerprint", "{first}");
    let addr: SocketAddr = words[3].parse().unwrap();
    let fingerprint = words[5].to_string();
    let metrics = if args.contains(&"--metrics") {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no metrics line");
        Some(line.rsplit(' ').next().unwrap().parse().unwrap())
    } else {
        None
    };
    Running {
        child,
        addr,
        fingerprint,
        metrics,
    }
}

/// Sends SIGTERM to `pid`.
fn term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The child's exit status, if it exits within `seconds`.
fn exit_within(child: &mut Child, seconds: u64) -> Option<std::process::ExitStatus> {
    tokio::task::block_in_place(|| {
        for _ in 0..seconds * 10 {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
}

/// A client of the spawned server, past `Hello` with the file's key; its control stream.
async fn greeted(running: &Running, dir: &Path, model: &Model) -> (Client, common::Stream) {
    let der = cert_der(dir);
    let client = Client::connect(running.addr, &der).await;
    let (control, answer) = client
        .hello(
            FILE_KEY,
            model.fingerprint(),
            uhlm_core::protocol::PROTOCOL_VERSION,
        )
        .await;
    assert!(matches!(answer, Some(Message::Welcome(_))), "{answer:?}");
    (client, control)
}

fn cert_der(dir: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(dir.join(uhlm_server::SELF_SIGNED_CERT_FILE))
        .expect("self-signed certificate written")
        .to_vec()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of an unlabelled sample in a Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn config_file_with_flag_overrides_and_a_stable_self_signed_pin() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path());
    std::fs::write(
        dir.path().join("server.toml"),
        format!(
            "model = \"{}\"\nlisten = \"127.0.0.1:1\"\nself_signed = true\napi_keys = \"keys.txt\"\nmax_batch = 4\n",
            common::llm_path()
        ),
    )
    .unwrap();
    let config = dir.path().join("server.toml");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let first = spawn(&args, Path::new("/"));
    assert_ne!(first.addr.port(), 1, "--listen did not override the file");
    // The certificate was written next to the config file, and the printed pin is its hash.
    let der = cert_der(dir.path());
    assert_eq!(first.fingerprint, uhlm_server::cert_fingerprint(&der));
    drop(first);
    let second = spawn(&args, Path::new("/"));
    assert_eq!(
        second.fingerprint,
        uhlm_server::cert_fingerprint(&der),
        "pin changed on restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_sigterm_finishes_the_in_flight_verify() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path());
    let model = llm();
    let running = spawn(
        &[
            "--model",
            common::llm_path(),
            "--listen",
            "127.0.0.1:0",
            "--self-signed",
            "--cert-dir",
            ".",
            "--api-keys",
            "keys.txt",
            "--metrics",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    let metrics_addr = running.metrics.unwrap();
    let health = http_get(metrics_addr, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );

    let (client, _control) = greeted(&running, dir.path(), &model).await;
    let mut s = client.session().await;
    let prompt = prompt_tokens(&model, "The recipe for a good loaf of bread starts with");
    s.send(start(1, &prompt)).await;
    assert!(matches!(s.recv().await, Some(Message::Started(_))));
    let mut mirror = Mirror::new(&model, &prompt);
    common::greedy_verifies(&mut s, &mut mirror, 1, 0)
        .await
        .unwrap();

    let before = http_get(metrics_addr, "/metrics").await;
    assert_eq!(sample(&before, "uhlm_sessions"), 1.0);
    assert_eq!(sample(&before, "uhlm_tokens_verified_total"), 1.0);
    assert!(sample(&before, "uhlm_uplink_bytes_total") > 0.0);
    assert!(sample(&before, "uhlm_verify_latency_seconds_count") >= 1.0);

    // A Verify with a long catch-up, then SIGTERM while the server computes it.
    let text = "It was the best of times, it was the worst of times, it was the age of wisdom, \
                it was the age of foolishness, it was the epoch of belief, it was the epoch of \
                incredulity, it was the season of Light, it was the season of Darkness. ";
    let skipped: Vec<u32> = model.tokenizer().encode(&text.repeat(2), false).unwrap();
    let logits = tokio::task::block_in_place(|| mirror.score(&skipped));
    let best = argmax(&logits).unwrap();
    let verify = Message::Verify(Verify {
        seq: 1,
        position: (mirror.context.len() + skipped.len()) as u32,
        skipped: skipped.clone(),
        draft: Some(Draft {
            token: best,
            q: common::dense_q(&logits),
        }),
        uncertainty: 0.5,
        chain: Vec::new(),
    });
    let frame_bytes = uhlm_core::protocol::encode_frame(&verify, u32::MAX)
        .unwrap()
        .len() as f64;
    let uplink = |text: &str| sample(text, "uhlm_uplink_bytes_total");
    let read_before = uplink(&http_get(metrics_addr, "/metrics").await);
    s.send(verify).await;
    // SIGTERM once the server has read the whole request (its uplink counter says so).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while uplink(&http_get(metrics_addr, "/metrics").await) < read_before + frame_bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the Verify never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    term(running.child.id());
    match s.recv().await {
        Some(Message::Verdict(v)) => assert_eq!((v.seq, v.token, v.accepted), (1, best, true)),
        other => panic!("the in-flight Verify was not answered: {other:?}"),
    }
    // Then the session is told the server is going away (or the stream simply ends).
    match s.recv().await {
        None => {}
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::ShuttingDown),
        other => panic!("unexpected message after shutdown: {other:?}"),
    }
    let mut running = running;
    let exit =
        exit_within(&mut running.child, 30).expect("server did not exit within 30 s of SIGTERM");
    assert!(exit.success(), "server exited with {exit}");
}

/// A graceful stop waits for in-flight requests (here half a request, up to the drain
/// deadline); a second signal stops the server at once, with the status of an interrupted
/// program. (The second signal used to be ignored.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_a_draining_server_at_once() {
    let dir = tempfile::tempdir().unwrap();
    write_keys(dir.path());
    let model = llm();
    let mut running = spawn(
        &[
            "--model",
            common::llm_path(),
            "--listen",
            "127.0.0.1:0",
            "--self-signed",
            "--cert-dir",
            ".",
            "--api-keys",
            "keys.txt",
        ],
        dir.path(),
    );
    let (client, _control) = greeted(&running, dir.path(), &model).await;
    let mut s = client.session().await;
    let frame =
        uhlm_core::protocol::encode_frame(&Message::Start(start(1, &[1, 2, 3])), u32::MAX).unwrap();
    s.send_raw(&frame[..frame.len() / 2]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let pid = running.child.id();
    term(pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "the first signal should drain, not stop at once"
    );
    term(pid);
    let exit =
        exit_within(&mut running.child, 20).expect("the second signal did not stop the server");
    assert_eq!(exit.code(), Some(130), "{exit}");
}

/// A half-sent request on the metrics port is dropped once its headers are overdue, instead of
/// holding the connection open forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_drops_a_half_sent_request() {
    let mut config = uhlm_server::ServerConfig::local(common::llm_path(), ["k"]);
    config.metrics = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let server = uhlm_server::Server::start_with_model(config, llm())
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(server.metrics_addr().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the connection was still open 20 s after a half-sent request"
    );
    server.shutdown().await;
}
