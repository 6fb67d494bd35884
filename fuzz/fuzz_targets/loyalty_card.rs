//! A loyalty card's QR text as a till scans it: parsing and verifying never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts in its panic hook, so a panic the code under test catches on purpose
/// (automerge's assertions on a peer's bytes) would count as a crash. With the default hook back, a
/// caught panic is the code's answer and an uncaught one still aborts the run.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}
use stallmesh_identity::{DeviceId, MarketId};

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(card) = stallmesh_loyalty::Card::from_text(text) {
        let _ = card.verify(&MarketId([1; 16]), &DeviceId([2; 32]), None, 0);
        let _ = card.verify_holder(None);
    }
});
