//! Misconfigurations surface as distinct typed errors with messages a user can act on.

use crate::e2e_common;

use std::sync::Arc;

use e2e_common::{ServerProc, gemma_path};
use uhlm_sdk::{
    CancelToken, Codec, GenerationOptions, HybridEngine, Mode, NoopListener, PolicyConfig, Prompt,
    SamplingOptions, SdkError,
};

fn try_generate(engine: &HybridEngine) -> Result<(), SdkError> {
    engine
        .generate_blocking(
            Prompt::Text("Hello".into()),
            GenerationOptions {
                sampling: SamplingOptions::greedy(4),
                chat_template: false,
            },
            Arc::new(NoopListener),
            CancelToken::new(),
        )
        .map(|_| ())
}

#[test]
fn each_misconfiguration_is_a_distinct_typed_error() {
    let server = ServerProc::start();
    let base = || server.engine_config(Mode::Hlm, Codec::default(), PolicyConfig::send_all());

    let mut config = base();
    config.api_key = "not-the-key".into();
    let err = try_generate(&HybridEngine::new(config).unwrap()).unwrap_err();
    assert!(matches!(err, SdkError::Unauthorized(_)), "{err:?}");
    assert!(err.to_string().contains("API key"), "{err}");

    let mut config = base();
    let wrong_pin = "ab".repeat(32);
    config.pin = Some(wrong_pin.clone());
    let err = try_generate(&HybridEngine::new(config).unwrap()).unwrap_err();
    match &err {
        SdkError::CertificateMismatch { expected, actual } => {
            assert_eq!(expected, &wrong_pin);
            assert_eq!(actual, &server.fingerprint);
        }
        other => panic!("expected CertificateMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("pinned fingerprint"), "{err}");

    let mut config = base();
    config.slm_path = gemma_path().into();
    let err = try_generate(&HybridEngine::new(config).unwrap()).unwrap_err();
    assert!(matches!(err, SdkError::VocabularyMismatch(_)), "{err:?}");
    assert!(err.to_string().contains("vocabulary"), "{err}");

    let mut config = base();
    config.slm_path = "/nonexistent/model.gguf".into();
    let err = HybridEngine::new(config)
        .err()
        .expect("a missing model is an error");
    assert!(matches!(err, SdkError::ModelNotFound { .. }), "{err:?}");

    // The server is unharmed: a correct configuration still works.
    try_generate(&HybridEngine::new(base()).unwrap()).unwrap();
}
