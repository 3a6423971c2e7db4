//! `cargo xtask replicas`: the server as several replicas behind a standard load balancer, and
//! replicas killed under load. `--replicas` `uhlm serve` gateways (one certificate and one key
//! file between them, so devices pin one fingerprint) behind nginx's UDP proxy (Debian's
//! `nginx` with its `stream` module), which keeps a QUIC connection's datagrams on one replica
//! by hashing the device's address and port (on loopback every device has the same address).
//! `uhlm loadgen` devices generate through nginx while replicas are killed (SIGKILL, the one
//! holding the most sessions) and restarted. A device whose replica died reconnects through the
//! same address, lands on another replica and rebuilds its session there from the whole context
//! (`Start`); it keeps every token it produced meanwhile on its own. Passes only if every
//! generation finished with no token lost or repeated, every text is what its token ids decode
//! to, and devices did move to another replica.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::command::root;
use crate::soak::{ServerProcess, free_port, generation_checks, metrics_text};

/// nginx and its stream module, from Debian.
const NGINX_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    (
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "libnginx-mod-stream",
    ),
];

/// What the campaign runs; `--short` is the form `cargo xtask test` runs.
#[derive(Debug, clap::Args)]
pub struct ReplicaArgs {
    /// The CI form: 3 replicas, 4 devices for 60 s, one kill, on the dev build.
    #[arg(long)]
    short: bool,
    /// Use the dev build's binaries instead of building release ones.
    #[arg(long)]
    dev_build: bool,
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[arg(long, default_value_t = 16)]
    devices: usize,
    /// How long devices keep starting generations.
    #[arg(long, default_value = "3m")]
    duration: String,
    /// Replica kills (SIGKILL, then a restart), evenly spread over the run.
    #[arg(long, default_value_t = 2)]
    kills: u32,
    /// Where the logs, the nginx configuration and `replicas.json` go.
    #[arg(long, default_value = "target/replicas")]
    out: PathBuf,
    /// Each replica's matmul threads (`uhlm serve --kernel-threads`).
    #[arg(long, default_value_t = 1)]
    kernel_threads: usize,
    /// Devices replay their draft's rows, one token every this many milliseconds (`uhlm
    /// loadgen --replay-token-ms`; 0: every device runs its draft model).
    #[arg(long, default_value_t = 20.0)]
    device_token_ms: f64,
    /// Tokens each generation asks for: long enough that a generation outlasts the time a
    /// device takes to notice its replica is gone (its request timeout), so that it moves to
    /// another replica within the generation.
    #[arg(long, default_value_t = 400)]
    max_tokens: u32,
}

impl ReplicaArgs {
    /// The CI form, on the dev build `cargo xtask test` has just made.
    pub fn short() -> Self {
        Self {
            short: true,
            dev_build: true,
            replicas: 3,
            devices: 4,
            duration: "60s".into(),
            kills: 1,
            out: PathBuf::from("target/replicas-short"),
            kernel_threads: 1,
            device_token_ms: 0.0,
            max_tokens: 400,
        }
    }
}

/// A replica: its process, its metrics address.
struct Replica {
    process: ServerProcess,
    metrics: String,
}

impl Replica {
    fn sessions(&self) -> f64 {
        metric(&self.metrics, "uhlm_sessions").unwrap_or(0.0)
    }
}

