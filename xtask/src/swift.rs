//! `cargo xtask test-swift`: the Swift bindings, the iOS demo's logic and their XCTest suites,
//! compiled and run by a real Swift toolchain on this Linux host. Debian 13 ships Swift 6.0
//! (`swiftlang`); the host is Debian 12, so the toolchain lives in a Debian 13 root of its own,
//! kept in the cache outside the repository (`~/.cache/uhlm/swift/trixie`, made once with
//! `debootstrap`). The package is staged into that root with a Linux manifest (the
//! repository's `Package.swift` names the XCFramework, which only Xcode builds) and tested
//! against the host's `libuhlm_ffi.so`. The staged package holds:
//! - `UHLM`: `bindings/swift` (the generated bindings and the `Uhlm` actor), tested by
//!   `bindings/swift/Tests/UHLMTests` plus the README's Swift snippet, written there as a test;
//! - `UHLMDemoCore`: the iOS demo's logic (`ios-demo/UHLMDemoCore`, the same files the app
//!   target compiles), tested by `ios-demo/Tests/UHLMDemoCoreTests`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::command::{root, run};
use crate::cuda::cache_dir;
use crate::packages::{ensure_packages, is_root};

/// Debian 13's Swift and what it needs to import Glibc and link (without the C headers,
/// "sys/param.h not found").
const SWIFT_PACKAGES: &[&str] = &[
    "swiftlang",
    "libc6-dev",
    "libstdc++-14-dev",
    "gcc",
    "binutils",
];

/// Where the package is staged inside the root (one stage per root: one run at a time).
const STAGE: &str = "work/uhlm-swift";

/// Where the model cache is mounted inside the root.
const MODELS: &str = "work/models";

/// The Linux manifest: the C header as a system library linking `libuhlm_ffi.so`.
const LINUX_MANIFEST: &str = r#"// swift-tools-version:5.9
// Written by `cargo xtask test-swift`: the UHLM package on Linux, over the host's libuhlm_ffi.so,
// with the iOS demo's logic (ios-demo/UHLMDemoCore) as a target of its own.
import PackageDescription

