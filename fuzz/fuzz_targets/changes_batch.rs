//! A batch of signed changes as `POST /api/v1/changes` and the cloud's upload receive it: decoded
//! with postcard, then verified and applied. Nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use stallmesh_identity::SignedChange;
use stallmesh_ledger::testkit::TestMarket;

fuzz_target!(|data: &[u8]| {
    let Ok(changes) = postcard::from_bytes::<Vec<SignedChange>>(data) else { return };
    let market = TestMarket::new(7);
    let (mut tablet, _) = market.device(1, "Test Stall");
    let _ = tablet.apply_remote(changes);
});
