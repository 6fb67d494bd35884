//! Specifications of the sync protocol, driven by a tiny in-memory network.

use super::*;
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Ledger, LocalOp};

struct Node {
    ledger: Ledger,
    log: MemoryLog,
    sync: Sync<usize>,
}

impl Node {
    fn heads(&self) -> Heads {
        self.ledger.heads()
    }
    fn record(&mut self, op: LocalOp, t: u64) -> SignedChange {
        let e = self.ledger.record(op, t).unwrap();
        self.log.add(e.change.clone());
        e.change
    }
}

/// `Sync::receive`, checking the promise a driver may rely on: a receive that asks for nothing
/// never moves `poll_timeout` earlier (its pending wake still stands).
fn receive_checked(n: &mut Node, from: usize, bytes: &[u8], now: u64, heads: &Heads) -> Vec<Output<usize>> {
    let before = n.sync.poll_timeout();
    let out = n.sync.receive(from, bytes, now, heads, &n.log);
    if out.is_empty() {
        let after = n.sync.poll_timeout();
        assert!(after.is_none() || before.is_some_and(|b| after >= Some(b)), "a quiet receive moved poll_timeout from {before:?} to {after:?}");
    }
    out
}

/// Nodes on a network where every message is delivered, in order, unless `drop` says otherwise.
struct Net {
    nodes: Vec<Node>,
    now: u64,
    /// Bytes carried per receiving node.
    bytes_to: Vec<usize>,
    changes_to: Vec<usize>,
    /// The next this many directed messages are lost.
    lose_sends: usize,
    /// This node is cut off: every message to or from it is lost.
    cut: Option<usize>,
}

impl Net {
    fn new(market: &TestMarket, n: usize) -> Net {
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let (ledger, e0) = market.device(i as u16, "Test Stall");
                let mut log = MemoryLog::default();
                log.add(e0.change);
                Node { ledger, log, sync: Sync::new(SyncConfig::default()) }
            })
            .collect();
        // Every device knows every enrolment before the day (as after a first meeting).
        let all: Vec<SignedChange> = nodes.iter().map(|n| n.log.changes_since(&n.ledger.device(), 0, 1).unwrap()[0].clone()).collect();
        for node in nodes.iter_mut() {
            for e in node.ledger.apply_remote(all.clone()).applied {
                node.log.add(e.change);
            }
        }
        Net { nodes, now: 0, bytes_to: vec![0; n], changes_to: vec![0; n], lose_sends: 0, cut: None }
    }

    /// Carries out outputs of node `at` until the network is quiet.
    fn run(&mut self, at: usize, outputs: Vec<Output<usize>>) {
        let mut queue: std::collections::VecDeque<(usize, Output<usize>)> = outputs.into_iter().map(|o| (at, o)).collect();
        while let Some((src, o)) = queue.pop_front() {
            match o {
                Output::Send { to, bytes } => {
                    self.nodes[src].sync.acked(&to, bytes.len());
                    if self.lose_sends > 0 || self.cut.is_some_and(|c| c == src || c == to) {
                        self.lose_sends = self.lose_sends.saturating_sub(1);
                        continue;
                    }
                    self.bytes_to[to] += bytes.len();
                    let n = &mut self.nodes[to];
                    let heads = n.heads();
                    for o in receive_checked(n, src, &bytes, self.now, &heads) {
                        queue.push_back((to, o));
                    }
                }
                Output::Broadcast { bytes } => {
                    for to in 0..self.nodes.len() {
                        let cut = self.cut.is_some_and(|c| c == src || c == to);
                        if to != src && !cut && self.nodes[src].sync.peers().contains_key(&to) {
                            self.bytes_to[to] += bytes.len();
                            let n = &mut self.nodes[to];
                            let heads = n.heads();
                            for o in receive_checked(n, src, &bytes, self.now, &heads) {
                                queue.push_back((to, o));
                            }
                        }
                    }
                }
                Output::Apply { from, changes } => {
                    self.changes_to[src] += changes.len();
                    let n = &mut self.nodes[src];
                    let report = n.ledger.apply_remote(changes);
                    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
                    for e in report.applied {
                        n.log.add(e.change);
                    }
                    let heads = n.heads();
                    for o in n.sync.applied(&from, report.pending, self.now, &heads) {
                        queue.push_back((src, o));
                    }
                }
                Output::Disconnect { peer, .. } => {
                    self.nodes[src].sync.disconnected(&peer);
                    self.nodes[peer].sync.disconnected(&src);
                }
                Output::RightsWanted { .. } | Output::LoyaltyWanted { .. } => {}
            }
        }
    }

    fn connect(&mut self, a: usize, b: usize) {
        let ha = self.nodes[a].heads();
        let oa = self.nodes[a].sync.connected(b, self.now, &ha);
        let hb = self.nodes[b].heads();
        let ob = self.nodes[b].sync.connected(a, self.now, &hb);
        self.run(a, oa);
        self.run(b, ob);
    }

    fn local(&mut self, at: usize, op: LocalOp) {
        self.now += 1;
        let c = self.nodes[at].record(op, self.now);
        let out = self.nodes[at].sync.local_changes(vec![c]);
        self.run(at, out);
    }
}

