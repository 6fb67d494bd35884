//! A sync protocol message from a peer: decoding never panics, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts in its panic hook, so a panic the code under test catches on purpose
/// (automerge's assertions on a peer's bytes) would count as a crash. With the default hook back, a
/// caught panic is the code's answer and an uncaught one still aborts the run.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let _ = stallmesh_sync::Message::decode(data);
});
