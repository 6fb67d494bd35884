//! A sync protocol message from a peer: decoding never panics, whatever the bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = stallmesh_sync::Message::decode(data);
});
