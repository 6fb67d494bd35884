//! A loyalty card's QR text as a till scans it: parsing and verifying never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallmesh_identity::{DeviceId, MarketId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(card) = stallmesh_loyalty::Card::from_text(text) {
        let _ = card.verify(&MarketId([1; 16]), &DeviceId([2; 32]), None, 0);
        let _ = card.verify_holder(None);
    }
});
