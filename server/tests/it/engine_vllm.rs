//! The gateway on vLLM (`--engine vllm URL`).
//!
//! vLLM does not install on this CPU host (its wheels need CUDA), so two kinds of test:
//!
//! - Here, against a **stand-in**: a small HTTP server in this test that answers vLLM's
//!   documented `/v1/models`, `/tokenize` and `/v1/completions` shapes from the toy model, with
//!   vLLM's sampling semantics written independently of the SDK's (temperature, then top-k,
//!   then top-p renormalised over what top-k kept; processed or raw log-probabilities;
//!   `logprob_token_ids` honoured or ignored). It tests the gateway's side: the requests, the
//!   start-up check, and that what the phone emits follows the engine's distribution when the
//!   draft's probability comes from `logprob_token_ids` and the residual from the engine's
//!   samples. It proves nothing about vLLM itself.
//! - Where vLLM runs: with `UHLM_VLLM_URL` set (`cargo xtask vllm-check URL`), the same
//!   exactness test on the real LLM through the real vLLM.

use crate::e2e_common;
use crate::engine_llama_server::{generate, one_token_histogram, refused_at_start, toy_pair_files};
use crate::runtime_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use e2e_common::ServerProc;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runtime_support::Toy;
use serde_json::{Value, json};
use uhlm_core::sampling::SamplingOptions;
use uhlm_model::{LoadOptions, Model};
use uhlm_sdk::{Codec, GenerationOptions, HybridEngine, Mode, PolicyConfig};

/// How the stand-in behaves where vLLM versions and flags differ.
#[derive(Clone, Copy, Default)]
struct Flavour {
    /// What its log-probabilities are (`--logprobs-mode`).
    mode: LogprobsMode,
    /// A vLLM older than `logprob_token_ids`: the field is ignored.
    ignores_token_ids: bool,
}

/// vLLM's `--logprobs-mode` values the gateway meets.
#[derive(Clone, Copy, Default, PartialEq)]
enum LogprobsMode {
    /// Of the distribution it samples from: what the gateway needs.
    #[default]
    ProcessedLogprobs,
    /// Before temperature, top-k and top-p (vLLM's default).
    RawLogprobs,
    /// The logits after temperature, top-k and top-p, not normalised.
    ProcessedLogits,
}

/// A stand-in for `vllm serve` on the toy model; stops on drop.
struct StandIn {
    url: String,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
}

impl StandIn {
    fn start(model: Arc<Model>, flavour: Flavour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (stop2, requests2) = (stop.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let (model, requests) = (model.clone(), requests2.clone());
                std::thread::spawn(move || {
                    requests.fetch_add(1, Ordering::Relaxed);
                    serve_one(stream, &model, flavour);
                });
            }
        });
        Self {
            url,
            stop,
            requests,
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
    }
}

/// Reads one HTTP/1.1 request and answers it, closing the connection.
fn serve_one(stream: TcpStream, model: &Arc<Model>, flavour: Flavour) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, answer) = match (method.as_str(), path.as_str()) {
        ("GET", "/v1/models") => (
            200,
            json!({"object": "list", "data": [{"id": "toy", "object": "model",
                   "max_model_len": Toy::llama().context}]}),
        ),
        ("POST", "/tokenize") => (200, tokenize(model, &request)),
        ("POST", "/v1/completions") => complete(model, &request, flavour),
        _ => (404, json!({"error": {"message": "not found", "code": 404}})),
    };
    let text = answer.to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{text}",
        text.len()
    );
}

/// `/tokenize`: a special token's text is that token, as with Hugging Face tokenizers.
fn tokenize(model: &Model, request: &Value) -> Value {
    let text = request["prompt"].as_str().unwrap_or_default();
    let tok = model.tokenizer();
    let special = tok
        .bos_id()
        .into_iter()
        .chain(tok.eos_ids().iter().copied())
        .find(|&id| tok.token_piece(id) == Some(text));
    let tokens = match special {
        Some(id) => vec![id],
        None => tok.encode(text, false).unwrap(),
    };
    json!({"count": tokens.len(), "max_model_len": Toy::llama().context, "tokens": tokens})
}

fn error(message: &str) -> (u16, Value) {
    (
        400,
        json!({"error": {"message": message, "type": "BadRequestError", "code": 400}}),
    )
}

