//! Chat templates read from the real GGUFs render exactly what the templates define.

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use uhlm_core::chat::ChatMessage;
use uhlm_model::chat_template::ChatTemplate;
use uhlm_model::tokenizer::Tokenizer;

fn content(name: &str) -> Option<gguf_file::Content> {
    let path: PathBuf = uhlm_model::fetch::models_dir().ok()?.join(name);
    if !path.is_file() {
        eprintln!("skipping: {} is not in the model cache", path.display());
        return None;
    }
    let mut file = std::fs::File::open(&path).expect("open model");
    Some(gguf_file::Content::read(&mut file).expect("read gguf"))
}

#[test]
fn smollm2_system_and_user() {
    let Some(c) = content("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let t = ChatTemplate::from_gguf(&c)
        .unwrap()
        .expect("SmolLM2 ships a template");
    let messages = [
        ChatMessage::system("You are terse."),
        ChatMessage::user("Hi there"),
    ];
    assert_eq!(
        t.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&messages, false).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    );
}

#[test]
fn smollm2_inserts_its_default_system_prompt() {
    let Some(c) = content("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let t = ChatTemplate::from_gguf(&c).unwrap().unwrap();
    let out = t
        .render(
            &[
                ChatMessage::user("2+2?"),
                ChatMessage::assistant("4"),
                ChatMessage::user("3+3?"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
         <|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn smollm2_rendered_prompt_tokenizes_to_whole_control_tokens() {
    let Some(c) = content("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let t = ChatTemplate::from_gguf(&c).unwrap().unwrap();
    let tok = Tokenizer::from_gguf(&c).unwrap();
    let text = t.render(&[ChatMessage::user("Hi")], true).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let im_start = tok.encode("<|im_start|>", false).unwrap();
    assert_eq!(im_start.len(), 1);
    assert_eq!(ids.iter().filter(|&&i| i == im_start[0]).count(), 3);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn gemma3_base_model_has_no_template() {
    let Some(c) = content("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    assert!(ChatTemplate::from_gguf(&c).unwrap().is_none());
}
