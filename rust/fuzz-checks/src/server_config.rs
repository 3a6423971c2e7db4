//! The server's TOML configuration: arbitrary text must parse to a config or a clear error,
//! and a parsed config must validate or be refused, never panic.

use uhlm_server::ServerConfig;

/// Parses and validates one text (panics where an error was due).
pub fn check(text: &str) {
    if let Ok(config) = toml::from_str::<ServerConfig>(text) {
        let _ = config.validate();
    }
}
