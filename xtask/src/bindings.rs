//! Binding tasks: `bindgen` (uniffi library mode, host cdylib → bindings/), `android`
//! (cargo-ndk → jniLibs), `ios` (static libs → XCFramework), and the binding test steps that
//! `cargo xtask test` runs after the Rust tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use camino::Utf8PathBuf;
use uniffi::{GenerateOptions, SwiftBindingsOptions, TargetLanguage};

use crate::command::{root, run};

/// Crate and library name of the FFI crate.
const FFI_CRATE: &str = "uhlm-ffi";
const FFI_LIB: &str = "uhlm_ffi";

/// Where each generated file lives in the repository, relative to the root, keyed by the file
/// name uniffi gives it. Hand-written code sits next to these, never in them.
const GENERATED: &[(&str, &str)] = &[
    (
        "dev/uhlm/uhlm_ffi.kt",
        "bindings/kotlin/src/main/generated/dev/uhlm/uhlm_ffi.kt",
    ),
    ("uhlm_ffi.py", "bindings/python/uhlm/uhlm_ffi.py"),
    (
        "UHLM.swift",
        "bindings/swift/Sources/UHLM/Generated/UHLM.swift",
    ),
    ("UHLMFFI.h", "bindings/swift/include/UHLMFFI.h"),
    (
        "module.modulemap",
        "bindings/swift/include/module.modulemap",
    ),
];

/// Android ABIs and the Rust targets cargo-ndk builds for them.
const ANDROID_ABIS: &[&str] = &["arm64-v8a", "armeabi-v7a", "x86_64"];
const IOS_DEVICE: &str = "aarch64-apple-ios";
const IOS_SIMULATORS: &[&str] = &["aarch64-apple-ios-sim", "x86_64-apple-ios"];
/// macOS slices, so `swift test` runs the XCTest suite on the Mac itself.
const MACOS: &[&str] = &["aarch64-apple-darwin", "x86_64-apple-darwin"];

/// The cargo target directory (`CARGO_TARGET_DIR` or `<root>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { root().join(d) }
        }
        _ => root().join("target"),
    }
}