fn stock_up(net: &mut Net, at: usize) {
    net.local(at, LocalOp::UpsertProduct(product("honey", 850)));
    net.local(at, LocalOp::Restock { sku: "honey".into(), qty: 1_000_000 });
}

/// Node 0 sells one unit and the sale is not broadcast (a lost message, or nobody was listening).
fn sell_unannounced(net: &mut Net) {
    net.now += 1;
    let t = net.now;
    net.nodes[0].record(sell("honey", 1), t);
}

#[test]
fn a_new_peer_catches_up_with_about_the_bytes_of_the_changes_it_lacks() {
    let market = TestMarket::new(1);
    let mut net = Net::new(&market, 2);
    stock_up(&mut net, 0);
    for _ in 0..4_500 {
        sell_unannounced(&mut net); // made while node 1 was away
    }
    let missing: usize =
        net.nodes[0].log.changes_since(&net.nodes[0].ledger.device(), 0, usize::MAX).unwrap().iter().map(|c| c.encoded_len()).sum();
    net.bytes_to = vec![0, 0];
    net.connect(0, 1);
    assert_eq!(net.nodes[1].ledger.state(), net.nodes[0].ledger.state());
    let ratio = net.bytes_to[1] as f64 / missing as f64;
    assert!(ratio < 1.05, "received {} bytes for {missing} bytes of changes ({ratio:.3}x)", net.bytes_to[1]);
    assert_eq!(net.changes_to[1], 4_503 - 1, "each missing change sent once (its enrolment it had)");
    assert!(net.nodes[0].sync.stats().messages_out >= 3, "4,500 changes take several bounded messages");
}

#[test]
fn local_changes_reach_connected_peers_at_once() {
    let market = TestMarket::new(2);
    let mut net = Net::new(&market, 3);
    net.connect(0, 1);
    net.connect(0, 2);
    net.connect(1, 2);
    stock_up(&mut net, 0);
    net.local(0, sell("honey", 2));
    for n in &net.nodes[1..] {
        assert_eq!(n.ledger.state().sales.len(), 1);
        assert_eq!(n.ledger.state(), net.nodes[0].ledger.state());
    }
}

#[test]
fn a_missed_broadcast_is_pulled_when_the_next_one_reveals_the_gap() {
    let market = TestMarket::new(3);
    let mut net = Net::new(&market, 2);
    net.connect(0, 1);
    stock_up(&mut net, 0);
    // This sale's broadcast is lost.
    sell_unannounced(&mut net);
    // The next one arrives with a gap before it: node 1 holds it pending and pulls.
    net.local(0, sell("honey", 1));
    assert_eq!(net.nodes[1].ledger.pending_len(), 0);
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 2);
}

