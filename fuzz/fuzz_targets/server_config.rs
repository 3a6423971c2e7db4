//! The server's TOML configuration: arbitrary text must parse to a config or a clear error,
//! and a parsed config must validate or be refused, never panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use uhlm_server::ServerConfig;

fuzz_target!(|text: &str| {
    if let Ok(config) = toml::from_str::<ServerConfig>(text) {
        let _ = config.validate();
    }
});
