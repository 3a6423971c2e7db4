//! `cargo xtask cuda`: the `uhlm` binary with the server's model on an NVIDIA GPU
//! (`uhlm serve --device cuda`), and the bundle that runs issue 14's capacity sweep on a lent
//! GPU machine.
//!
//! The CUDA toolkit is 13.0, from NVIDIA's wheels on PyPI (pinned, SHA-256 checked, cached
//! beside the models), not Debian's `nvidia-cuda-toolkit` 11.8: candle compiles its kernels
//! for Hopper as `sm_90a`, which 11.8 does not know, and a binary linked against CUDA 11's
//! libraries does not load on a machine that has a current driver's (the lent H200: driver
//! 580 with CUDA 13's cuBLAS, in PyTorch's environment). The driver library itself is never
//! shipped: the link uses a stub generated from `cuda.h`, as the toolkit's own stubs are, and
//! the GPU machine's `libcuda.so.1` is loaded at run time.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::command::{root, run_with_env};

/// The toolkit's wheels: (name, version, SHA-256). The compiler alone is what `--check`
/// needs; the build links the libraries too (cuBLAS is 420 MB of them).
const COMPILER: &[(&str, &str, &str)] = &[
    (
        "nvidia-cuda-nvcc",
        "13.0.88",
        "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
    ),
    (
        "nvidia-nvvm",
        "13.0.88",
        "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0",
    ),
    (
        "nvidia-cuda-crt",
        "13.0.88",
        "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4",
    ),
    (
        "nvidia-cuda-runtime",
        "13.0.96",
        "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
    ),
    (
        "nvidia-cuda-cccl",
        "13.0.85",
        "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649",
    ),
];
const LIBRARIES: &[(&str, &str, &str)] = &[
    (
        "nvidia-cublas",
        "13.0.2.14",
        "0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c",
    ),
    (
        "nvidia-curand",
        "10.4.0.35",
        "1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc",
    ),
    (
        "nvidia-cuda-nvrtc",
        "13.0.88",
        "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575",
    ),
];

/// The shared libraries the binary links, by the name the linker looks for and the file the
/// wheels hold.
const LINKED: &[(&str, &str)] = &[
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libcurand.so", "libcurand.so.10"),
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libcudart.so", "libcudart.so.13"),
];

/// Where the build and the check put their artifacts (apart from the CPU build's, so neither
/// invalidates the other).
pub const TARGET_DIR: &str = "target/cuda";

#[derive(Debug, clap::Args)]
pub struct CudaArgs {
    /// Type-check the CUDA build only (candle's kernels still go through nvcc; nothing links).
    #[arg(long)]
    check: bool,
    /// The GPU's compute capability the kernels are compiled for (90: H100/H200).
    #[arg(long, default_value = "90")]
    compute_cap: String,
    /// Also assemble what a GPU machine with no network needs for the capacity sweep in this
    /// folder: the stripped binary, the 1.5B model's header, the recorded traces
    /// (run there: `sh xtask/gpu-capacity.sh DIR`).
    #[arg(long)]
    bundle: Option<PathBuf>,
}

