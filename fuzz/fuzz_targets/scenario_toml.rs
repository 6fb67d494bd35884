//! A simulator scenario file: parsing (and its checks) never panic, whatever the text; a scenario
//! that parses writes back (as `--shrink` writes its result) to text that parses to the same file.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts in its panic hook, so a panic the code under test catches on purpose
/// (automerge's assertions on a peer's bytes) would count as a crash. With the default hook back, a
/// caught panic is the code's answer and an uncaught one still aborts the run.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(scenario) = stallmesh_sim::scenario::Scenario::parse(text, "fuzz") else { return };
    let written = toml::to_string(&scenario).expect("a parsed scenario writes back");
    let again = stallmesh_sim::scenario::Scenario::parse(&written, "written").expect("what was written parses");
    assert_eq!(toml::to_string(&again).expect("writes back"), written, "a scenario survives a round trip");
});
