//! Arbitrary bytes as a GGUF model file: the header, the tokenizer and chat template it
//! describes, and the whole model load (shapes, bounds, tensor data). Every corrupt file must
//! give an error, never a panic, an abort or an allocation its size does not justify.

use std::io::{Cursor, Write};

use candle_core::quantized::gguf_file::Content;
use uhlm_core::chat::ChatMessage;
use uhlm_model::chat_template::ChatTemplate;
use uhlm_model::tokenizer::Tokenizer;
use uhlm_model::{LoadOptions, Model};

/// Loads one file's bytes (panics where an error was due).
pub fn check(data: &[u8]) {
    if let Ok(content) = Content::read(&mut Cursor::new(data)) {
        if let Ok(tokenizer) = Tokenizer::from_gguf(&content)
            && let Ok(ids) = tokenizer.encode("Hello, world!\n<|im_start|>", true)
        {
            let _ = tokenizer.decode(&ids, false);
        }
        if let Ok(Some(template)) = ChatTemplate::from_gguf(&content) {
            let _ = template.render(&[ChatMessage::new("user", "Hi")], true);
        }
    }
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(data).expect("write the model");
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    if let Ok(model) = Model::load(file.path(), &options) {
        let _ = model.session().score_last(&[0]);
    }
}