#[test]
fn heartbeats_repair_what_broadcast_lost_and_silent_peers_are_dropped() {
    let market = TestMarket::new(4);
    let mut net = Net::new(&market, 2);
    net.connect(0, 1);
    stock_up(&mut net, 0);
    sell_unannounced(&mut net); // and nothing follows it
    net.now += 1_000;
    let outputs: Vec<_> = (0..2)
        .map(|at| {
            let h = net.nodes[at].heads();
            net.nodes[at].sync.tick(net.now, &h)
        })
        .collect();
    for (at, out) in outputs.into_iter().enumerate() {
        assert!(out.iter().any(|o| matches!(o, Output::Send { .. })), "heartbeat due at {at}");
        net.run(at, out);
    }
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 1);

    // Node 1 falls silent (partition): node 0 drops it after the liveness timeout.
    net.now += SyncConfig::default().liveness_timeout_ms + 1;
    let h = net.nodes[0].heads();
    let out = net.nodes[0].sync.tick(net.now, &h);
    assert!(out.iter().any(|o| matches!(o, Output::Disconnect { peer: 1, .. })));
    assert_eq!(net.nodes[0].sync.stats().liveness_disconnects, 1);
}

#[test]
fn malformed_oversized_or_foreign_messages_drop_the_peer_and_are_counted() {
    let market = TestMarket::new(5);
    let mut net = Net::new(&market, 2);
    net.connect(0, 1);
    let n = &mut net.nodes[1];
    let heads = n.heads();
    let good = Message::Heads { heads: vec![], full: true, total: 0 }.encode();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty"),
        (vec![9, 0, 0], "version"),
        (good[..good.len() - 1].to_vec(), "malformed"),
        (vec![PROTOCOL_VERSION, 0xff, 0xff, 0xff], "malformed"),
        (vec![0u8; MAX_MESSAGE_BYTES + 1], "oversized"),
    ];
    for (bytes, label) in cases {
        n.sync.connected(0, 0, &heads);
        let out = n.sync.receive(0, &bytes, 0, &heads, &n.log);
        assert!(matches!(out.as_slice(), [Output::Disconnect { peer: 0, .. }]), "{label}: {out:?}");
        assert!(n.sync.peers().is_empty());
    }
    let errors = &n.sync.stats().protocol_errors;
    assert_eq!((errors["empty"], errors["version"], errors["malformed"], errors["oversized"]), (1, 1, 2, 1));
    // Too many heads entries: over a limit, rejected without building them.
    let too_many = Message::Heads {
        full: true,
        total: 0,
        heads: (0..=MAX_HEADS_ENTRIES as u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_le_bytes());
                (DeviceId(id), 1)
            })
            .collect(),
    }
    .encode();
    assert!(matches!(Message::decode(&too_many), Err(ProtocolError::OverLimit(_))));
}

#[test]
fn rights_wanted_reaches_the_driver() {
    let market = TestMarket::new(6);
    let mut net = Net::new(&market, 2);
    net.connect(0, 1);
    let out = net.nodes[0].sync.want_rights("honey", 3, true, 5);
    let Output::Send { to: 1, bytes } = &out[0] else { panic!("{out:?}") };
    let n = &mut net.nodes[1];
    let heads = n.heads();
    let got = n.sync.receive(0, bytes, 5, &heads, &n.log);
    assert_eq!(got, vec![Output::RightsWanted { from: 0, sku: "honey".into(), qty: 3, for_sale: true }]);
}

#[test]
fn heartbeats_carry_only_the_heads_that_changed() {
    let market = TestMarket::new(7);
    let mut net = Net::new(&market, 3);
    net.connect(0, 1);
    net.connect(0, 2);
    stock_up(&mut net, 0);
    let sizes: Vec<usize> = (1..=3)
        .map(|_| {
            net.now += 1_000;
            let h = net.nodes[1].heads();
            let out = net.nodes[1].sync.tick(net.now, &h);
            let Output::Send { bytes, .. } = &out[0] else { panic!("{out:?}") };
            let len = bytes.len();
            net.run(1, out);
            for at in [0, 2] {
                let h = net.nodes[at].heads();
                let out = net.nodes[at].sync.tick(net.now, &h);
                net.run(at, out);
            }
            len
        })
        .collect();
    // The first heartbeat tells node 0 about the new entries; the next ones have nothing new.
    assert!(sizes[1] < sizes[0] && sizes[2] == sizes[1], "{sizes:?}");
    assert!(sizes[1] < 16, "an idle heartbeat is a few bytes: {sizes:?}");
}

