//! Chat templates: the Jinja program a model ships to turn a conversation into its prompt.
//!
//! Rendered with minijinja the way transformers renders them (`trim_blocks`, `lstrip_blocks`,
//! loop controls, Python string methods through minijinja-contrib's pycompat,
//! `raise_exception`, `bos_token`/`eos_token`), so the prompt is byte-for-byte what the model
//! was trained on.

use candle_core::quantized::gguf_file;
use minijinja::{Environment, ErrorKind, Value, context};
use uhlm_core::chat::ChatMessage;

const TEMPLATE_KEY: &str = "tokenizer.chat_template";
const NAME: &str = "chat";

/// Why a template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("GGUF metadata `{key}` is malformed: {reason}")]
    BadMetadata { key: String, reason: String },
    #[error("chat template does not parse: {0}")]
    Syntax(#[source] minijinja::Error),
    #[error("chat template rejected the conversation: {0}")]
    Rejected(String),
    #[error("rendering the chat template failed: {0}")]
    Render(#[source] minijinja::Error),
}

/// A model's chat template, parsed once and rendered per conversation.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn token_text(content: &gguf_file::Content, id_key: &str) -> Result<String, ChatTemplateError> {
    let bad = |reason: String| ChatTemplateError::BadMetadata {
        key: id_key.to_string(),
        reason,
    };
    let Some(id) = content.metadata.get(id_key) else {
        return Ok(String::new());
    };
    let id = id
        .to_u32()
        .or_else(|_| id.to_i32().map(|x| x as u32))
        .map_err(|e| bad(e.to_string()))?;
    let tokens = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .ok_or_else(|| bad("no tokenizer.ggml.tokens to look the id up in".into()))?
        .to_vec()
        .map_err(|e| bad(e.to_string()))?;
    let token = tokens
        .get(id as usize)
        .ok_or_else(|| bad(format!("id {id} outside the vocabulary")))?;
    token.to_string().cloned().map_err(|e| bad(e.to_string()))
}

impl ChatTemplate {
    /// Parses a template; `bos_token`/`eos_token` are the texts the template may reference.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        // transformers renders with these settings; without them templates gain stray newlines.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(ChatTemplateError::Syntax)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(NAME, source.clone())
            .map_err(ChatTemplateError::Syntax)?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template a GGUF stores under `tokenizer.chat_template`, or `None` when it has none
    /// (base models such as Gemma 3 270M).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Option<Self>, ChatTemplateError> {
        let Some(value) = content.metadata.get(TEMPLATE_KEY) else {
            return Ok(None);
        };
        let source = value
            .to_string()
            .map_err(|e| ChatTemplateError::BadMetadata {
                key: TEMPLATE_KEY.into(),
                reason: e.to_string(),
            })?
            .clone();
        let bos = token_text(content, "tokenizer.ggml.bos_token_id")?;
        let eos = token_text(content, "tokenizer.ggml.eos_token_id")?;
        Self::new(source, bos, eos).map(Some)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The prompt for `messages`; `add_generation_prompt` appends the header of the assistant's
    /// turn so that generation continues as the assistant.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(ChatTemplateError::Render)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|e| {
                if e.kind() == ErrorKind::InvalidOperation {
                    ChatTemplateError::Rejected(e.detail().unwrap_or_default().to_string())
                } else {
                    ChatTemplateError::Render(e)
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_methods_and_whitespace_control() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n    {% if m.role %}{{ m['role'].upper() }}: {{ m['content'].strip() }}\n    {% endif %}\n{% endfor %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t
            .render(
                &[ChatMessage::user("  hi  "), ChatMessage::assistant("yo")],
                false,
            )
            .unwrap();
        assert_eq!(out, "USER: hi\nASSISTANT: yo\n");
    }

    #[test]
    fn raise_exception_is_a_typed_rejection() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        match t.render(&[ChatMessage::system("x")], true) {
            Err(ChatTemplateError::Rejected(m)) => assert!(m.contains("first must be user")),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(t.render(&[ChatMessage::user("x")], true).unwrap(), "ok");
    }

    #[test]
    fn bos_and_eos_are_variables() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::user("a")], false).unwrap(),
            "<s>a</s>"
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", "", ""),
            Err(ChatTemplateError::Syntax(_))
        ));
    }
}
