//! `uhlm tokenize`: token ids of a text, from the model's own tokenizer.

use anyhow::{Context, Result};
use clap::Args;
use uhlm_model::fetch;
use uhlm_model::tokenizer::Tokenizer;

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model: path to a GGUF or a registry name.
    #[arg(long, short)]
    model: String,
    /// Add the special tokens the model puts before a prompt (BOS).
    #[arg(long)]
    add_special: bool,
    /// Print a JSON array of {id, piece} instead.
    #[arg(long)]
    json: bool,
    text: String,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let path = fetch::resolve_model(&args.model)?;
    // Only the metadata is read: tokenizing needs no weights.
    let tokenizer = Tokenizer::from_gguf_path(&path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    let ids = tokenizer.encode(&args.text, args.add_special)?;
    if args.json {
        let items: Vec<_> = ids
            .iter()
            .map(|&id| serde_json::json!({ "id": id, "piece": tokenizer.token_piece(id) }))
            .collect();
        println!("{}", serde_json::Value::Array(items));
    } else {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", list.join(","));
    }
    Ok(())
}
