//! Measures how well derived drafts approximate their source: the mean speculative-sampling
//! acceptance `sum_x min(p_x, q_x)` at temperature 1, teacher-forced over varied texts.
//!
//! ```text
//! cargo run --release -p uhlm-model --example draft_acceptance -- \
//!     ~/.cache/uhlm/models/SmolLM2-135M-Instruct.Q4_1.gguf [DROP ...]
//! ```
//!
//! Each optional `DROP` argument is a comma-separated list of blocks to drop (with Q4_0
//! requantization) and replaces the built-in candidate table.

use std::path::PathBuf;

use uhlm_model::{DeriveOptions, GgmlDType, LoadOptions, Model, derive_draft};

/// Plain prose, a chat turn in the model's own format, code, a list and dialogue.
const TEXTS: &[&str] = &[
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. \
     It is named after the engineer Gustave Eiffel, whose company designed and built the tower \
     from 1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centrepiece \
     of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
     <|im_start|>user\nCan you give me three tips for sleeping better?<|im_end|>\n\
     <|im_start|>assistant\nOf course! Here are three tips: 1. Keep a regular schedule, going to \
     bed and waking up at the same time every day. 2. Avoid screens for an hour before bed. \
     3. Keep your bedroom cool, dark and quiet.<|im_end|>\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    \
     for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\nif __name__ == \"__main__\":\n    \
     print([fibonacci(i) for i in range(10)])\n",
    "Ingredients for a simple pancake batter: 200 grams of flour, two eggs, 300 millilitres of \
     milk, a pinch of salt and a tablespoon of melted butter. Whisk the eggs and milk together, \
     then slowly add the flour until the batter is smooth. Let it rest for half an hour.",
    "\"Where are you going?\" asked the old man. \"To the river,\" said the girl, \"my brother \
     is waiting for me there with the boat.\" The old man nodded slowly and looked at the grey \
     sky. \"Be quick, then. It will rain before the evening, and the water rises fast.\"",
];

fn softmax(xs: &[f32]) -> Vec<f64> {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = xs.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn main() -> anyhow::Result<()> {
    let src: PathBuf = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: draft_acceptance SOURCE.gguf [DROP ...]"))?
        .into();
    let out_dir = std::env::temp_dir();
    let custom: Vec<Vec<usize>> = std::env::args()
        .skip(2)
        .map(|a| a.split(',').map(str::parse).collect::<Result<_, _>>())
        .collect::<Result<_, _>>()?;
    let target = Model::load(&src, &LoadOptions::default())?;
    let n = target.info().n_layers;
    let tokenizer = target.tokenizer();
    let texts: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| tokenizer.encode(t, true))
        .collect::<Result<_, _>>()?;
    let target_logits: Vec<_> = texts
        .iter()
        .map(|t| target.session().score(t))
        .collect::<Result<_, _>>()?;
    let positions: usize = texts.iter().map(Vec::len).sum();

    let drop = |d: &[usize]| Some((0..n).filter(|i| !d.contains(i)).collect::<Vec<_>>());
    let q4_0 = |name: &str, keep_layers: Option<Vec<usize>>| {
        let quant = Some(GgmlDType::Q4_0);
        (name.to_string(), DeriveOptions { keep_layers, quant })
    };
    let mut candidates: Vec<(String, DeriveOptions)> = vec![
        q4_0("Q4_0, all 30 blocks = default_draft()", None),
        q4_0("Q4_0, drop 27", drop(&[27])),
        q4_0("Q4_0, drop 15, 27", drop(&[15, 27])),
        q4_0("Q4_0, drop 14, 15, 27", drop(&[14, 15, 27])),
        q4_0("Q4_0, drop 15, 26, 27", drop(&[15, 26, 27])),
        q4_0("Q4_0, drop 22-24", drop(&[22, 23, 24])),
        q4_0("Q4_0, drop 20-25", drop(&[20, 21, 22, 23, 24, 25])),
    ];
    assert_eq!(candidates[0].1, DeriveOptions::default_draft());
    if !custom.is_empty() {
        candidates = custom
            .iter()
            .map(|d| {
                let name = format!("Q4_0, drop {d:?} ({} kept)", n - d.len());
                (
                    name,
                    DeriveOptions {
                        keep_layers: drop(d),
                        quant: Some(GgmlDType::Q4_0),
                    },
                )
            })
            .collect();
    }
    println!(
        "source: {} ({} positions over {} texts)",
        src.display(),
        positions,
        texts.len()
    );
    println!("| candidate | blocks | file MiB | mean acceptance | top-1 agreement |");
    println!("|---|---|---|---|---|");
    for (name, opts) in candidates {
        let out = out_dir.join(format!("uhlm-draft-candidate-{}.gguf", std::process::id()));
        let report = derive_draft(&src, &out, &opts)?;
        let draft = Model::load(&out, &LoadOptions::default())?;
        let (mut acc, mut agree) = (0f64, 0usize);
        for (t, tl) in texts.iter().zip(&target_logits) {
            let dl = draft.session().score(t)?;
            for i in 0..t.len() {
                let (p, q) = (softmax(tl.row(i)), softmax(dl.row(i)));
                acc += p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum::<f64>();
                let am = |x: &[f64]| {
                    (0..x.len())
                        .max_by(|&a, &b| x[a].total_cmp(&x[b]))
                        .unwrap_or(0)
                };
                agree += usize::from(am(&p) == am(&q));
            }
        }
        println!(
            "| {name} | {} | {:.1} | {:.3} | {:.3} |",
            report.kept_layers.len(),
            report.bytes_after as f64 / (1 << 20) as f64,
            acc / positions as f64,
            agree as f64 / positions as f64
        );
        std::fs::remove_file(&out)?;
    }
    Ok(())
}