/// Node `at` heartbeats; its messages and every answer are carried.
fn tick(net: &mut Net, at: usize) {
    let h = net.nodes[at].heads();
    let out = net.nodes[at].sync.tick(net.now, &h);
    net.run(at, out);
}

/// Two connected nodes; node 0 sells. The sale's broadcast is lost, node 1's next heartbeat makes
/// node 0 serve it, and that answer (returned here) is lost too.
fn a_served_sale_lost(market: &TestMarket) -> (Net, Vec<Output<usize>>) {
    let mut net = Net::new(market, 2);
    net.connect(0, 1);
    stock_up(&mut net, 0);
    sell_unannounced(&mut net);
    net.now += 1_000;
    let h1 = net.nodes[1].heads();
    let heartbeat = net.nodes[1].sync.tick(net.now, &h1);
    let Output::Send { bytes, .. } = &heartbeat[0] else { panic!("{heartbeat:?}") };
    let n0 = &mut net.nodes[0];
    let h0 = n0.heads();
    let reply = n0.sync.receive(1, bytes, net.now, &h0, &n0.log);
    (net, reply)
}

#[test]
fn changes_served_but_never_confirmed_are_served_again_after_the_liveness_timeout() {
    let market = TestMarket::new(8);
    let (mut net, reply) = a_served_sale_lost(&market);
    assert!(reply.iter().any(|o| matches!(o, Output::Send { to: 1, .. })), "served: {reply:?}");
    assert_eq!(net.nodes[0].sync.unconfirmed(&1).unwrap().len(), 1, "node 0 counts the sale as on its way");
    // While it could still be in flight, heartbeats do not send it again.
    for _ in 0..3 {
        net.now += 1_000;
        tick(&mut net, 1);
        tick(&mut net, 0);
    }
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 0);
    // Unconfirmed past the liveness timeout: assumed lost and served again.
    for _ in 0..3 {
        net.now += 1_000;
        tick(&mut net, 0);
        tick(&mut net, 1);
    }
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 1, "the sale reached node 1");
    assert_eq!(net.nodes[0].sync.stats().unconfirmed_expired, 1);
    assert_eq!(net.nodes[0].sync.unconfirmed(&1).unwrap().len(), 0, "confirmed by node 1's heads");
}

#[test]
fn a_lost_heads_delta_is_noticed_by_its_total_and_repaired_with_one_full_heads() {
    let market = TestMarket::new(10);
    let mut net = Net::new(&market, 2);
    net.connect(0, 1);
    stock_up(&mut net, 0);
    // The sale's broadcast is lost, and so is node 0's heads delta naming it: node 1's view of
    // node 0 is now short.
    sell_unannounced(&mut net);
    net.now += 1_000;
    let h0 = net.nodes[0].heads();
    let lost = net.nodes[0].sync.tick(net.now, &h0);
    assert!(matches!(&lost[..], [Output::Send { to: 1, .. }]), "{lost:?}");
    // The next delta is empty (nothing changed since), but its total gives the loss away.
    net.now += 1_000;
    tick(&mut net, 0);
    assert_eq!(net.nodes[1].sync.stats().full_heads_wanted, 1);
    assert_eq!(net.nodes[1].sync.peers()[&0].their_total, net.nodes[0].heads().total(), "view repaired");
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 1, "and the sale pulled");
    // Views that add up ask for nothing more.
    for _ in 0..5 {
        net.now += 1_000;
        tick(&mut net, 0);
        tick(&mut net, 1);
    }
    assert_eq!(net.nodes[1].sync.stats().full_heads_wanted + net.nodes[0].sync.stats().full_heads_wanted, 1);
}