/// `/v1/completions` with token-id prompts and `max_tokens` 1, as vLLM answers it.
fn complete(model: &Arc<Model>, request: &Value, flavour: Flavour) -> (u16, Value) {
    let Some(prompt) = request["prompt"].as_array() else {
        return error("prompt must be token ids");
    };
    let prompt: Vec<u32> = prompt.iter().map(|t| t.as_u64().unwrap() as u32).collect();
    if request["max_tokens"] != 1 || request["n"] != 1 {
        return error("the stand-in answers max_tokens 1, n 1 only");
    }
    let logits = match model.session().score_last(&prompt) {
        Ok(l) => l,
        Err(e) => return error(&format!("the prompt does not fit: {e}")),
    };
    let temperature = request["temperature"].as_f64().unwrap_or(1.0) as f32;
    let top_k = request["top_k"].as_i64().unwrap_or(0);
    let top_p = request["top_p"].as_f64().unwrap_or(1.0) as f32;
    // vLLM's order: temperature, then top-k, then top-p over the renormalised survivors.
    let mut scaled: Vec<f32> = if temperature > 0.0 {
        logits.iter().map(|l| l / temperature).collect()
    } else {
        logits.clone()
    };
    let mut order: Vec<usize> = (0..scaled.len()).collect();
    order.sort_by(|&a, &b| scaled[b].total_cmp(&scaled[a]));
    if top_k > 0 {
        for &t in &order[(top_k as usize).min(order.len())..] {
            scaled[t] = f32::NEG_INFINITY;
        }
    }
    if top_p < 1.0 {
        let probs = softmax(&scaled);
        let mut mass = 0.0;
        for &t in &order {
            if mass >= top_p {
                scaled[t] = f32::NEG_INFINITY;
            }
            mass += probs[t];
        }
    }
    let processed = log_softmax(&scaled);
    let seed = request["seed"].as_u64().unwrap_or(0);
    let token = if temperature <= 0.0 {
        order[0]
    } else {
        let probs = softmax(&scaled);
        let u: f32 = ChaCha8Rng::seed_from_u64(seed).random();
        let mut acc = 0.0;
        let mut pick = order[0];
        for (t, &p) in probs.iter().enumerate() {
            acc += p;
            if p > 0.0 {
                pick = t;
            }
            if u < acc {
                break;
            }
        }
        pick
    };
    let reported = match flavour.mode {
        LogprobsMode::ProcessedLogprobs => processed,
        LogprobsMode::RawLogprobs => log_softmax(&logits),
        LogprobsMode::ProcessedLogits => scaled,
    };
    let floor = |l: f32| l.max(-9999.0);
    let name = |t: usize| format!("token_id:{t}");
    let mut top = serde_json::Map::new();
    top.insert(name(token), json!(floor(reported[token])));
    let asked = request["logprob_token_ids"]
        .as_array()
        .filter(|_| !flavour.ignores_token_ids);
    let n = request["logprobs"].as_i64();
    if asked.is_some() && n.is_none() {
        return error("when using `logprob_token_ids`, `logprobs` must be set.");
    }
    match (asked, n) {
        (Some(ids), _) => {
            for id in ids {
                let id = id.as_u64().unwrap() as usize;
                top.insert(name(id), json!(floor(reported[id])));
            }
        }
        // As vLLM's completion API does: -1 passes validation and lists no candidate.
        (None, Some(-1)) => top.clear(),
        (None, Some(k)) => {
            let mut by_reported: Vec<usize> = (0..reported.len()).collect();
            by_reported.sort_by(|&a, &b| reported[b].total_cmp(&reported[a]));
            for &t in by_reported.iter().take(k as usize) {
                top.insert(name(t), json!(floor(reported[t])));
            }
        }
        (None, None) => {}
    }
    let logprobs = n.map(|_| {
        json!({"text_offset": [0], "token_logprobs": [floor(reported[token])],
               "tokens": [name(token)], "top_logprobs": [top]})
    });
    (
        200,
        json!({"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "toy",
               "choices": [{"index": 0, "text": "", "logprobs": logprobs,
                            "finish_reason": "length", "stop_reason": null,
                            "token_ids": [token], "prompt_logprobs": null,
                            "prompt_token_ids": prompt}],
               "usage": {"prompt_tokens": prompt.len(), "completion_tokens": 1,
                         "total_tokens": prompt.len() + 1}}),
    )
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    log_softmax(logits).iter().map(|l| l.exp()).collect()
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits.iter().map(|l| l - max - sum.ln()).collect()
}

const PROMPT: &str = "he said";

