//! A journal row or block read back from a store file (a file a power cut, a full disk or a bad SD
//! card damaged): decoding never panics, as raw bytes and framed with a valid checksum (to reach
//! the decoders behind it: an entry's, and a block's inflate and entries).
#![no_main]
use libfuzzer_sys::fuzz_target;

/// See `scenario_toml.rs`: a panic caught on purpose is the code's answer, not a crash.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let _ = stallmesh_store::decode_row(data);
    let framed = stallmesh_store::frame_row_body(data);
    if let Ok(entry) = stallmesh_store::decode_row(&framed) {
        // What decodes is an entry the ledger can be handed: it re-encodes.
        assert!(postcard::to_allocvec(&entry).is_ok());
    }
    let _ = stallmesh_store::decode_block(data);
    if let Ok(entries) = stallmesh_store::decode_block(&framed) {
        assert!(!entries.is_empty() && postcard::to_allocvec(&entries).is_ok());
    }
});
