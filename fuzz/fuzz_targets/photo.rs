//! A photo a till uploads (product photo, visual search, a card's QR): the decode with its size
//! and pixel limits, the model's input tensor, and the shrink for the journal never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// See `scenario_toml.rs`: a panic caught on purpose is the code's answer, not a crash.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    if let Ok(img) = stallmesh_inference::decode_image(data) {
        assert_eq!(stallmesh_inference::model_input(&img).len(), 3 * 224 * 224);
        let _ = stallmesh_inference::shrink_for_journal(data, stallmesh_ledger::MAX_PHOTO_BYTES);
    }
});