/// One sample from a `/metrics` text.
fn metric(addr: &str, name: &str) -> Option<f64> {
    metrics_text(addr)?.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The shipped nginx configuration (`deploy/nginx/uhlm-stream.conf`) as it runs here: its
/// `server` lines replaced by `upstreams`, its `listen` address by `listen`, inside a main
/// configuration of its own (foreground, files under `out`).
fn nginx_conf(out: &Path, listen: &str, upstreams: &[String]) -> Result<String> {
    let shipped = root().join("deploy/nginx/uhlm-stream.conf");
    let template = std::fs::read_to_string(&shipped)
        .with_context(|| format!("reading {}", shipped.display()))?;
    let mut stream = String::new();
    let mut servers_written = false;
    for line in template.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["server", _, options @ ..] if !options.is_empty() => {
                if !servers_written {
                    for u in upstreams {
                        stream.push_str(&format!("    server {u} {}\n", options.join(" ")));
                    }
                    servers_written = true;
                }
            }
            ["listen", _, rest @ ..] => {
                stream.push_str(&format!("    listen {listen} {}\n", rest.join(" ")));
            }
            _ => {
                stream.push_str(line);
                stream.push('\n');
            }
        }
    }
    if !servers_written {
        bail!("{} has no upstream server lines", shipped.display());
    }
    Ok(format!(
        "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {log} info;\n\
         load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         events {{ worker_connections 4096; }}\nstream {{\n{stream}}}\n",
        pid = out.join("nginx.pid").display(),
        log = out.join("nginx-error.log").display(),
    ))
}