#[test]
fn a_lost_change_is_served_again_even_while_newer_changes_of_its_device_keep_flowing() {
    let market = TestMarket::new(11);
    let (mut net, _lost_reply) = a_served_sale_lost(&market);
    // A sale every second, each served and delivered: node 1 holds them back behind the gap.
    for _ in 0..6 {
        net.now += 1_000;
        let t = net.now;
        net.nodes[0].record(sell("honey", 1), t);
        tick(&mut net, 1);
        tick(&mut net, 0);
    }
    assert_eq!(net.nodes[1].ledger.state().sales.len(), 7, "the lost sale was served again and the rest applied behind it");
    assert_eq!(net.nodes[1].ledger.pending_len(), 0);
}

#[derive(Debug, Clone)]
enum Step {
    Advance(u64),
    Sell(usize),
    SellUnannounced(usize),
    Tick(usize),
    Lose(usize),
    Connect(usize, usize),
    Cut(Option<usize>),
    /// A driver's loop for this long: wake each node at its `poll_timeout`, tick it, carry out.
    Drive(u64),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0u64..2_500).prop_map(Step::Advance),
        (0usize..3).prop_map(Step::Sell),
        (0usize..3).prop_map(Step::SellUnannounced),
        (0usize..3).prop_map(Step::Tick),
        (1usize..4).prop_map(Step::Lose),
        (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Connect(a, b)),
        proptest::option::of(0usize..3).prop_map(Step::Cut),
        (0u64..12_000).prop_map(Step::Drive),
    ]
}

/// `poll_timeout` is exact: a tick at any time before it sends nothing and changes nothing, and a
/// tick at it does something (a heartbeat, a liveness disconnect, or unconfirmed changes expired).
fn check_poll_timeout(net: &Net, at: usize, probe_fraction: f64) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    let node = &net.nodes[at];
    let heads = node.heads();
    let Some(due) = node.sync.poll_timeout() else {
        prop_assert!(node.sync.peers().is_empty(), "None only without peers");
        let mut idle = node.sync.clone();
        prop_assert!(idle.tick(net.now + 1_000_000, &heads).is_empty());
        return Ok(());
    };
    let earliest = due.saturating_sub(6_000);
    let probe = earliest + ((due - earliest) as f64 * probe_fraction) as u64;
    // A random instant before it, and the last one.
    for probe in [probe, due.saturating_sub(1)] {
        if probe >= due {
            continue;
        }
        let mut early = node.sync.clone();
        let out = early.tick(probe, &heads);
        prop_assert!(out.is_empty(), "tick at {probe} before poll_timeout {due} sent {out:?}");
        prop_assert_eq!(early.peers(), node.sync.peers(), "tick at {} before {} changed a session", probe, due);
        prop_assert_eq!(early.stats(), node.sync.stats());
    }
    let mut on_time = node.sync.clone();
    let out = on_time.tick(due, &heads);
    prop_assert!(
        !out.is_empty() || on_time.peers() != node.sync.peers() || on_time.stats() != node.sync.stats(),
        "tick at poll_timeout {} did nothing",
        due
    );
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 48, ..Default::default() })]
    #[test]
    fn tick_does_nothing_before_poll_timeout_and_something_at_it(
        steps in proptest::collection::vec(step(), 1..40),
        probes in proptest::collection::vec(0.0f64..1.0, 3),
    ) {
        let market = TestMarket::new(12);
        let mut net = Net::new(&market, 3);
        for (at, _) in probes.iter().enumerate() {
            proptest::prop_assert_eq!(net.nodes[at].sync.poll_timeout(), None, "no peers, nothing to wake for");
        }
        net.connect(0, 1);
        net.connect(1, 2);
        stock_up(&mut net, 0);
        for s in steps {
            match s {
                Step::Advance(ms) => net.now += ms,
                Step::Sell(at) => {
                    if at == 0 {
                        net.local(0, sell("honey", 1));
                    }
                }
                Step::SellUnannounced(at) => {
                    if at == 0 {
                        sell_unannounced(&mut net);
                    }
                }
                Step::Tick(at) => tick(&mut net, at),
                Step::Lose(n) => net.lose_sends = n,
                Step::Connect(a, b) => {
                    if a != b && !net.nodes[a].sync.peers().contains_key(&b) {
                        net.nodes[b].sync.disconnected(&a);
                        net.connect(a, b);
                    }
                }
                Step::Cut(c) => net.cut = c,
                Step::Drive(ms) => {
                    let until = net.now + ms;
                    loop {
                        let next = (0..3).filter_map(|at| net.nodes[at].sync.poll_timeout().map(|t| (t, at))).min();
                        let Some((due, at)) = next.filter(|(t, _)| *t <= until) else { break };
                        net.now = net.now.max(due);
                        for (n, fraction) in probes.iter().enumerate() {
                            check_poll_timeout(&net, n, *fraction)?;
                        }
                        tick(&mut net, at);
                    }
                    net.now = until;
                }
            }
            for (at, fraction) in probes.iter().enumerate() {
                check_poll_timeout(&net, at, *fraction)?;
            }
        }
    }
}

