//! A simulator scenario file: parsing (and its checks) never panic, whatever the text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = stallmesh_sim::scenario::Scenario::parse(text, "fuzz");
});