let package = Package(
    name: "UHLM",
    products: [.library(name: "UHLM", targets: ["UHLM"])],
    targets: [
        .systemLibrary(name: "UHLMFFI", path: "Sources/UHLMFFI"),
        .target(name: "UHLM", dependencies: ["UHLMFFI"], path: "Sources/UHLM",
                linkerSettings: [.unsafeFlags(["-L/work/uhlm-swift/lib"])]),
        .testTarget(name: "UHLMTests", dependencies: ["UHLM"], path: "Tests/UHLMTests"),
        .target(name: "UHLMDemoCore", dependencies: ["UHLM"], path: "Sources/UHLMDemoCore"),
        .testTarget(name: "UHLMDemoCoreTests", dependencies: ["UHLMDemoCore", "UHLM"],
                    path: "Tests/UHLMDemoCoreTests"),
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

/// The README line right above the Swift snippet that is compiled and run as a test.
const SNIPPET_MARKER: &str = "<!-- test-swift: the snippet below is compiled and run as a test -->";

/// Why the Swift root needs root, and what to run instead.
const NEED_ROOT: &str = "the Swift toolchain lives in a Debian 13 root that `cargo xtask \
     test-swift` makes with debootstrap and enters with mount and chroot, which need root: run \
     it as root, or as a user who may use sudo";

/// Whether sudo is installed.
fn has_sudo() -> bool {
    Command::new("sh")
        .args(["-c", "command -v sudo"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `program args` as root: directly when this process is root, else through sudo.
fn as_root(program: &str, args: &[&str]) -> Result<()> {
    if is_root() {
        return run(program, args);
    }
    ensure!(has_sudo(), "{NEED_ROOT} (not root, and no sudo)");
    let mut sudo = vec![program];
    sudo.extend(args);
    run("sudo", &sudo)
}

/// Mounted while it lives; unmounted on drop, whatever happened meanwhile.
struct Mount(PathBuf);

impl Mount {
    fn new(args: &[&str], at: &Path) -> Result<Self> {
        std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
        let at_str = at.to_string_lossy();
        let mut mount = args.to_vec();
        mount.push(&at_str);
        as_root("mount", &mount)?;
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = as_root("umount", &[&self.0.to_string_lossy()]) {
            eprintln!(
                "warning: {} is still mounted ({e:#}); the next `cargo xtask test-swift` \
                 unmounts it, or `umount` it by hand",
                self.0.display()
            );
        }
    }
}

/// The mount points at or below `dir` (from `/proc/self/mounts`).
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        // The table writes a space in a path as \040.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// Unmounts what a run killed before its cleanup left mounted in the root `dir` (a model
/// cache mounted there would otherwise be deleted with the root, or mounted twice).
fn unmount_stale(dir: &Path) -> Result<()> {
    let mut stale = mounts_under(dir)?;
    // Deepest first.
    stale.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for mount in stale {
        println!("unmounting {}, left by an earlier run", mount.display());
        as_root("umount", &[&mount.to_string_lossy()])?;
    }
    Ok(())
}

/// Whether the root at `dir` has Swift (a link to a path inside the root, which the host
/// cannot follow).
fn has_swift(dir: &Path) -> bool {
    dir.join("usr/bin/swift").symlink_metadata().is_ok()
}

/// The Debian 13 root with Swift, made first where it is missing.
pub fn toolchain() -> Result<PathBuf> {
    let dir = cache_dir()?.join("swift/trixie");
    if has_swift(&dir) {
        return Ok(dir);
    }
    println!(
        "\n==> the Swift toolchain: a Debian 13 root with swiftlang in {} (once; a few minutes)",
        dir.display()
    );
    // Before anything is installed: say plainly where root is missing.
    ensure!(
        is_root() || has_sudo(),
        "{NEED_ROOT} (not root, and no sudo)"
    );
    ensure_packages(&[("debootstrap", "debootstrap")])?;
    let dir_str = dir.to_string_lossy().into_owned();
    if dir.exists() {
        // What a failed attempt left; nothing of the host may stay mounted in it.
        unmount_stale(&dir)?;
        ensure!(
            mounts_under(&dir)?.is_empty(),
            "{dir_str} still has mounts; unmount them and run again"
        );
        as_root("rm", &["-rf", "--one-file-system", &dir_str])?;
    }
    std::fs::create_dir_all(dir.parent().expect("a parent"))?;
    as_root(
        "debootstrap",
        &[
            "--variant=minbase",
            "trixie",
            &dir_str,
            "http://deb.debian.org/debian",
        ],
    )?;
    as_root(
        "cp",
        &["/etc/resolv.conf", &format!("{dir_str}/etc/resolv.conf")],
    )?;
    let _proc = Mount::new(&["-t", "proc", "proc"], &dir.join("proc"))?;
    let install = format!(
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
         --no-install-recommends {}",
        SWIFT_PACKAGES.join(" ")
    );
    as_root("chroot", &[&dir_str, "sh", "-c", &install])?;
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

/// The Swift snippet that follows [`SNIPPET_MARKER`] in `readme`, as an XCTest case that runs
/// it, so that a README edit that breaks it fails the suite.
fn readme_snippet_test(readme: &str) -> Result<String> {
    let mut lines = readme.lines().skip_while(|l| l.trim() != SNIPPET_MARKER);
    ensure!(
        lines.next().is_some(),
        "README.md has no line `{SNIPPET_MARKER}` above its Swift snippet"
    );
    ensure!(
        lines.next().map(str::trim) == Some("```swift"),
        "README.md: the line after `{SNIPPET_MARKER}` is not ```swift"
    );
    let mut body = String::new();
    let mut closed = false;
    for line in lines {
        if line.trim() == "```" {
            closed = true;
            break;
        }
        body.push_str("        ");
        body.push_str(line);
        body.push('\n');
    }
    ensure!(closed, "README.md: the Swift snippet has no closing ```");
    Ok(format!(
        "// Written by `cargo xtask test-swift` from README.md's Swift snippet, unchanged.\n\
         import UHLM\n\
         import XCTest\n\
         \n\
         final class ReadmeSnippetTests: XCTestCase {{\n\
         \x20   func testTheReadmeSwiftSnippetRuns() async throws {{\n\
         {body}\
         \x20   }}\n\
         }}\n"
    ))
}

/// Writes the package into the root's stage: the bindings, the demo's logic, their tests and
/// the README's snippet, the Linux manifest and module map, and `lib` (the host library).
fn stage_package(stage: &Path, lib: &Path) -> Result<()> {
    for dir in ["Sources", "Tests", "lib"] {
        let path = stage.join(dir);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("clearing {}", path.display()))?;
        }
    }
    let repo = root();
    let swift = repo.join("bindings/swift");
    copy_tree(&swift.join("Sources/UHLM"), &stage.join("Sources/UHLM"))?;
    copy_tree(&swift.join("Tests"), &stage.join("Tests"))?;
    let demo = repo.join("ios-demo");
    copy_tree(
        &demo.join("UHLMDemoCore"),
        &stage.join("Sources/UHLMDemoCore"),
    )?;
    copy_tree(
        &demo.join("Tests/UHLMDemoCoreTests"),
        &stage.join("Tests/UHLMDemoCoreTests"),
    )?;
    let readme = std::fs::read_to_string(repo.join("README.md")).context("reading README.md")?;
    std::fs::write(
        stage.join("Tests/UHLMTests/ReadmeSnippetTests.swift"),
        readme_snippet_test(&readme)?,
    )?;
    let ffi = stage.join("Sources/UHLMFFI");
    std::fs::create_dir_all(&ffi)?;
    std::fs::copy(swift.join("include/UHLMFFI.h"), ffi.join("UHLMFFI.h"))?;
    std::fs::write(ffi.join("module.modulemap"), LINUX_MODULE_MAP)?;
    std::fs::write(stage.join("Package.swift"), LINUX_MANIFEST)?;
    std::fs::create_dir_all(stage.join("lib"))?;
    std::fs::copy(lib, stage.join("lib/libuhlm_ffi.so"))
        .with_context(|| format!("copying {}", lib.display()))?;
    Ok(())
}

/// Builds the host library as `cargo xtask test-swift` on its own uses it, and returns it.
pub fn build_host_library() -> Result<PathBuf> {
    run("cargo", &["build", "-p", "uhlm-ffi"])?;
    Ok(crate::bindings::target_dir().join("debug/libuhlm_ffi.so"))
}

/// Stages the package in the root (made first where missing) over `lib`, the host's
/// `libuhlm_ffi.so`, and runs `swift test` there with the model cache mounted (the models
/// must be fetched).
pub fn test_swift(lib: &Path) -> Result<()> {
    // One root, one stage: a second run on this machine (another clone) waits for the first.
    let lock_path = cache_dir()?.join("swift/test-swift.lock");
    std::fs::create_dir_all(lock_path.parent().expect("a parent"))?;
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        println!(
            "waiting for another `cargo xtask test-swift` ({})",
            lock_path.display()
        );
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
    }
    let chroot = toolchain()?;
    // A run killed before its cleanup left its mounts: never mount twice.
    unmount_stale(&chroot)?;
    let stage = chroot.join(STAGE);
    if !is_root() {
        // The stage is written as this user; the root's directories belong to root.
        let owner = format!("{}:{}", id("-u")?, id("-g")?);
        let stage_str = stage.to_string_lossy();
        as_root("mkdir", &["-p", &stage_str])?;
        as_root("chown", &["-R", &owner, &stage_str])?;
    }
    stage_package(&stage, lib)?;
    let models = match std::env::var_os("UHLM_MODELS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => cache_dir()?.join("models"),
    };
    let _proc = Mount::new(&["-t", "proc", "proc"], &chroot.join("proc"))?;
    let models_str = models.to_string_lossy().into_owned();
    let _models = Mount::new(&["--bind", &models_str], &chroot.join(MODELS))?;
    let test = format!(
        "cd /{STAGE} && HOME=/tmp UHLM_MODELS=/{MODELS} LD_LIBRARY_PATH=/{STAGE}/lib \
         swift test -Xlinker -rpath -Xlinker /{STAGE}/lib"
    );
    let chroot_str = chroot.to_string_lossy().into_owned();
    if is_root() {
        run("chroot", &[&chroot_str, "sh", "-c", &test])
    } else {
        // Through sudo, as this user, so that the build's files stay this user's.
        let user = format!("--userspec={}:{}", id("-u")?, id("-g")?);
        as_root("chroot", &[&user, &chroot_str, "sh", "-c", &test])
    }
}

/// `id FLAG`'s answer (this user's numeric id or group).
fn id(flag: &str) -> Result<String> {
    let out = Command::new("id")
        .arg(flag)
        .output()
        .context("cannot run id")?;
    ensure!(out.status.success(), "id {flag} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_snippet_becomes_a_test_that_runs_it() {
        let readme = format!("text\n{SNIPPET_MARKER}\n```swift\nlet a = 1\nprint(a)\n```\nmore\n");
        let test = readme_snippet_test(&readme).unwrap();
        assert!(test.contains("func testTheReadmeSwiftSnippetRuns() async throws {\n        let a = 1\n        print(a)\n    }"), "{test}");
    }

    #[test]
    fn a_readme_without_the_marked_snippet_is_an_error() {
        assert!(readme_snippet_test("```swift\nlet a = 1\n```\n").is_err());
        assert!(readme_snippet_test(&format!("{SNIPPET_MARKER}\n```kotlin\n```\n")).is_err());
        assert!(readme_snippet_test(&format!("{SNIPPET_MARKER}\n```swift\nlet a = 1\n")).is_err());
    }

    #[test]
    fn the_repository_readme_has_the_snippet() {
        let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
        let test = readme_snippet_test(&readme).unwrap();
        assert!(test.contains("Uhlm.load"), "{test}");
    }
}