#[test]
fn heartbeats_due_within_a_quarter_interval_go_out_together() {
    let market = TestMarket::new(13);
    let mut net = Net::new(&market, 3);
    net.connect(0, 1);
    net.now += 200;
    net.connect(0, 2); // node 0's heartbeat to 2 falls due 200 ms after its heartbeat to 1
    let heartbeat_ms = SyncConfig::default().heartbeat_ms;
    assert_eq!(net.nodes[0].sync.poll_timeout(), Some(heartbeat_ms), "the heartbeat to node 1 is due first");
    net.now = heartbeat_ms;
    let h = net.nodes[0].heads();
    let out = net.nodes[0].sync.tick(net.now, &h);
    let to: Vec<usize> = out.iter().filter_map(|o| if let Output::Send { to, .. } = o { Some(*to) } else { None }).collect();
    assert_eq!(to, vec![1, 2], "one wake heartbeats both peers");
    assert_eq!(net.nodes[0].sync.poll_timeout(), Some(2 * heartbeat_ms), "and both fall in step");
}

#[test]
fn a_bounded_batch_of_what_a_peer_lacks_gives_every_journal_its_turn() {
    let market = TestMarket::new(14);
    let mut log = MemoryLog::default();
    let mut heads = BTreeMap::new();
    // One journal of large changes (photos of 30 KB) and one of small sales; the byte budget holds
    // three photos. The small journal must still advance: it may hold what the other depends on.
    let mut photo = vec![0xFF, 0xD8, 0xFF];
    photo.resize(30 * 1024, 7);
    let mut small = 0;
    for n in [1u16, 2] {
        let (mut l, e0) = market.device(n, "Test Stall");
        log.add(e0.change);
        let sku = format!("S{n}");
        log.add(l.record(LocalOp::UpsertProduct(product(&sku, 5)), 1).unwrap().change);
        log.add(l.record(LocalOp::Restock { sku: sku.clone(), qty: 1_000 }, 1).unwrap().change);
        for i in 0..10u64 {
            let op = if n == 1 { LocalOp::AttachPhoto { sku: sku.clone(), jpeg: photo.clone() } } else { sell(&sku, 1) };
            let c = l.record(op, 2 + i).unwrap().change;
            if n == 2 {
                small += c.encoded_len() + 8;
            }
            log.add(c);
        }
        heads.insert(l.device(), 13);
    }
    let mine: Heads = heads.iter().map(|(d, n)| (*d, *n)).collect();
    let budget = 3 * (photo.len() + 1024) + small + 4 * 1024;
    let (changes, more) = missing(&mine, &BTreeMap::new(), &log, MAX_CHANGES_PER_MESSAGE, budget).unwrap();
    assert!(more, "the budget cut the batch short");
    let count = |d: &DeviceId| changes.iter().filter(|c| c.device == *d).count();
    let (photos, sales) = (market.device_key(1).device_id(), market.device_key(2).device_id());
    assert_eq!(count(&sales), 13, "the small journal came whole although the large one filled the budget first");
    assert!(count(&photos) >= 3 && count(&photos) < 13, "{}", count(&photos));
    assert!(changes.iter().map(|c| c.encoded_len() + 8).sum::<usize>() <= budget);
    // What the peer already holds is not sent again.
    assert_eq!(missing(&mine, &heads, &log, MAX_CHANGES_PER_MESSAGE, budget).unwrap(), (vec![], false));
}