/// Builds the host cdylib (debug) and returns its path. Built as part of the whole workspace,
/// so the dependencies' features (and artifacts) are the ones `cargo xtask test` already built.
pub fn build_host_library() -> Result<PathBuf> {
    run("cargo", &["build", "--workspace", "--all-targets"])?;
    let file = format!(
        "{}{FFI_LIB}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let lib = target_dir().join("debug").join(file);
    if !lib.is_file() {
        bail!(
            "cargo built {FFI_CRATE} but {} does not exist",
            lib.display()
        );
    }
    Ok(lib)
}

/// Generates Kotlin, Python and Swift (+ header and modulemap) from `lib` into `out`, with
/// uniffi's file names.
fn generate_into(lib: &Path, out: &Path) -> Result<()> {
    let lib = Utf8PathBuf::from_path_buf(lib.to_path_buf())
        .map_err(|p| anyhow::anyhow!("non-UTF-8 path {}", p.display()))?;
    let out = Utf8PathBuf::from_path_buf(out.to_path_buf())
        .map_err(|p| anyhow::anyhow!("non-UTF-8 path {}", p.display()))?;
    let config = Utf8PathBuf::from_path_buf(root().join("uniffi.toml"))
        .map_err(|p| anyhow::anyhow!("non-UTF-8 path {}", p.display()))?;
    // No formatter: output must not depend on which tools (ktlint, yapf) a machine has.
    uniffi::generate(GenerateOptions {
        languages: vec![TargetLanguage::Kotlin, TargetLanguage::Python],
        source: lib.clone(),
        out_dir: out.clone(),
        config_override: Some(config.clone()),
        format: false,
        crate_filter: Some(FFI_LIB.into()),
        metadata_no_deps: true,
    })
    .context("uniffi could not generate Kotlin/Python")?;
    uniffi::generate_swift_bindings(SwiftBindingsOptions {
        generate_swift_sources: true,
        generate_headers: true,
        generate_modulemap: true,
        source: lib,
        out_dir: out,
        xcframework: true,
        module_name: Some("UHLMFFI".into()),
        modulemap_filename: Some("module.modulemap".into()),
        metadata_no_deps: true,
        link_frameworks: Vec::new(),
        config: Some(config),
    })
    .context("uniffi could not generate Swift")?;
    Ok(())
}

/// `cargo xtask bindgen [--check]`: regenerates the committed bindings, or (`--check`) fails
/// when they differ from a fresh generation.
pub fn bindgen(check: bool) -> Result<()> {
    let lib = build_host_library()?;
    let tmp = tempfile::tempdir().context("cannot create a temporary directory")?;
    generate_into(&lib, tmp.path())?;
    let mut stale = Vec::new();
    for (generated, committed) in GENERATED {
        let fresh_path = tmp.path().join(generated);
        let fresh = fs::read(&fresh_path).with_context(|| {
            format!(
                "uniffi did not generate {} (was {generated} renamed?)",
                fresh_path.display()
            )
        })?;
        let dest = root().join(committed);
        if check {
            if fs::read(&dest).ok().as_deref() != Some(fresh.as_slice()) {
                stale.push(*committed);
            }
        } else {
            fs::create_dir_all(dest.parent().context("generated file has no parent")?)?;
            fs::write(&dest, fresh).with_context(|| format!("cannot write {}", dest.display()))?;
            println!("wrote {committed}");
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated bindings are stale: {}; run `cargo xtask bindgen` and commit the result",
            stale.join(", ")
        );
    }
    if check {
        println!("generated bindings match a fresh generation");
    }
    Ok(())
}

/// `cargo xtask android`: release libraries for every ABI into the AAR module's jniLibs.
pub fn android() -> Result<()> {
    let ndk_home = ["ANDROID_NDK_HOME", "ANDROID_NDK_ROOT", "NDK_HOME"]
        .iter()
        .find_map(|v| std::env::var_os(v).filter(|s| !s.is_empty()));
    if ndk_home.is_none() {
        bail!(
            "the Android NDK was not found: install it (Android Studio → SDK Manager → NDK) and \
             set ANDROID_NDK_HOME; cargo-ndk (`cargo install cargo-ndk`) is needed too"
        );
    }
    let has_cargo_ndk = Command::new("cargo")
        .args(["ndk", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_cargo_ndk {
        bail!("cargo-ndk is missing: `cargo install cargo-ndk`");
    }
    run(
        "rustup",
        &[
            "target",
            "add",
            "aarch64-linux-android",
            "armv7-linux-androideabi",
            "x86_64-linux-android",
        ],
    )?;
    let jni = root().join("bindings/kotlin/android/src/main/jniLibs");
    let jni = jni.to_str().context("non-UTF-8 repository path")?;
    let mut args = vec!["ndk"];
    for abi in ANDROID_ABIS {
        args.extend(["-t", abi]);
    }
    // What a phone links: the engine without the embedded server or the model cache.
    args.extend([
        "-o",
        jni,
        "build",
        "--release",
        "-p",
        FFI_CRATE,
        "--lib",
        "--no-default-features",
    ]);
    run("cargo", &args)?;
    println!(
        "Android libraries are in {jni}; build the AAR with `gradle :android:assembleRelease`"
    );
    Ok(())
}

/// `cargo xtask ios`: static libraries for iOS devices, iOS simulators and macOS (the
/// simulator and macOS slices each merged with lipo), packed with the header and modulemap
/// into bindings/swift/UHLMFFI.xcframework.
pub fn ios() -> Result<()> {
    if !cfg!(target_os = "macos") {
        bail!("`cargo xtask ios` needs macOS with Xcode (xcodebuild, lipo); this is not macOS");
    }
    for tool in ["xcodebuild", "lipo"] {
        let found = Command::new("xcrun")
            .args(["--find", tool])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            bail!("{tool} was not found: install Xcode and run `xcode-select --install`");
        }
    }
    let mut targets = vec![IOS_DEVICE];
    targets.extend(IOS_SIMULATORS);
    targets.extend(MACOS);
    let mut add = vec!["target", "add"];
    add.extend(&targets);
    run("rustup", &add)?;
    for t in &targets {
        let mut args = vec![
            "build",
            "--release",
            "-p",
            FFI_CRATE,
            "--lib",
            "--target",
            t,
        ];
        // Phones link the engine alone; the macOS slices keep the embedded server and the
        // model cache for the Swift package's tests on a Mac.
        if !MACOS.contains(t) {
            args.push("--no-default-features");
        }
        run("cargo", &args)?;
    }
    let staticlib = |t: &str| {
        target_dir()
            .join(t)
            .join("release")
            .join(format!("lib{FFI_LIB}.a"))
    };
    let universal = |name: &str, slices: &[&str]| -> Result<String> {
        let dir = target_dir().join(name);
        fs::create_dir_all(&dir)?;
        let out = dir.join(format!("lib{FFI_LIB}.a")).display().to_string();
        let mut args = vec!["lipo".to_string(), "-create".to_string()];
        args.extend(slices.iter().map(|t| staticlib(t).display().to_string()));
        args.extend(["-output".to_string(), out.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("xcrun", &args)?;
        Ok(out)
    };
    let device = staticlib(IOS_DEVICE).display().to_string();
    let simulator = universal("ios-simulator-universal", IOS_SIMULATORS)?;
    let macos = universal("macos-universal", MACOS)?;
    let headers = root().join("bindings/swift/include").display().to_string();
    let out = root().join("bindings/swift/UHLMFFI.xcframework");
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    let out_s = out.display().to_string();
    let mut args = vec!["-create-xcframework"];
    for lib in [&device, &simulator, &macos] {
        args.extend(["-library", lib.as_str(), "-headers", headers.as_str()]);
    }
    args.extend(["-output", out_s.as_str()]);
    run("xcodebuild", &args)?;
    println!("wrote {out_s}");
    Ok(())
}

/// The Kotlin binding tests on the host JVM, through JNA and the host cdylib.
pub fn test_kotlin(lib: &Path) -> Result<()> {
    let dir = lib.parent().context("library has no directory")?;
    let jna = format!("-Djna.library.path={}", dir.display());
    run(
        "mvn",
        &["-q", "-B", "-f", "bindings/kotlin/pom.xml", &jna, "test"],
    )
}

/// Installs the Python package (with the host cdylib inside) into a venv under the target
/// directory and runs its pytest suite there.
pub fn test_python(lib: &Path) -> Result<()> {
    let pkg = root().join("bindings/python/uhlm");
    let name = lib.file_name().context("library has no file name")?;
    fs::copy(lib, pkg.join(name)).context("cannot copy the cdylib into bindings/python/uhlm")?;
    let venv = target_dir().join("bindings-venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        run("python3", &["-m", "venv", &venv.display().to_string()])?;
    }
    let py = python.display().to_string();
    let has = |module: &str| {
        Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let mut missing = Vec::new();
    for (module, package) in [
        ("pytest", "pytest"),
        ("setuptools", "setuptools>=64"),
        ("wheel", "wheel"),
    ] {
        if !has(module) {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        let mut args = vec!["-m", "pip", "install", "-q"];
        args.extend(&missing);
        run(&py, &args)?;
    }
    run(
        &py,
        &[
            "-m",
            "pip",
            "install",
            "-q",
            "--no-build-isolation",
            "--force-reinstall",
            "--no-deps",
            "bindings/python",
        ],
    )?;
    // Run from the tests directory so `import uhlm` finds the installed package, not the source.
    let tests = root().join("bindings/python/tests");
    println!("\n==> {py} -m pytest -q (in {})", tests.display());
    let status = Command::new(&python)
        .args(["-m", "pytest", "-q"])
        .current_dir(&tests)
        .status()
        .context("cannot start pytest")?;
    let expected = fs::read_dir(&tests)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("test_") && name.ends_with(".py")
            })
        })
        .unwrap_or(false);
    match status.code() {
        Some(0) => Ok(()),
        // Exit code 5: no tests collected, a failure only where test files exist.
        Some(5) if !expected => Ok(()),
        Some(5) => bail!("pytest collected no tests in {}", tests.display()),
        _ => bail!("pytest failed with {status}"),
    }
}
