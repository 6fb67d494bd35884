//! The worst peer: enrolled, so its signature is good, sending arbitrary automerge change bytes as
//! its next journal entry. The receiving ledger must refuse or apply it without panicking, and stay
//! usable (it still records its own sale afterwards).
#![no_main]
use libfuzzer_sys::fuzz_target;

/// libfuzzer-sys aborts in its panic hook, so a panic the code under test catches on purpose
/// (automerge's assertions on a peer's bytes) would count as a crash. With the default hook back, a
/// caught panic is the code's answer and an uncaught one still aborts the run.
fn keep_caught_panics() {
    let _ = std::panic::take_hook();
}
use stallmesh_ledger::testkit::{product, TestMarket};
use stallmesh_ledger::LocalOp;

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    let market = TestMarket::new(7);
    let (mut tablet, _) = market.device(1, "Test Stall");
    let (_, peer_enrolment) = market.device(2, "Test Stall");
    tablet.apply_remote(vec![peer_enrolment.change.clone()]);
    let forged = market.device_key(2).sign_change(market.ctx.market, 1, vec![], data.to_vec());
    let _ = tablet.apply_remote(vec![forged]);
    tablet.record(LocalOp::UpsertProduct(product("TEA", 300)), 1).expect("the tablet still records its own changes");
});