/// Device `i` of those made up from `tag`.
fn made_up(tag: u8, i: u32) -> DeviceId {
    let mut id = [tag; 32];
    id[..4].copy_from_slice(&i.to_le_bytes());
    DeviceId(id)
}

/// Full heads naming `n` devices made up from `tag`, each holding one entry.
fn made_up_heads(tag: u8, n: usize) -> Vec<u8> {
    let heads = (0..n as u32).map(|i| (made_up(tag, i), 1)).collect();
    Message::Heads { heads, full: true, total: n as u64 }.encode()
}

#[test]
fn device_numbers_are_compacted_when_full_and_a_peer_whose_heads_still_do_not_fit_is_dropped() {
    let market = TestMarket::new(11);
    let net = Net::new(&market, 1);
    let n = &net.nodes[0];
    let (mine, log) = (n.heads(), &n.log);
    let mut sync: Sync<usize> = Sync::new(SyncConfig::default());
    for peer in 1..=4 {
        sync.connected(peer, 0, &mine);
    }
    // Peers 1 and 2 fill every number with devices nobody else names.
    sync.receive(1, &made_up_heads(1, MAX_HEADS_ENTRIES), 1, &mine, log);
    sync.receive(2, &made_up_heads(2, MAX_KNOWN_DEVICES - MAX_HEADS_ENTRIES), 1, &mine, log);
    let named_by_2 = made_up(2, 7);
    assert_eq!(sync.peer_holds(&2, &named_by_2), Some(1));
    sync.disconnected(&1);
    // Peer 3's one new device finds room: peer 1's devices lost their numbers, peer 2 keeps its view.
    let out = sync.receive(3, &made_up_heads(3, 1), 2, &mine, log);
    assert!(!out.iter().any(|o| matches!(o, Output::Disconnect { .. })), "{out:?}");
    assert_eq!(sync.peer_holds(&3, &made_up(3, 0)), Some(1));
    assert_eq!(sync.peer_holds(&2, &named_by_2), Some(1), "renumbering keeps what a peer told");
    assert_eq!(sync.peer_holds(&2, &made_up(1, 0)), Some(0));
    // Peer 4 names more than is left even after compacting: dropped, the others untouched.
    let out = sync.receive(4, &made_up_heads(4, MAX_HEADS_ENTRIES), 3, &mine, log);
    assert!(matches!(out.as_slice(), [Output::Disconnect { peer: 4, .. }]), "{out:?}");
    assert_eq!(sync.stats().protocol_errors.get("over_limit"), Some(&1));
    assert_eq!(sync.peers().keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(sync.peer_holds(&2, &named_by_2), Some(1));
}

/// `against` walks both maps at once: each of mine's devices meets exactly what a lookup in
/// theirs finds, whichever devices either side lacks.
#[test]
fn against_pairs_each_of_my_devices_with_what_the_other_side_holds() {
    let mut mine = BTreeMap::new();
    let mut theirs = BTreeMap::new();
    for i in 0..200u32 {
        match i % 5 {
            0 => {
                mine.insert(made_up(1, i), u64::from(i) + 1);
            }
            1 => {
                theirs.insert(made_up(1, i), 7);
            }
            _ => {
                mine.insert(made_up(1, i), u64::from(i));
                theirs.insert(made_up(1, i), u64::from(i % 3));
            }
        }
    }
    let walked: Vec<(DeviceId, u64, u64)> = against(&mine, &theirs).map(|(d, n, h)| (*d, n, h)).collect();
    let looked_up: Vec<(DeviceId, u64, u64)> = mine.iter().map(|(d, n)| (*d, *n, theirs.get(d).copied().unwrap_or(0))).collect();
    assert_eq!(walked, looked_up);
    assert!(walked.iter().any(|(_, _, h)| *h == 0) && walked.iter().any(|(_, _, h)| *h > 0));
}
