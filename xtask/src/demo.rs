//! The demo app's desktop build (`android-demo/desktop`: the shared Compose screens, Maven):
//! `test-demo`, its UI test in a virtual display (part of `test`), and `demo-desktop`, the app
//! by hand. Both run on the host library that [`bindings::build_host_library`] builds, loaded
//! through JNA as in the Kotlin binding tests.

use std::path::Path;

use anyhow::{Context, Result};

use crate::bindings;
use crate::command::{root, run};

/// The desktop build's Maven project.
const POM: &str = "android-demo/desktop/pom.xml";

/// Where the UI test saves its screenshot of the app's window.
const SCREENSHOT: &str = "android-demo/desktop/target/screenshots/desktop-demo.png";

/// Xvfb's screen: large enough for the window, 24-bit so the token colours are exact pixels.
const XVFB_SCREEN: &str = "-screen 0 1280x1024x24";

/// `-Djna.library.path=<dir of lib>` for Maven, as [`bindings::test_kotlin`] passes it.
fn jna_arg(lib: &Path) -> Result<String> {
    let dir = lib.parent().context("library has no directory")?;
    Ok(format!("-Djna.library.path={}", dir.display()))
}

/// The default pair the app and its test start the embedded server on (idempotent: a
/// sha256-checked no-op when cached), with the CLI that [`bindings::build_host_library`]'s
/// workspace build has just made.
fn fetch_default_models() -> Result<()> {
    let uhlm = bindings::target_dir().join("debug/uhlm");
    run(&uhlm.to_string_lossy(), &["models", "fetch", "smollm2"])
}

/// `cargo xtask test-demo`: the desktop app's UI test under Xvfb against an embedded loopback
/// server on the default models (one Maven run, one JVM), and its download test.
pub fn test_demo(lib: &Path) -> Result<()> {
    fetch_default_models()?;
    let jna = jna_arg(lib)?;
    run(
        "xvfb-run",
        &[
            "-a",
            "-s",
            XVFB_SCREEN,
            "mvn",
            "-q",
            "-B",
            "-f",
            POM,
            &jna,
            "test",
        ],
    )?;
    println!(
        "screenshot of the demo's window: {}",
        root().join(SCREENSHOT).display()
    );
    Ok(())
}

/// `cargo xtask demo-desktop`: the desktop app on a loopback server of its own (fresh
/// certificate and key), the whole hybrid loop on this machine. Needs a display.
pub fn demo_desktop() -> Result<()> {
    crate::packages::ensure_debian_packages()?;
    let lib = bindings::build_host_library()?;
    fetch_default_models()?;
    let jna = jna_arg(&lib)?;
    run(
        "mvn",
        &[
            "-q",
            "-B",
            "-f",
            POM,
            &jna,
            "compile",
            "exec:java",
            "-Dexec.args=--embedded-server",
        ],
    )
}
