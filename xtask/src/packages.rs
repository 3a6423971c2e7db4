//! System packages a task needs, installed with apt (as root or through sudo) where missing.

use anyhow::Result;
use std::path::Path;
use std::process::Command;

use crate::command::{run, run_with_env};

/// Debian packages the tests need: the JVM and Maven for the Kotlin bindings, venv for the
/// Python ones, and `fortunes-min`, the public corpus of the evaluation prompts.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("mvn", "maven"),
    ("java", "default-jdk-headless"),
    ("/usr/share/games/fortunes/fortunes", "fortunes-min"),
    ("/usr/lib/python3/dist-packages/ensurepip", "python3-venv"),
    // The virtual display the demo app's UI test draws its window in.
    ("xvfb-run", "xvfb"),
    ("xauth", "xauth"),
];

/// Installs whichever of [`DEBIAN_PACKAGES`] is missing (idempotent; needs apt and root or sudo).
pub(crate) fn ensure_debian_packages() -> Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// Installs whichever of `packages` (what shows it is present, package) is missing.
pub(crate) fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let present = |what: &str| {
        if what.starts_with('/') {
            Path::new(what).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {what}")])
                .output()
                .is_ok_and(|o| o.status.success())
        }
    };
    let python_venv_works = || {
        Command::new("python3")
            .args(["-c", "import venv, ensurepip"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(what, package)| {
            let satisfied = present(what) || (*package == "python3-venv" && python_venv_works());
            !satisfied
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let (program, prefix): (&str, &[&str]) = if is_root() {
        ("apt-get", &[])
    } else {
        ("sudo", &["apt-get"])
    };
    let mut update = prefix.to_vec();
    update.extend(["update", "-q"]);
    run(program, &update)?;
    let mut install = prefix.to_vec();
    install.extend(["install", "-y", "-q", "--no-install-recommends"]);
    install.extend(&missing);
    run_with_env(program, &install, &[("DEBIAN_FRONTEND", "noninteractive")])
}
