//! The cloud's reply to a tablet's uplink (both versions, the online channel's asks among them):
//! decoding never panics, whatever the bytes, and what decodes is within its limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallmesh_ingest::wire::{CloudReply, MAX_RIGHTS_WANTED};

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = CloudReply::decode(data) {
        assert!(reply.rights_wanted.len() <= MAX_RIGHTS_WANTED);
        // What decodes encodes again and reads back the same.
        assert_eq!(CloudReply::decode(&reply.encode()).as_ref(), Ok(&reply));
    }
});
