//! A batch of signed changes as `POST /api/v1/changes` and the cloud's upload receive it: decoded
//! with postcard, then verified and applied. Nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts in its panic hook, so a panic the code under test catches on purpose
/// (automerge's assertions on a peer's bytes) would count as a crash. With the default hook back, a
/// caught panic is the code's answer and an uncaught one still aborts the run.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}
use stallmesh_identity::SignedChange;
use stallmesh_ledger::testkit::TestMarket;

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let Ok(changes) = postcard::from_bytes::<Vec<SignedChange>>(data) else { return };
    let market = TestMarket::new(7);
    let (mut tablet, _) = market.device(1, "Test Stall");
    let _ = tablet.apply_remote(changes);
});