/// The toy pair, the stand-in of `flavour` on the LLM, and a gateway in front of it.
struct Rig {
    stand_in: StandIn,
    server: ServerProc,
    phone: HybridEngine,
    /// The stand-in's distribution after the prompt at temperature 1 (after `top_k`).
    p: Vec<f32>,
    eos: Vec<u32>,
}

impl Rig {
    fn start(dir: &Path, flavour: Flavour, top_k: Option<u32>) -> Self {
        let (llm, slm) = toy_pair_files(dir);
        let model = Model::load(&llm, &LoadOptions::default()).unwrap();
        let prompt = model.tokenizer().encode(PROMPT, false).unwrap();
        let mut logits = model.session().score_last(&prompt).unwrap();
        if let Some(k) = top_k {
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k as usize - 1];
            logits
                .iter_mut()
                .filter(|l| **l < kth)
                .for_each(|l| *l = f32::NEG_INFINITY);
        }
        let p = softmax(&logits);
        let eos = model.tokenizer().eos_ids().to_vec();
        let stand_in = StandIn::start(model, flavour);
        let server =
            ServerProc::start_model(llm.to_str().unwrap(), &["--engine", "vllm", &stand_in.url]);
        let mut config =
            server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all());
        config.slm_path = slm;
        let phone = HybridEngine::new(config).unwrap();
        Self {
            stand_in,
            server,
            phone,
            p,
            eos,
        }
    }
}

#[test]
fn through_vllms_api_the_phone_samples_exactly_the_engines_distribution() {
    // The draft's probability from `logprob_token_ids`, the residual from the engine's own
    // samples: a rejected draft's residual needs several of them (asked for four at a time).
    const RUNS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let rig = Rig::start(dir.path(), Flavour::default(), None);
    let (p, resampled) = one_token_histogram(&rig.phone, PROMPT, &rig.p, &rig.eos, RUNS, None);
    let requests = rig.server.metric("uhlm_engine_requests_total");
    let bytes = rig.server.metric("uhlm_engine_response_bytes_total");
    eprintln!(
        "resampled {resampled} of {RUNS}, p {p}, engine requests {requests}, {:.0} bytes each",
        bytes / requests
    );
    assert!(resampled > RUNS as u64 / 10, "only {resampled} resampled");
    // Beyond one request per Verify: the residual's further samples.
    assert!(requests > 1.2 * RUNS as f64, "{requests} engine requests");
    // Asked answers: no whole vocabulary after start-up.
    assert!(
        bytes / requests < 2_000.0,
        "{bytes} bytes in {requests} requests"
    );
    assert!(
        p > 1e-3,
        "chi-square p = {p}: not the engine's distribution"
    );
    // With top-k, what top-k removes has probability 0 (vLLM's floor) and never comes out.
    let rig = Rig::start(dir.path(), Flavour::default(), Some(4));
    let (p, resampled) = one_token_histogram(&rig.phone, PROMPT, &rig.p, &rig.eos, 1500, Some(4));
    eprintln!("top-k 4: resampled {resampled}, p {p}");
    assert!(p > 1e-3, "chi-square p = {p} with top-k 4");
    assert!(rig.stand_in.requests.load(Ordering::Relaxed) > 1500);
}

#[test]
fn a_vllm_without_logprob_token_ids_is_verified_on_the_whole_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let flavour = Flavour {
        ignores_token_ids: true,
        ..Flavour::default()
    };
    let rig = Rig::start(dir.path(), flavour, None);
    let (p, resampled) = one_token_histogram(&rig.phone, PROMPT, &rig.p, &rig.eos, 1500, None);
    let requests = rig.server.metric("uhlm_engine_requests_total");
    let bytes = rig.server.metric("uhlm_engine_response_bytes_total");
    eprintln!(
        "resampled {resampled}, p {p}, {:.0} bytes per request",
        bytes / requests
    );
    // Every position's answer lists the whole toy vocabulary (258 tokens).
    assert!(
        bytes / requests > 5_000.0,
        "{bytes} bytes in {requests} requests"
    );
    assert!(
        p > 1e-3,
        "chi-square p = {p}: not the engine's distribution"
    );
}

