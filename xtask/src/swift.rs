//! `cargo xtask test-swift`: the Swift bindings and their XCTest suite, compiled and run by a
//! real Swift toolchain on this Linux host. Debian 13 ships Swift 6.0 (`swiftlang`); the host is
//! Debian 12, so the toolchain lives in a Debian 13 root of its own, kept in the cache outside
//! the repository (`~/.cache/uhlm/swift/trixie`, made once with `debootstrap`). The package is
//! staged into that root with a Linux manifest (the repository's `Package.swift` names the
//! XCFramework, which only Xcode builds) and tested against the host's `libuhlm_ffi.so`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::bindings::target_dir;
use crate::cuda::cache_dir;
use crate::{ensure_packages, is_root, root, run};

/// Debian 13's Swift and what it needs to import Glibc and link (without the C headers,
/// "sys/param.h not found").
const SWIFT_PACKAGES: &[&str] = &[
    "swiftlang",
    "libc6-dev",
    "libstdc++-14-dev",
    "gcc",
    "binutils",
];

/// Where the package is staged inside the root.
const STAGE: &str = "work/uhlm-swift";

/// The Linux manifest: the C header as a system library linking `libuhlm_ffi.so`.
const LINUX_MANIFEST: &str = r#"// swift-tools-version:5.9
// Written by `cargo xtask test-swift`: the UHLM package on Linux, over the host's libuhlm_ffi.so.
import PackageDescription

let package = Package(
    name: "UHLM",
    products: [.library(name: "UHLM", targets: ["UHLM"])],
    targets: [
        .systemLibrary(name: "UHLMFFI", path: "Sources/UHLMFFI"),
        .target(name: "UHLM", dependencies: ["UHLMFFI"], path: "Sources/UHLM",
                linkerSettings: [.unsafeFlags(["-L/work/uhlm-swift/lib"])]),
        .testTarget(name: "UHLMTests", dependencies: ["UHLM"], path: "Tests/UHLMTests"),
    ]
)
"#;

/// The repository's module map is a framework module on Darwin; on Linux it is a plain one.
const LINUX_MODULE_MAP: &str = r#"module UHLMFFI {
    header "UHLMFFI.h"
    link "uhlm_ffi"
    export *
}
"#;

/// Mounted while it lives; unmounted on drop, whatever happened meanwhile.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Result<Self> {
        std::fs::create_dir_all(at)?;
        let status = Command::new("mount").args(args).arg(at).status()?;
        ensure!(status.success(), "mount {args:?} {} failed", at.display());
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Whether the root at `dir` has Swift (a link to a path inside the root, which the host
/// cannot follow).
fn has_swift(dir: &Path) -> bool {
    dir.join("usr/bin/swift").symlink_metadata().is_ok()
}

/// The Debian 13 root with Swift, made first where it is missing.
fn toolchain() -> Result<PathBuf> {
    let dir = cache_dir()?.join("swift/trixie");
    if has_swift(&dir) {
        return Ok(dir);
    }
    // debootstrap and chroot need root.
    if !is_root() {
        bail!(
            "the Swift toolchain is installed into a Debian 13 root with debootstrap and chroot, \
             which need root; run `cargo xtask test-swift` as root once"
        );
    }
    ensure_packages(&[("debootstrap", "debootstrap")])?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().expect("a parent"))?;
    let dir_str = dir.to_string_lossy().into_owned();
    run(
        "debootstrap",
        &[
            "--variant=minbase",
            "trixie",
            &dir_str,
            "http://deb.debian.org/debian",
        ],
    )?;
    std::fs::copy("/etc/resolv.conf", dir.join("etc/resolv.conf")).ok();
    let _proc = Mount::new(&["-t", "proc", "proc"], &dir.join("proc"))?;
    let install = format!(
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends {}",
        SWIFT_PACKAGES.join(" ")
    );
    run("chroot", &[&dir_str, "sh", "-c", &install])?;
    ensure!(
        has_swift(&dir),
        "swiftlang did not install into {}",
        dir.display()
    );
    Ok(dir)
}

/// Copies `from` into `to` recursively.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Builds the host library, stages the package in the root, and runs `swift test` there with
/// the model cache mounted.
pub fn test_swift() -> Result<()> {
    let chroot = toolchain()?;
    run("cargo", &["build", "-p", "uhlm-ffi"])?;
    let stage = chroot.join(STAGE);
    let _ = std::fs::remove_dir_all(stage.join("Sources"));
    let _ = std::fs::remove_dir_all(stage.join("Tests"));
    let swift = root().join("bindings/swift");
    copy_tree(&swift.join("Sources/UHLM"), &stage.join("Sources/UHLM"))?;
    copy_tree(&swift.join("Tests"), &stage.join("Tests"))?;
    let ffi = stage.join("Sources/UHLMFFI");
    std::fs::create_dir_all(&ffi)?;
    std::fs::copy(swift.join("include/UHLMFFI.h"), ffi.join("UHLMFFI.h"))?;
    std::fs::write(ffi.join("module.modulemap"), LINUX_MODULE_MAP)?;
    std::fs::write(stage.join("Package.swift"), LINUX_MANIFEST)?;
    std::fs::create_dir_all(stage.join("lib"))?;
    std::fs::copy(
        target_dir().join("debug/libuhlm_ffi.so"),
        stage.join("lib/libuhlm_ffi.so"),
    )
    .context("copying the host's libuhlm_ffi.so")?;
    let models = match std::env::var_os("UHLM_MODELS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => cache_dir()?.join("models"),
    };
    let _proc = Mount::new(&["-t", "proc", "proc"], &chroot.join("proc"))?;
    let models_str = models.to_string_lossy().into_owned();
    let _models = Mount::new(&["--bind", &models_str], &chroot.join("work/models"))?;
    let test = format!(
        "cd /{STAGE} && UHLM_MODELS=/work/models LD_LIBRARY_PATH=/{STAGE}/lib \
         swift test -Xlinker -rpath -Xlinker /{STAGE}/lib"
    );
    run("chroot", &[&chroot.to_string_lossy(), "sh", "-c", &test])
}
