//! A device's chat prompt as the server handles it: rendered with the model's own chat template
//! and tokenised with its tokenizer (SmolLM2's, read from the model cache: run
//! `cargo xtask test` or `uhlm models fetch` first). Any conversation must render or be
//! refused with an error, and the rendered text must tokenise and decode back to itself, up to
//! the byte values SmolLM2's vocabulary cannot spell (21 of 256: some control characters and
//! UTF-8 lead bytes of the rarely used planes), which its tokenizer drops as the reference
//! implementation does.

use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use uhlm_core::chat::ChatMessage;
use uhlm_model::chat_template::ChatTemplate;
use uhlm_model::tokenizer::Tokenizer;

/// The model file whose tokenizer and template are checked, in the model cache.
pub const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// GPT-2's printable spelling of a byte (the pieces of a byte-level vocabulary).
fn byte_char(b: u8) -> char {
    let printable = |c: u8| (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || c >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&c| !printable(c)).count() as u32;
        char::from_u32(256 + n).expect("a valid char")
    }
}

/// Which byte values the vocabulary has a piece for.
fn spellable(tokenizer: &Tokenizer) -> [bool; 256] {
    std::array::from_fn(|b| {
        tokenizer
            .piece_id(&byte_char(b as u8).to_string())
            .is_some()
    })
}

fn model() -> &'static (Tokenizer, ChatTemplate) {
    static MODEL_PARTS: OnceLock<(Tokenizer, ChatTemplate)> = OnceLock::new();
    MODEL_PARTS.get_or_init(|| {
        let path = uhlm_model::fetch::models_dir()
            .expect("a model cache")
            .join(MODEL);
        let mut file = std::fs::File::open(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (fetch the models first)", path.display()));
        let content = Content::read(&mut file).expect("the cached model reads");
        let tokenizer = Tokenizer::from_gguf(&content).expect("its tokenizer");
        let template = ChatTemplate::from_gguf(&content)
            .expect("its chat template")
            .expect("an instruct model has one");
        (tokenizer, template)
    })
}

/// A conversation and whether to add the generation prompt.
pub type Input = (Vec<(String, String)>, bool);

/// Renders and tokenises one conversation (panics on a violated property).
pub fn check(input: Input) {
    let (conversation, add_generation_prompt) = input;
    let (tokenizer, template) = model();
    let messages: Vec<ChatMessage> = conversation
        .into_iter()
        .map(|(role, content)| ChatMessage::new(role, content))
        .collect();
    let Ok(text) = template.render(&messages, add_generation_prompt) else {
        return;
    };
    let ids = tokenizer
        .encode(&text, false)
        .expect("rendered text tokenises");
    let back = tokenizer.decode(&ids, false).expect("its own ids decode");
    let spellable = spellable(tokenizer);
    let kept: Vec<u8> = text
        .bytes()
        .filter(|&b| spellable[usize::from(b)])
        .collect();
    assert_eq!(
        back,
        String::from_utf8_lossy(&kept),
        "byte-level BPE loses only what the vocabulary cannot spell"
    );
}