#[test]
fn a_vllm_reporting_other_logprobs_or_another_vocabulary_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, _) = toy_pair_files(dir.path());
    let model = Model::load(&llm, &LoadOptions::default()).unwrap();
    let refusal =
        |model_file: &str, url: &str| refused_at_start(dir.path(), model_file, &["vllm", url]);
    for mode in [LogprobsMode::RawLogprobs, LogprobsMode::ProcessedLogits] {
        let other = StandIn::start(
            model.clone(),
            Flavour {
                mode,
                ..Flavour::default()
            },
        );
        let stderr = refusal(llm.to_str().unwrap(), &other.url);
        assert!(
            stderr.contains("--logprobs-mode processed_logprobs"),
            "{stderr}"
        );
    }
    // The gateway's model is SmolLM2; the engine serves the toy vocabulary.
    let toy = StandIn::start(model, Flavour::default());
    let stderr = refusal(e2e_common::llm_path(), &toy.url);
    assert!(stderr.contains("serves another vocabulary"), "{stderr}");
}

#[test]
fn a_dead_vllm_is_an_error_to_the_phone_which_goes_on_alone() {
    let dir = tempfile::tempdir().unwrap();
    let Rig {
        stand_in,
        server,
        phone,
        ..
    } = Rig::start(dir.path(), Flavour::default(), None);
    let options = GenerationOptions {
        sampling: SamplingOptions::greedy(6),
        chat_template: false,
    };
    let online = generate(&phone, PROMPT, &options);
    assert_eq!(online.stats.offline, 0, "{:?}", online.stats);
    drop(stand_in);
    std::thread::sleep(Duration::from_millis(100));
    let alone = generate(&phone, PROMPT, &options);
    assert!(alone.stats.offline > 0, "{:?}", alone.stats);
    assert!(server.metric("uhlm_errors_total{code=\"Internal\"}") > 0.0);
}

/// A real vLLM at `UHLM_VLLM_URL` serving the real LLM (Qwen2.5-Coder-1.5B-Instruct; see
/// README, "The gateway on vLLM"): the phone's one-token outputs against vLLM's own
/// distribution, through the gateway, with the real device model drafting.
#[test]
fn through_a_real_vllm_the_phone_samples_exactly_its_distribution() {
    let Some(url) = std::env::var_os("UHLM_VLLM_URL") else {
        assert!(
            std::env::var_os("UHLM_REQUIRE_VLLM").is_none(),
            "UHLM_REQUIRE_VLLM is set but UHLM_VLLM_URL is not"
        );
        eprintln!("skipping: UHLM_VLLM_URL is not set (cargo xtask vllm-check URL)");
        return;
    };
    let url = url.to_string_lossy().into_owned();
    let (llm, slm) = (
        uhlm_model::fetch::resolve_model("qwen-coder-1.5b").unwrap(),
        uhlm_model::fetch::resolve_model("qwen-coder-0.5b").unwrap(),
    );
    let card = uhlm_model::ModelCard::read(&llm).unwrap();
    let prompt_text = "def fibonacci(n):\n    ";
    let prompt = card.tokenizer.encode(prompt_text, false).unwrap();
    // vLLM's own distribution after the prompt, at temperature 1.
    let body = json!({"model": models(&url), "prompt": prompt, "max_tokens": 1,
                      "temperature": 1.0, "top_k": 0, "top_p": 1.0, "logprobs": card.vocab_size,
                      "return_tokens_as_token_ids": true, "add_special_tokens": false});
    let answer: Value = ureq::post(&format!("{url}/v1/completions"))
        .send_json(&body)
        .unwrap()
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_json()
        .unwrap();
    let mut p = vec![0.0f32; card.vocab_size];
    for (t, l) in answer["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .expect("whole-vocabulary log-probabilities")
    {
        let id: usize = t.trim_start_matches("token_id:").parse().unwrap();
        p[id] = (l.as_f64().unwrap() as f32).exp();
    }
    let server = ServerProc::start_model(llm.to_str().unwrap(), &["--engine", "vllm", &url]);
    let mut config = server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all());
    config.slm_path = slm;
    let phone = HybridEngine::new(config).unwrap();
    let (pv, resampled) = one_token_histogram(
        &phone,
        prompt_text,
        &p,
        card.tokenizer.eos_ids(),
        2000,
        None,
    );
    eprintln!(
        "real vLLM: p {pv}, resampled {resampled}, engine requests {}, bytes {}",
        server.metric("uhlm_engine_requests_total"),
        server.metric("uhlm_engine_response_bytes_total")
    );
    assert!(pv > 1e-3, "chi-square p = {pv}: not vLLM's distribution");
}

/// The first model a vLLM serves.
fn models(url: &str) -> String {
    let v: Value = ureq::get(&format!("{url}/v1/models"))
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    v["data"][0]["id"].as_str().unwrap().to_string()
}