pub fn replicas(mut args: ReplicaArgs) -> Result<()> {
    if args.short {
        args = ReplicaArgs {
            dev_build: args.dev_build,
            out: args.out,
            ..ReplicaArgs::short()
        };
    }
    let duration = humantime::parse_duration(&args.duration)
        .with_context(|| format!("--duration {:?}", args.duration))?;
    crate::packages::ensure_packages(NGINX_PACKAGES)?;
    let out = root().join(&args.out);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let uhlm = crate::soak::uhlm_binary(args.dev_build)?;

    let key_file = out.join("api-key");
    std::fs::write(&key_file, "replica-key\n")?;
    let cert_dir = out.join("cert");
    std::fs::create_dir_all(&cert_dir)?;
    let mut replicas = Vec::new();
    let mut pin = None;
    for i in 0..args.replicas {
        let listen = format!("127.0.0.1:{}", free_port(true)?);
        let metrics = format!("127.0.0.1:{}", free_port(false)?);
        let command: Vec<String> = [
            uhlm.as_str(),
            "serve",
            "--model",
            "smollm2",
            "--self-signed",
            "--cert-dir",
            &cert_dir.to_string_lossy(),
            "--listen",
            &listen,
            "--api-keys",
            &key_file.to_string_lossy(),
            "--metrics",
            &metrics,
            "--kernel-threads",
            &args.kernel_threads.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        println!("\n==> {}", command.join(" "));
        let (process, fp) = ServerProcess::start(command, out.join(format!("replica-{i}.log")))?;
        // The first replica made the certificate; the others reuse it from the shared dir.
        if *pin.get_or_insert_with(|| fp.clone()) != fp {
            bail!("replica {i} has another certificate than replica 0");
        }
        replicas.push((listen, Replica { process, metrics }));
    }
    let pin = pin.context("no replica")?;
    let balancer = format!("127.0.0.1:{}", free_port(true)?);
    let upstreams: Vec<String> = replicas.iter().map(|(l, _)| l.clone()).collect();
    let conf = out.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&out, &balancer, &upstreams)?)?;
    println!("\n==> nginx -c {}", conf.display());
    let mut nginx: Child = Command::new("nginx")
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&out)
        .arg("-e")
        .arg(out.join("nginx-error.log"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("nginx.out"))?)
        .spawn()
        .context("starting nginx")?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = nginx.try_wait()? {
        bail!(
            "nginx exited at start ({status}); see {}",
            out.join("nginx.out").display()
        );
    }

    let report_path = out.join("loadgen.json");
    let mut loadgen_args: Vec<String> = [
        "-n",
        "10",
        uhlm.as_str(),
        "loadgen",
        "--server",
        &balancer,
        "--pin",
        &pin,
        "--api-key-file",
        &key_file.to_string_lossy(),
        "--devices",
        &args.devices.to_string(),
        "--duration",
        &args.duration,
        "--long-every",
        "0",
        "--max-tokens",
        &args.max_tokens.to_string(),
        "--out",
        &report_path.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if args.device_token_ms > 0.0 {
        loadgen_args.extend(["--replay-token-ms".into(), args.device_token_ms.to_string()]);
    }
    println!("\n==> nice {}", loadgen_args.join(" "));
    let mut loadgen = Command::new("nice")
        .args(&loadgen_args)
        .stdout(std::fs::File::create(out.join("loadgen.out"))?)
        .stderr(std::fs::File::create(out.join("loadgen.log"))?)
        .spawn()
        .context("starting uhlm loadgen")?;

    let t0 = Instant::now();
    let mut kills_done = 0u32;
    let mut killed_sessions = 0.0;
    let status = loop {
        if let Some(status) = loadgen.try_wait()? {
            break status;
        }
        let next_kill = duration.mul_f64(f64::from(kills_done + 1) / f64::from(args.kills + 1));
        if kills_done < args.kills && t0.elapsed() >= next_kill {
            // The replica holding the most sessions: the kill must hit devices.
            let (i, sessions) = replicas
                .iter()
                .map(|(_, r)| r.sessions())
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .context("no replica")?;
            println!(
                "[{:>4.0}s] killing replica {i} ({sessions} sessions, SIGKILL)",
                t0.elapsed().as_secs_f64()
            );
            let fp = replicas[i].1.process.kill_and_restart()?;
            if fp != pin {
                bail!("replica {i} came back with another certificate");
            }
            killed_sessions += sessions;
            kills_done += 1;
            println!(
                "[{:>4.0}s] replica {i} restarted",
                t0.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let served: Vec<f64> = replicas
        .iter()
        .map(|(_, r)| metric(&r.metrics, "uhlm_tokens_verified_total").unwrap_or(0.0))
        .collect();
    for (_, r) in replicas {
        r.process.stop()?;
    }
    let _ = nginx.kill();
    let _ = nginx.wait();
    if !status.success() {
        bail!(
            "uhlm loadgen failed ({status}); see {}",
            out.join("loadgen.log").display()
        );
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report_path).context("reading the loadgen report")?,
    )?;
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    let mut checks = generation_checks(&report);
    checks.extend([
        (
            "replicas were killed under devices as planned",
            kills_done == args.kills && killed_sessions > 0.0,
        ),
        (
            "devices that lost their replica moved to another within their generation",
            n("link_downs") > 0 && n("reconnects") > 0 && n("reconnects") != u64::MAX,
        ),
    ]);
    let summary = serde_json::json!({
        "replicas": args.replicas,
        "devices": args.devices,
        "duration": args.duration,
        "kills": kills_done,
        "sessions_on_killed_replicas": killed_sessions,
        "tokens_verified_per_replica_since_its_last_start": served,
        "checks": checks.iter().map(|(what, ok)| serde_json::json!({"check": what, "passed": ok})).collect::<Vec<_>>(),
        "loadgen": report,
    });
    let json = out.join("replicas.json");
    std::fs::write(&json, serde_json::to_string_pretty(&summary)?)?;
    println!("\n{}", serde_json::to_string_pretty(&summary["checks"])?);
    println!(
        "generations {} tokens {} (offline {}, verified {}, local {}), links down {}, reconnects \
         {}, sessions on the killed replicas {killed_sessions}",
        n("generations"),
        n("tokens"),
        n("offline_tokens"),
        n("verified_tokens"),
        n("local_tokens"),
        n("link_downs"),
        n("reconnects"),
    );
    println!("report: {}", json.display());
    let failed: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| *what)
        .collect();
    if !failed.is_empty() {
        bail!("replica campaign failed: {failed:?}; see {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_nginx_file_runs_with_the_campaigns_addresses() {
        let upstreams = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let conf = nginx_conf(Path::new("/o"), "127.0.0.1:9", &upstreams).unwrap();
        assert!(conf.contains("hash $remote_addr$remote_port consistent;"));
        assert!(conf.contains("    server 127.0.0.1:1 max_fails=1 fail_timeout=10s;\n"));
        assert!(conf.contains("    server 127.0.0.1:2 max_fails=1 fail_timeout=10s;\n"));
        assert!(conf.contains("    listen 127.0.0.1:9 udp;\n"));
        assert!(!conf.contains("10.0.0.11"), "{conf}");
        assert!(conf.contains("proxy_pass uhlm_replicas;"));
    }
}
