//! A configuration file as an operator (or a half-written editor save, or a corrupted SD card)
//! leaves it: loading never panics, and a file that loads gives a configuration that passed every
//! check of `Config::load`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = stallmesh_config::Config::from_text(Some(("fuzz.toml", text)), |_| None) {
        assert!(config.inference.workers >= 1 && config.inference.workers <= stallmesh_config::MAX_INFERENCE_WORKERS);
        assert!(config.inference.treatment_percent <= 100);
    }
});