pub fn cuda(args: CudaArgs) -> Result<()> {
    ensure!(
        !(args.check && args.bundle.is_some()),
        "--bundle needs the build, not --check"
    );
    let toolkit = toolkit(!args.check)?;
    let path = format!(
        "{}:{}",
        toolkit.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cuda_path = toolkit.display().to_string();
    let env = [
        ("PATH", path.as_str()),
        // cudarc's build script finds lib/ and lib/stubs here; candle's finds include/.
        ("CUDA_PATH", cuda_path.as_str()),
        ("CUDA_COMPUTE_CAP", args.compute_cap.as_str()),
    ];
    let verb = if args.check { "check" } else { "build" };
    let mut cargo = vec![verb, "-p", "uhlm-cli", "--features", "cuda"];
    cargo.extend(["--target-dir", TARGET_DIR]);
    if !args.check {
        cargo.push("--release");
    }
    run_with_env("cargo", &cargo, &env)?;
    if args.check {
        return Ok(());
    }
    let built = root().join(TARGET_DIR).join("release/uhlm");
    let stripped = root().join(TARGET_DIR).join("uhlm");
    let status = Command::new("strip")
        .arg("-o")
        .args([&stripped, &built])
        .status()
        .context("cannot run strip")?;
    ensure!(status.success(), "strip failed with {status}");
    let mib = std::fs::metadata(&stripped)?.len() as f64 / (1 << 20) as f64;
    println!(
        "{}: {mib:.1} MiB stripped; it loads libcuda.so.1 (the driver's) and CUDA 13's \
         runtime, cuBLAS and cuRAND at run time (LD_LIBRARY_PATH)",
        stripped.display()
    );
    if let Some(dir) = args.bundle {
        bundle(&stripped, &toolkit, &dir)?;
    }
    Ok(())
}

/// The cached toolkit's root (`…/nvidia/cu13`), fetched and prepared on first use.
fn toolkit(with_libraries: bool) -> Result<PathBuf> {
    let cache = cache_dir()?.join("cuda-13.0");
    let root = cache.join("nvidia/cu13");
    install(&cache, "compiler", COMPILER)?;
    if with_libraries {
        install(&cache, "libraries", LIBRARIES)?;
        for (link, file) in LINKED {
            let link = root.join("lib").join(link);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(file, &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
        driver_stub(&root)?;
    }
    Ok(root)
}

/// `$XDG_CACHE_HOME/uhlm` or `~/.cache/uhlm`, where the models are cached too.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("uhlm"))
}

/// Downloads `wheels` with pip (hashes required) and unpacks them into `cache`, once: a
/// marker file says the part is complete.
fn install(cache: &Path, part: &str, wheels: &[(&str, &str, &str)]) -> Result<()> {
    let marker = cache.join(format!(".{part}-complete"));
    if marker.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(cache)?;
    let download = tempfile::tempdir_in(cache)?;
    let requirements = download.path().join("requirements.txt");
    let lines: String = wheels
        .iter()
        .map(|(name, version, sha)| format!("{name}=={version} --hash=sha256:{sha}\n"))
        .collect();
    std::fs::write(&requirements, lines)?;
    let mut pip = vec!["-m", "pip", "download", "--quiet", "--no-deps"];
    pip.extend(["--only-binary=:all:", "--python-version", "3.12"]);
    for platform in [
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux_2_12_x86_64",
        "manylinux2010_x86_64",
    ] {
        pip.extend(["--platform", platform]);
    }
    let (req, dest) = (
        requirements.display().to_string(),
        download.path().display().to_string(),
    );
    pip.extend(["--require-hashes", "-r", &req, "-d", &dest]);
    println!(
        "\n==> fetching the CUDA toolkit's {part} from PyPI into {}",
        cache.display()
    );
    run_with_env("python3", &pip, &[])?;
    for entry in std::fs::read_dir(download.path())? {
        let wheel = entry?.path();
        if wheel.extension().is_some_and(|e| e == "whl") {
            let (w, c) = (wheel.display().to_string(), cache.display().to_string());
            run_with_env("python3", &["-m", "zipfile", "-e", &w, &c], &[])?;
        }
    }
    // Python's zipfile drops the executable bits of nvcc, ptxas, cicc and the rest.
    for dir in ["nvidia/cu13/bin", "nvidia/cu13/nvvm/bin"] {
        let Ok(entries) = std::fs::read_dir(cache.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_file() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    std::fs::write(&marker, "")?;
    Ok(())
}

/// `lib/stubs/libcuda.so`: every driver entry point `cuda.h` declares, each returning an
/// error, under the driver's soname, so that the binary links here and binds to the real
/// driver where it runs.
fn driver_stub(root: &Path) -> Result<()> {
    let stub = root.join("lib/stubs/libcuda.so");
    if stub.is_file() {
        return Ok(());
    }
    let header = root.join("include/cuda.h");
    let out = Command::new("cc")
        .args(["-E", "-P"])
        .arg(&header)
        .output()
        .context("cannot run cc")?;
    ensure!(out.status.success(), "cc -E {} failed", header.display());
    let raw = std::fs::read_to_string(&header)?;
    let names = entry_points(&String::from_utf8_lossy(&out.stdout), &raw);
    ensure!(
        names.len() > 300,
        "found only {} driver entry points in {}",
        names.len(),
        header.display()
    );
    let source: String = names
        .iter()
        .map(|n| format!("int {n}(void) {{ return 999; }}\n"))
        .collect();
    std::fs::create_dir_all(stub.parent().unwrap())?;
    let c = root.join("lib/stubs/libcuda.c");
    std::fs::write(&c, source)?;
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .args([&stub, &c])
        .status()
        .context("cannot run cc")?;
    if !status.success() {
        bail!("building the driver stub failed with {status}");
    }
    // The name the loader asks for, so the binary also starts where no driver is installed
    // (its CPU paths work; `--device cuda` fails with CUDA's error).
    let soname = stub.with_file_name("libcuda.so.1");
    let _ = std::fs::remove_file(&soname);
    std::os::unix::fs::symlink("libcuda.so", &soname)?;
    Ok(())
}

/// The driver's functions: each name directly before a `(` in the preprocessed header
/// (`cuMemAlloc_v2`, after its versioning macros), and both names of each `#define cuX cuY`.
fn entry_points(preprocessed: &str, header: &str) -> std::collections::BTreeSet<String> {
    let is_entry = |n: &str| {
        n.len() > 2
            && n.starts_with("cu")
            && n[2..].starts_with(|c: char| c.is_ascii_uppercase())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let mut names = std::collections::BTreeSet::new();
    for piece in preprocessed.split('(') {
        let before = piece.trim_end();
        let name = before
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default();
        if is_entry(name) {
            names.insert(name.to_string());
        }
    }
    for line in header.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("#define") {
            names.extend(words.take(2).filter(|w| is_entry(w)).map(str::to_string));
        }
    }
    names
}

/// What the GPU machine needs besides the repository: the binary, the server model's header
/// (the weights are made there: `uhlm models stand-in`), the traces the devices replay.
fn bundle(binary: &Path, toolkit: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    // 63 MiB stripped (candle's kernels are PTX text), 9 MiB compressed: a device run
    // carries 64 MiB at most, the repository included.
    let packed = std::fs::File::create(dir.join("uhlm.xz"))?;
    let status = Command::new("xz")
        .args(["-9", "-T0", "-c"])
        .arg(binary)
        .stdout(packed)
        .status()
        .context("cannot run xz")?;
    ensure!(status.success(), "xz failed with {status}");
    let uhlm = binary.display().to_string();
    let header = dir
        .join("qwen-coder-1.5b.header.gguf")
        .display()
        .to_string();
    // The binary runs its CPU paths here too: the driver stub stands in for libcuda.so.1.
    let libraries = format!(
        "{}:{}",
        toolkit.join("lib").display(),
        toolkit.join("lib/stubs").display()
    );
    let env = [("LD_LIBRARY_PATH", libraries.as_str())];
    run_with_env(&uhlm, &["models", "fetch", "qwen-coder-1.5b"], &env)?;
    run_with_env(
        &uhlm,
        &["models", "strip-weights", "qwen-coder-1.5b", &header],
        &env,
    )?;
    let traces = root().join("docs/results/capacity-qwen/traces.jsonl");
    std::fs::copy(&traces, dir.join("traces.jsonl"))
        .with_context(|| format!("copying {}", traces.display()))?;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    println!(
        "{}: {:.1} MiB (a device run carries at most 64 MiB)",
        dir.display(),
        total as f64 / (1 << 20) as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_exports_the_versioned_and_unversioned_names() {
        let header = "#define cuMemAlloc cuMemAlloc_v2\n    #define cuCtxCreate cuCtxCreate_v4\n\
                      #define CU_LAUNCH_PARAM_END ((void*)0x00)\n";
        let preprocessed = "CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize);\n\
                            CUresult cuInit (unsigned int Flags);\n\
                            typedef void (*CUhostFn)(void *userData);\n\
                            typedef struct cuuint_s { int x; } cuuint64_t;\n";
        let names: Vec<String> = entry_points(preprocessed, header).into_iter().collect();
        assert_eq!(
            names,
            [
                "cuCtxCreate",
                "cuCtxCreate_v4",
                "cuInit",
                "cuMemAlloc",
                "cuMemAlloc_v2"
            ]
        );
    }
}
