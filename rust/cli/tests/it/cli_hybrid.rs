//! `uhlm run` and `uhlm demo` against a real `uhlm-server` process over QUIC on loopback.
//!
//! Needs the cached SmolLM2 model (`uhlm models fetch`); `UHLM_REQUIRE_MODELS=1` turns its
//! absence into a failure. The `uhlm-server` binary is the workspace's, built next to `uhlm`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

const PROMPT: &str = "The three primary colours are";

fn uhlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_uhlm"))
        .args(args)
        .output()
        .expect("run uhlm")
}

fn ok_stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "uhlm failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn llm() -> Option<PathBuf> {
    match uhlm_model::fetch::resolve_model("smollm2") {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(
                std::env::var_os("UHLM_REQUIRE_MODELS").is_none(),
                "{e} and UHLM_REQUIRE_MODELS is set"
            );
            eprintln!("skipping: {e}");
            None
        }
    }
}

/// A `uhlm-server` child process; killed on drop.
struct Server {
    child: Child,
    addr: String,
    pin: String,
    key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(dir: &Path, llm: &Path) -> Server {
    let exe = Path::new(env!("CARGO_BIN_EXE_uhlm")).with_file_name("uhlm-server");
    assert!(
        exe.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        exe.display()
    );
    let key = "cli-test-key".to_string();
    std::fs::write(dir.join("keys.txt"), format!("{key}\n")).unwrap();
    let mut child = Command::new(exe)
        .arg("--model")
        .arg(llm)
        .args(["--listen", "127.0.0.1:0", "--self-signed", "--cert-dir"])
        .arg(dir)
        .arg("--api-keys")
        .arg(dir.join("keys.txt"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn uhlm-server");
    let stdout = child.stdout.take().unwrap();
    let listening = BufReader::new(stdout).lines().find_map(|line| {
        let line = line.ok()?;
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["uhlm-server", "listening", "on", addr, "fingerprint", fp] => {
                Some((addr.to_string(), fp.to_string()))
            }
            _ => None,
        }
    });
    // Owned by a `Server` before any panic, so the child is reaped either way.
    let mut server = Server {
        addr: String::new(),
        pin: String::new(),
        key,
        child,
    };
    (server.addr, server.pin) = listening.expect("uhlm-server exited before printing its address");
    server
}

/// The default draft, derived from `llm` into `dir` by the CLI.
fn derive_draft(dir: &Path, llm: &Path) -> PathBuf {
    let slm = dir.join("draft.gguf");
    ok_stdout(&uhlm(&[
        "models",
        "derive-draft",
        "--from",
        llm.to_str().unwrap(),
        "--out",
        slm.to_str().unwrap(),
    ]));
    slm
}

/// `uhlm run --json` against `server`, the key read from a file (never on the command line).
fn run_json(server: &Server, slm: &Path, extra: &[&str]) -> Value {
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{}\n", server.key)).unwrap();
    let mut args = vec![
        "run".to_string(),
        "--slm".into(),
        slm.display().to_string(),
        "--server".into(),
        server.addr.clone(),
        "--pin".into(),
        server.pin.clone(),
        "--api-key-file".into(),
        key_file.path().display().to_string(),
        "--json".into(),
        "--seed".into(),
        "3".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(PROMPT.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    serde_json::from_str(&ok_stdout(&uhlm(&argv))).expect("one JSON object")
}

fn ids(v: &Value) -> Vec<u64> {
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn stat(v: &Value, name: &str) -> u64 {
    v["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats.{name} missing in {v}"))
}

#[test]
fn run_reproduces_the_llm_and_skips_with_the_default_policy() {
    let Some(llm) = llm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let slm = derive_draft(dir.path(), &llm);
    let server = start_server(dir.path(), &llm);

    let alone = ok_stdout(&uhlm(&[
        "generate",
        "--model",
        llm.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "--ids",
        PROMPT,
    ]));
    let alone: Vec<u64> = alone
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(alone.len(), 20);

    // Greedy, every token verified: the LLM's own output, whatever the uplink codec.
    for codec in ["dense-f32", "topk:8", "topp:0.9"] {
        let v = run_json(
            &server,
            &slm,
            &[
                "--mode",
                "hlm",
                "--codec",
                codec,
                "--temperature",
                "0",
                "--max-tokens",
                "20",
            ],
        );
        assert_eq!(ids(&v), alone, "hlm with {codec}");
        assert_eq!(stat(&v, "skipped"), 0);
        assert_eq!(
            stat(&v, "sent"),
            stat(&v, "accepted") + stat(&v, "resampled")
        );
        let sources = v["sources"].as_array().unwrap();
        assert_eq!(sources.len(), alone.len());
        assert!(sources.iter().all(|s| s == "accepted" || s == "resampled"));
    }
    // The hybrid mode with a threshold that skips nothing is the same loop.
    let v = run_json(
        &server,
        &slm,
        &[
            "--threshold",
            "0",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
        ],
    );
    assert_eq!(ids(&v), alone, "uhlm with threshold 0");
    assert_eq!(stat(&v, "skipped"), 0);

    // The default policy decides some tokens on the device; the counters add up.
    let v = run_json(
        &server,
        &slm,
        &["--temperature", "0.7", "--max-tokens", "48"],
    );
    let (drafted, skipped, sent) = (stat(&v, "drafted"), stat(&v, "skipped"), stat(&v, "sent"));
    assert!(skipped > 0 && sent > 0, "{v}");
    assert_eq!(drafted, skipped + sent);
    assert_eq!(sent, stat(&v, "accepted") + stat(&v, "resampled"));
    assert_eq!(stat(&v, "offline"), 0);
    assert!(stat(&v, "uplink_bytes") > 0 && stat(&v, "downlink_bytes") > 0);
    let local = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| *s == "local")
        .count() as u64;
    // The last draft may be an EOS that is decided but not shown.
    assert!(local == skipped || local + 1 == skipped, "{v}");

    // A wrong key is refused with a message that says so, and nothing is printed on stdout.
    let o = uhlm(&[
        "run",
        "--slm",
        slm.to_str().unwrap(),
        "--server",
        &server.addr,
        "--pin",
        &server.pin,
        "--api-key",
        "wrong",
        "--json",
        PROMPT,
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(
        err.contains("api key") || err.contains("unauthori"),
        "{err}"
    );
}

#[test]
fn a_combined_predictor_is_calibrated_rebuilt_from_saved_runs_and_run() {
    let Some(llm) = llm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let slm = derive_draft(dir.path(), &llm);
    let path = |name: &str| dir.path().join(name).display().to_string();
    let calibrate = |extra: &[&str]| {
        let mut args = vec!["calibrate".to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        ok_stdout(&uhlm(&argv));
    };
    let pair = [
        "--slm",
        slm.to_str().unwrap(),
        "--llm",
        llm.to_str().unwrap(),
        "--count",
        "8",
        "--max-tokens",
        "24",
    ];
    calibrate(
        &[
            &pair[..],
            &[
                "--out",
                &path("default.json"),
                "--samples",
                &path("run.json"),
            ],
        ]
        .concat(),
    );
    // The saved run gives the same file without running the models again, and the combined
    // predictor's.
    calibrate(&[
        "--from",
        &path("run.json"),
        "--out",
        &path("default-again.json"),
    ]);
    calibrate(&[
        "--from",
        &path("run.json"),
        "--combined",
        "--out",
        &path("combined.json"),
    ]);
    let read = |name: &str| std::fs::read_to_string(path(name)).unwrap();
    assert_eq!(read("default.json"), read("default-again.json"));
    let combined: Value = serde_json::from_str(&read("combined.json")).unwrap();
    assert_eq!(combined["estimator"]["kind"], "combined");
    assert_eq!(
        combined["estimator"]["combiner"]["weights"]
            .as_array()
            .unwrap()
            .len(),
        4
    );

    // Eight outputs certify no skipping at the default per-output target: the SDK sends every
    // token, scored by the combined predictor, and greedy decoding gives the LLM's own output.
    let alone = ok_stdout(&uhlm(&[
        "generate",
        "--model",
        llm.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ids",
        PROMPT,
    ]));
    let server = start_server(dir.path(), &llm);
    let v = run_json(
        &server,
        &slm,
        &[
            "--calibration",
            &path("combined.json"),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
    );
    let ids: Vec<String> = ids(&v).iter().map(u64::to_string).collect();
    assert_eq!(ids.join(","), alone.trim());
    assert_eq!(stat(&v, "skipped"), 0);
    assert_eq!(stat(&v, "sent"), 12);
}

#[test]
fn demo_prints_the_text_and_a_summary() {
    if llm().is_none() {
        return;
    }
    let out = ok_stdout(&uhlm(&[
        "demo",
        "--pair",
        "smollm2",
        "--max-tokens",
        "24",
        "--seed",
        "1",
        "Name three fruits.",
    ]));
    for row in [
        "tokens",
        "skipped",
        "sent for verification",
        "uplink bytes",
        "tokens/s",
    ] {
        assert!(out.contains(row), "no `{row}` in:\n{out}");
    }
}

/// `uhlm bench paper --quick`: every system is reported, and the numbers are consistent with
/// what each system is (not with any speed).
#[test]
fn bench_paper_quick_reports_every_system_consistently() {
    let Some(llm) = llm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let slm = derive_draft(dir.path(), &llm);
    let out = dir.path().join("bench");
    let v: Value = serde_json::from_str(&ok_stdout(&uhlm(&[
        "bench",
        "paper",
        "--quick",
        "--json",
        "--slm",
        slm.to_str().unwrap(),
        "--llm",
        llm.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])))
    .expect("one JSON object");
    let systems = v["systems"].as_array().expect("systems");
    let names: Vec<&str> = systems
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["slm", "llm", "hlm", "u-hlm", "cu-hlm", "uhlm"]);
    let get = |name: &str, metric: &str| -> f64 {
        systems.iter().find(|s| s["name"] == name).unwrap()[metric]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}.{metric}"))
    };
    for s in systems {
        for metric in ["skip_rate", "agreement", "fidelity"] {
            let x = s[metric].as_f64().unwrap();
            assert!(
                (0.0..=1.0 + 1e-9).contains(&x),
                "{}: {metric} {x}",
                s["name"]
            );
        }
        assert!(s["llm_loglik"].as_f64().unwrap() < 0.0);
        let tput = s["throughput_tokens_per_s"].as_object().unwrap();
        let keys: Vec<&str> = tput.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "link_cell_edge",
                "link_good",
                "link_poor",
                "snr_0db",
                "snr_20db"
            ],
            "one value per simulated SNR and per measured link profile"
        );
        assert!(tput.values().all(|t| t.as_f64().unwrap() > 0.0));
    }
    assert!(v["positions"].as_u64().unwrap() > 0);
    // What each system is: the SLM never asks, HLM always does and is exact.
    assert_eq!(get("slm", "skip_rate"), 1.0);
    assert_eq!(get("slm", "uplink_bytes_per_token"), 0.0);
    assert_eq!(get("hlm", "skip_rate"), 0.0);
    assert_eq!(get("hlm", "agreement"), 1.0);
    assert!(get("hlm", "fidelity") > 0.999);
    assert_eq!(get("llm", "fidelity"), 1.0);
    assert!((get("hlm", "llm_loglik") - get("llm", "llm_loglik")).abs() < 1e-3);
    // Dense f32 over a 49,152-token vocabulary is ~196 KB a token; our codec a few hundred bytes.
    assert!(get("hlm", "uplink_bytes_per_token") > 196_000.0);
    assert!(get("uhlm", "uplink_bytes_per_token") < get("hlm", "uplink_bytes_per_token") / 100.0);
    // An exact uplink keeps fidelity wherever nothing is skipped; its deviation is the skips'.
    assert!(get("uhlm", "fidelity") >= get("slm", "fidelity"));
    // uhlm skips by the SDK's default policy: the per-output bound its calibration certifies.
    let uhlm_system = systems.iter().find(|s| s["name"] == "uhlm").unwrap();
    let certified =
        v["calibration"]["fits"][0]["calibration"]["output_quality"]["controlled"]["u_th"]
            .as_f64()
            .unwrap_or(0.0);
    assert_eq!(uhlm_system["kind"]["threshold"].as_f64(), Some(certified));
    // Its measured runs start from that calibration, written beside the report.
    let written = std::fs::read_to_string(out.join("calibration.json")).unwrap();
    let written: Value = serde_json::from_str(&written).unwrap();
    assert_eq!(written, v["calibration"]["fits"][0]["calibration"]);
    for file in [
        "paper.json",
        "systems.csv",
        "threshold_sweep.csv",
        "calibration.svg",
        "threshold_sweep.svg",
        "throughput_snr.svg",
    ] {
        let path = out.join(file);
        assert!(
            std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
            "{} missing",
            path.display()
        );
    }
    let csv = std::fs::read_to_string(out.join("systems.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + systems.len());

    // Measured for real: a `uhlm serve` process, QUIC through the emulated link, per profile.
    let measured = v["measured"].as_array().expect("measured runs");
    assert_eq!(
        measured.len(),
        3 * systems.len(),
        "every system on every profile"
    );
    let run = |system: &str, profile: &str| {
        measured
            .iter()
            .find(|r| r["system"] == system && r["profile"] == profile)
            .unwrap_or_else(|| panic!("no {system} run on {profile}"))
    };
    for profile in ["good", "cell-edge", "poor"] {
        for name in &names {
            let r = run(name, profile);
            let tokens = r["tokens"].as_u64().unwrap();
            assert!(
                (1..=3).contains(&tokens),
                "{name} on {profile}: {tokens} tokens"
            );
            assert_eq!(r["offline"], 0, "{name} on {profile} lost the server");
            let up = &r["link"]["uplink"];
            let packets = up["offered"]["packets"].as_u64().unwrap();
            if *name == "slm" {
                assert_eq!(r["skip_rate"], 1.0);
                assert_eq!(r["uplink_bytes_per_token"], 0.0);
                assert_eq!(packets, 0, "the SLM alone never touches the link");
            } else {
                assert!(
                    packets > 0,
                    "{name} on {profile} sent nothing through the link"
                );
            }
            // The same throughput in the system's map.
            let key = format!("link_{}", profile.replace('-', "_"));
            let listed =
                systems.iter().find(|s| s["name"] == *name).unwrap()["throughput_tokens_per_s"]
                    [&key]
                    .as_f64()
                    .unwrap();
            assert_eq!(listed, r["tokens_per_s"].as_f64().unwrap());
        }
        // Every token verified with a dense f32 distribution: the bytes say so.
        assert_eq!(run("hlm", profile)["skip_rate"], 0.0);
        assert!(
            run("hlm", profile)["uplink_bytes_per_token"]
                .as_f64()
                .unwrap()
                > 196_000.0
        );
        assert!(
            run("uhlm", profile)["uplink_bytes_per_token"]
                .as_f64()
                .unwrap()
                < 2_000.0
        );
    }
    // Loss is emulated for real on the poor link (3% each way) but never on the good one.
    let lost = |p: &str| -> u64 {
        measured
            .iter()
            .filter(|r| r["profile"] == p)
            .map(|r| {
                r["link"]["uplink"]["dropped"]["loss"]["packets"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    assert_eq!(lost("good"), 0);
    assert!(
        lost("poor") > 0,
        "3% of the poor link's uplink packets are lost"
    );
    for file in ["measured.csv", "measured_links.svg"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
}

/// Lines of a JSONL sample file.
fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// `uhlm bench humaneval` on the small pair: every system generates HumanEval completions as
/// real software (SDK here, `uhlm serve` child process over QUIC), every completion is executed,
/// the counters say what each system is, exact verification makes HLM's greedy completions the
/// LLM's, and a second run resumes without redoing anything.
#[test]
fn bench_humaneval_scores_every_system_and_resumes() {
    let Some(llm) = llm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let slm = derive_draft(dir.path(), &llm);
    let out = dir.path().join("humaneval");
    let args = |extra: &[&str]| -> Output {
        let mut a = vec![
            "bench",
            "humaneval",
            "--pair",
            "smollm2",
            "--slm",
            slm.to_str().unwrap(),
            "--llm",
            llm.to_str().unwrap(),
            "--limit",
            "5",
            "--max-tokens",
            "40",
            "--samples",
            "1",
            "--calibration-problems",
            "3",
            "--calibration-tokens",
            "16",
            "--sweep",
            "0.3",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        a.extend(extra);
        uhlm(&a)
    };
    let v: Value = serde_json::from_str(&ok_stdout(&args(&[]))).expect("one JSON object");
    let systems = v["systems"].as_array().expect("systems");
    let names: Vec<&str> = systems
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["slm", "llm", "hlm", "u-hlm", "cu-hlm", "uhlm", "uhlm@0.3"]
    );
    assert_eq!(v["problems"], 5);
    assert_eq!(v["folds"][0]["calibration"], serde_json::json!([5, 6, 7]));
    let get = |name: &str, metric: &str| -> f64 {
        systems.iter().find(|s| s["name"] == name).unwrap()[metric]
            .as_f64()
            .unwrap_or_else(|| panic!("{name}.{metric}"))
    };
    for s in systems {
        let name = s["name"].as_str().unwrap();
        assert_eq!(s["problems"], 5, "{name}");
        for metric in ["pass_at_1_greedy", "pass_at_1_sampled", "device_share"] {
            let x = get(name, metric);
            assert!((0.0..=1.0).contains(&x), "{name}: {metric} {x}");
        }
        assert!(get(name, "tokens") > 0.0, "{name}");
        assert_eq!(get(name, "offline"), 0.0, "{name}");
        // One greedy and one sampled completion per problem, each executed.
        for (file, temperature) in [("greedy", 0.0), ("t0.2", 0.2)] {
            let samples = jsonl(&out.join(format!("samples/{name}-{file}.jsonl")));
            assert_eq!(samples.len(), 5, "{name} {file}");
            for (i, sample) in samples.iter().enumerate() {
                assert_eq!(sample["task_id"], format!("HumanEval/{i}"));
                assert!(sample["completion"].is_string());
                assert_eq!(sample["temperature"].as_f64().unwrap() as f32, temperature);
                assert!(sample["passed"].is_boolean(), "{sample}");
                assert!(sample["result"].is_string(), "{sample}");
            }
        }
    }
    assert_eq!(get("slm", "device_share"), 1.0);
    assert_eq!(get("slm", "uplink_bytes_per_token"), 0.0);
    assert_eq!(get("slm", "llm_forwards_per_token"), 0.0);
    assert_eq!(get("llm", "device_share"), 0.0);
    assert!(get("llm", "llm_forwards_per_token") >= 1.0);
    assert_eq!(get("hlm", "device_share"), 0.0);
    assert!(get("hlm", "llm_forwards_per_token") >= 1.0);
    // Dense f32 over 49,152 tokens is ~196 KB a token; the exact compressed uplink is not.
    assert!(get("hlm", "uplink_bytes_per_token") > 150_000.0);
    assert!(get("uhlm@0.3", "uplink_bytes_per_token") < 2_000.0);
    assert!(get("uhlm@0.3", "device_share") > 0.0);
    // Exact verification: at temperature 0, HLM writes exactly what the LLM alone writes.
    let completions = |name: &str| -> Vec<Value> {
        jsonl(&out.join(format!("samples/{name}-greedy.jsonl")))
            .iter()
            .map(|s| s["completion"].clone())
            .collect()
    };
    assert_eq!(completions("hlm"), completions("llm"));
    for file in [
        "humaneval.json",
        "humaneval.csv",
        "humaneval.svg",
        "run.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }

    // Resumed: nothing is generated again, the report is the same.
    let again = args(&[]);
    let err = String::from_utf8_lossy(&again.stderr).into_owned();
    let v2: Value = serde_json::from_str(&ok_stdout(&again)).unwrap();
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(v2["systems"], v["systems"]);
    assert_eq!(jsonl(&out.join("samples/uhlm-greedy.jsonl")).len(), 5);
    // Other options cannot resume into the same directory.
    let other = args(&["--max-risk", "0.05"]);
    assert!(!other.status.success());
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("other options"),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
}

/// `uhlm bench capacity` on the small pair: it records device traces through the real SDK,
/// replays them with simulated devices against a real `uhlm serve` (uhlm, then LLM-only
/// streaming), counts what the server did, and reuses the traces on a second run.
#[test]
fn bench_capacity_replays_device_traces_against_a_real_server() {
    let Some(llm) = llm() else { return };
    let dir = tempfile::tempdir().unwrap();
    let slm = derive_draft(dir.path(), &llm);
    let out = dir.path().join("capacity");
    let run = |devices: &str, systems: &str| -> Value {
        let o = uhlm(&[
            "bench",
            "capacity",
            "--pair",
            "smollm2",
            "--slm",
            slm.to_str().unwrap(),
            "--llm",
            llm.to_str().unwrap(),
            "--prompts",
            "2",
            "--max-tokens",
            "24",
            "--devices",
            devices,
            "--systems",
            systems,
            "--duration",
            "2s",
            "--token-ms",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ]);
        serde_json::from_str(&ok_stdout(&o)).expect("one JSON object")
    };
    let v = run("1,2", "uhlm,llm");
    let traces_text = std::fs::read_to_string(out.join("traces.jsonl")).unwrap();
    let traces: Vec<Value> = traces_text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(traces.len(), 2);
    for t in &traces {
        // Every recorded Verify decides a position of its generation, in order.
        let prompt = t["prompt"].as_array().unwrap().len() as u64;
        let tokens = t["tokens"].as_array().unwrap().len() as u64;
        let positions: Vec<u64> = t["verifies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["position"].as_u64().unwrap())
            .collect();
        assert!(tokens > 0);
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert!(
            positions
                .iter()
                .all(|&p| p >= prompt && p < prompt + tokens),
            "{positions:?} outside {prompt}..{}",
            prompt + tokens
        );
    }
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 4, "{v}");
    for p in points {
        let (generated, server) = (
            p["generated_tokens"].as_u64().unwrap(),
            p["server_tokens"].as_u64().unwrap(),
        );
        assert!(p["generations"].as_u64().unwrap() >= 1, "{p}");
        assert!(generated > 0 && p["server_peak_rss_bytes"].as_u64().unwrap() > 0);
        assert!(p["passes_per_token"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["sessions_per_pass"].as_f64().unwrap() >= 1.0, "{p}");
        match p["system"].as_str().unwrap() {
            // The server decides every token of a streamed generation ...
            "llm" => assert_eq!(server, generated, "{p}"),
            // ... and only the sent ones of a replayed trace.
            "uhlm" => assert!(server <= generated, "{p}"),
            other => panic!("unexpected system {other}"),
        }
    }
    // The traces are kept and reused.
    let again = run("1", "llm");
    assert_eq!(again["points"].as_array().unwrap().len(), 1);
    assert_eq!(
        std::fs::read_to_string(out.join("traces.jsonl")).unwrap(),
        traces_text
    );
    assert!(out.join("capacity-throughput.svg").is_file());
}
