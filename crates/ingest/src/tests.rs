//! Specifications of the ingest core and the uplink core, driven in memory.

use super::*;
use crate::uplink::{Uplink, BACKOFF_MAX_MS};
use crate::wire::CloudReply;
use stallmesh_identity::Role;
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_sync::{MemoryLog, Message};

fn cloud_of(market: &TestMarket, n: u16) -> (DeviceKey, Certificate) {
    let key = market.device_key(n);
    let cert = market.key.enrol(key.device_id(), "cloud", Role::Cloud, u64::MAX);
    (key, cert)
}

/// A tablet with a product and stock, and `sales` sales.
fn tablet(market: &TestMarket, n: u16, sales: usize) -> (Ledger, Vec<SignedChange>) {
    let (mut l, enrol) = market.device(n, "Test Stall");
    let mut out = vec![enrol.change];
    let sku = format!("SKU-{n}");
    out.push(l.record(LocalOp::UpsertProduct(product(&sku, 250)), 1).unwrap().change);
    out.push(l.record(LocalOp::Restock { sku: sku.clone(), qty: 10_000 }, 2).unwrap().change);
    for i in 0..sales {
        out.push(l.record(sell(&sku, 1), 10 + i as u64).unwrap().change);
    }
    (l, out)
}

fn offsets(b: &Batch) -> Vec<u64> {
    b.records.iter().map(|r| r.offset).collect()
}

#[test]
fn accepted_changes_get_gapless_offsets_and_each_change_is_logged_once() {
    let m = TestMarket::new(1);
    let (key, cert) = cloud_of(&m, 100);
    let (mut cloud, first) = MarketIngest::create(m.ctx.clone(), key, cert, 0).unwrap();
    assert_eq!(offsets(&first), vec![1], "the log starts with the cloud device's own enrolment");
    let (_, a) = tablet(&m, 1, 5);
    let (_, b) = tablet(&m, 2, 3);
    let one = cloud.ingest(a[..4].to_vec(), 10);
    // A second tablet uploads an overlapping set of the same changes, plus its own.
    let two = cloud.ingest(a.iter().chain(&b).cloned().collect(), 20);
    let logged: Vec<u64> = one.records.iter().chain(&two.records).map(|r| r.offset).collect();
    assert_eq!(logged, (2..2 + logged.len() as u64).collect::<Vec<_>>(), "offsets continue without gaps");
    assert_eq!(two.duplicates, 4, "what was logged already is counted, not logged again");
    let dots: std::collections::BTreeSet<Dot> =
        one.records.iter().chain(&two.records).filter(|r| r.entry.change.device != cloud.cloud_device()).map(|r| r.entry.change.dot()).collect();
    assert_eq!(dots.len(), a.len() + b.len(), "every change of both tablets, once");
    assert_eq!(cloud.offset(), 1 + logged.len() as u64);
}

#[test]
fn the_cloud_refuses_exactly_what_a_tablet_refuses_and_names_the_reason() {
    let m = TestMarket::new(2);
    let (key, cert) = cloud_of(&m, 100);
    let (mut cloud, _) = MarketIngest::create(m.ctx.clone(), key, cert, 0).unwrap();
    let (_, a) = tablet(&m, 1, 2);
    let mut forged = a[3].clone();
    forged.change = bytes_of(&forged.change, 7);
    let other_market = TestMarket::new(9);
    let (_, stranger) = tablet(&other_market, 1, 0);
    let batch = cloud.ingest(vec![a[0].clone(), a[1].clone(), a[2].clone(), forged.clone(), stranger[0].clone()], 5);
    let reasons: Vec<&str> = batch.rejected.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons, vec!["bad_signature", "wrong_market"]);
    assert_eq!(batch.records.iter().filter(|r| r.entry.change.device == a[0].device).count(), 3, "the good ones are logged");
    assert_eq!(cloud.stats().rejected.get("bad_signature"), Some(&1));
    // A tablet's ledger given the same changes refuses the same ones.
    let (mut peer, _) = m.device(50, "Peer");
    let report = peer.apply_remote(vec![a[0].clone(), a[1].clone(), a[2].clone(), forged, stranger[0].clone()]);
    let labels: Vec<&str> = report.rejected.iter().map(|(_, r)| r.label()).collect();
    assert_eq!(labels, reasons);
}

fn bytes_of(b: &[u8], flip: usize) -> bytes::Bytes {
    let mut v = b.to_vec();
    let i = flip % v.len();
    v[i] ^= 0x40;
    v.into()
}

#[test]
fn a_watermark_is_recorded_at_most_once_per_interval_and_only_for_new_changes() {
    let m = TestMarket::new(3);
    let (key, cert) = cloud_of(&m, 100);
    let (cloud, created) = MarketIngest::create(m.ctx.clone(), key, cert, 0).unwrap();
    let mut cloud = cloud.with_watermark_interval_ms(1_000);
    let (_, a) = tablet(&m, 1, 4);
    let marks = |b: &Batch| b.records.iter().filter(|r| matches!(r.entry.event.body, EventBody::CloudHolds { .. })).count();
    let first = cloud.ingest(a[..3].to_vec(), 100);
    assert_eq!(marks(&first), 1, "the first batch is covered at once");
    let EventBody::CloudHolds { offset, heads } = &first.records.last().unwrap().entry.event.body else { panic!("watermark last") };
    assert_eq!(*offset, 4, "it covers the log before it: enrolment + 3 changes");
    assert_eq!(heads, &vec![(a[0].device, 3)]);
    let second = cloud.ingest(a[3..5].to_vec(), 500);
    assert_eq!(marks(&second), 0, "within the interval");
    assert_eq!(cloud.poll_timeout(), Some(1_100), "the core says when the next one is due");
    assert!(cloud.tick(900).is_none());
    let due = cloud.tick(1_100).expect("due");
    assert_eq!(marks(&due), 1);
    assert_eq!(cloud.poll_timeout(), None, "nothing new to cover");
    assert!(cloud.tick(10_000).is_none());
    // Replicated to a tablet, the watermark is part of its state.
    let (mut peer, _) = m.device(50, "Peer");
    let all: Vec<SignedChange> =
        [&created, &first, &second, &due].iter().flat_map(|b| b.records.iter()).map(|r| r.entry.change.clone()).collect();
    let report = peer.apply_remote(all);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let mark = peer.state().cloud_watermarks.get(&cloud.cloud_device()).expect("watermark held");
    assert_eq!(mark.heads.get(&a[0].device), Some(&5));
}

#[test]
fn a_watermark_lists_only_the_devices_that_grew_and_a_replica_merges_them_into_the_cloud_heads() {
    let m = TestMarket::new(5);
    let (key, cert) = cloud_of(&m, 100);
    let (cloud, created) = MarketIngest::create(m.ctx.clone(), key, cert.clone(), 0).unwrap();
    let mut cloud = cloud.with_watermark_interval_ms(1_000);
    let (_, a) = tablet(&m, 1, 4);
    let (_, b) = tablet(&m, 2, 2);
    let listed = |batch: &Batch| -> Vec<Vec<(DeviceId, u64)>> {
        batch
            .records
            .iter()
            .filter_map(|r| match &r.entry.event.body {
                EventBody::CloudHolds { heads, .. } => Some(heads.clone()),
                _ => None,
            })
            .collect()
    };
    let first = cloud.ingest(a[..5].iter().chain(&b).cloned().collect(), 100);
    let mut both = vec![(a[0].device, 5), (b[0].device, b.len() as u64)];
    both.sort();
    assert_eq!(listed(&first), vec![both], "the first watermark lists every device");
    let second = cloud.ingest(a[5..].to_vec(), 1_200);
    assert_eq!(listed(&second), vec![vec![(a[0].device, a.len() as u64)]], "the next lists only the tablet that grew");
    let mut log: Vec<LogRecord> = [&created, &first, &second].iter().flat_map(|b| b.records.iter().cloned()).collect();
    // A replica merges them: it holds what the cloud holds of both tablets.
    let (mut peer, _) = m.device(50, "Peer");
    assert!(peer.apply_remote(log.iter().map(|r| r.entry.change.clone())).rejected.is_empty());
    let mark = peer.state().cloud_watermarks.get(&cloud.cloud_device()).expect("watermark held");
    assert_eq!(mark.heads.get(&a[0].device), Some(&(a.len() as u64)));
    assert_eq!(mark.heads.get(&b[0].device), Some(&(b.len() as u64)), "kept from the first watermark");
    assert_eq!(mark.offset, cloud.offset() - 1, "offset and time are the latest watermark's");
    // Restored from its log, the cloud lists nothing again; a restart is no reason for a watermark.
    let mut restored = MarketIngest::restore(m.ctx.clone(), cloud_of(&m, 100).0, cert, log.clone()).unwrap().with_watermark_interval_ms(1_000);
    assert!(restored.tick(5_000).is_none_or(|b| listed(&b).is_empty()), "nothing grew since the last watermark");
    let (mut b_ledger, _) = tablet(&m, 2, 2);
    let more = b_ledger.record(sell("SKU-2", 1), 9_000).unwrap().change;
    let third = restored.ingest(vec![more], 9_000);
    assert_eq!(listed(&third), vec![vec![(b[0].device, b.len() as u64 + 1)]]);
    log.extend(third.records);
    assert!(peer.apply_remote(log.iter().map(|r| r.entry.change.clone())).rejected.is_empty());
    let mark = peer.state().cloud_watermarks.get(&cloud.cloud_device()).expect("watermark held");
    assert_eq!(mark.heads.get(&a[0].device), Some(&(a.len() as u64)), "still what the cloud holds of the quiet tablet");
    assert_eq!(mark.heads.get(&b[0].device), Some(&(b.len() as u64 + 1)));
}

#[test]
fn only_a_cloud_device_records_watermarks_and_a_cloud_device_records_nothing_else() {
    let m = TestMarket::new(4);
    let (mut seller, _) = m.device(1, "Test Stall");
    assert!(matches!(
        seller.record(LocalOp::RecordCloudHolds { offset: 1, heads: vec![] }, 5),
        Err(LedgerError::RoleForbids { .. })
    ));
    let (key, cert) = cloud_of(&m, 100);
    let mut own = Ledger::new(m.ctx.clone(), key, cert);
    own.enrol_self(0).unwrap();
    assert!(matches!(own.record(LocalOp::UpsertProduct(product("X", 1)), 5), Err(LedgerError::RoleForbids { .. })));
    assert!(matches!(own.record(LocalOp::Restock { sku: "X".into(), qty: 1 }, 5), Err(LedgerError::RoleForbids { .. })));
}

#[test]
fn a_second_process_catches_up_from_the_shared_log_before_appending() {
    let m = TestMarket::new(5);
    let (key, cert) = cloud_of(&m, 100);
    let (mut a, created) = MarketIngest::create(m.ctx.clone(), key, cert.clone(), 0).unwrap();
    let mut log: Vec<LogRecord> = created.records.clone();
    let mut b = MarketIngest::restore(m.ctx.clone(), m.device_key(100), cert, log.clone()).unwrap();
    let (_, t1) = tablet(&m, 1, 3);
    let (_, t2) = tablet(&m, 2, 3);
    let from_a = a.ingest(t1.clone(), 10);
    log.extend(from_a.records.clone());
    // B holds the row lock next: it first takes in what A appended, then appends after it.
    b.catch_up(log[b.next_offset() as usize - 1..].to_vec()).unwrap();
    let from_b = b.ingest(t1.iter().chain(&t2).cloned().collect(), 20);
    assert_eq!(from_b.records.first().map(|r| r.offset), Some(a.next_offset()), "B continues A's offsets");
    assert_eq!(from_b.duplicates, t1.len() as u64, "what A logged is a duplicate for B too");
    log.extend(from_b.records.clone());
    a.catch_up(log[a.next_offset() as usize - 1..].to_vec()).unwrap();
    assert_eq!(a.heads(), b.heads());
    assert_eq!(a.offset(), b.offset());
    // Both cloud processes sign with one device key; catching up first means neither forks it.
    let w = a.tick(10 * DEFAULT_WATERMARK_INTERVAL_MS).expect("a watermark is due");
    assert!(w.records.iter().all(|r| r.offset > b.offset()));
    log.extend(w.records);
    b.catch_up(log[b.next_offset() as usize - 1..].to_vec()).unwrap();
    assert!(b.ledger().evidence().is_empty(), "no equivocation of the cloud device");
}

#[test]
fn a_restored_log_must_be_gapless() {
    let m = TestMarket::new(6);
    let (key, cert) = cloud_of(&m, 100);
    let (mut a, created) = MarketIngest::create(m.ctx.clone(), key, cert.clone(), 0).unwrap();
    let key = m.device_key(100);
    let (_, t1) = tablet(&m, 1, 1);
    let mut log = created.records;
    log.extend(a.ingest(t1, 5).records);
    log.remove(2);
    assert!(matches!(MarketIngest::restore(m.ctx.clone(), key, cert, log), Err(IngestError::OffsetGap { expected: 3, found: 4 })));
}

fn reply_from(cloud: &mut MarketIngest, body: &[u8], now_ms: u64, cloud_log: &mut MemoryLog) -> CloudReply {
    let mut reply = CloudReply::default();
    match Message::decode(body).unwrap() {
        Message::Heads { heads, .. } => {
            let theirs = heads.into_iter().collect();
            let (changes, more) = cloud.missing_for(&theirs, cloud_log).unwrap();
            reply.changes = changes;
            reply.more = more;
        }
        Message::Changes { changes, .. } => {
            let b = cloud.ingest(changes, now_ms);
            reply.accepted = b.records.len() as u64;
            reply.duplicates = b.duplicates;
            for r in b.records {
                cloud_log.add(r.entry.change);
            }
        }
        other => panic!("not an uplink message: {other:?}"),
    }
    reply.heads = cloud.heads().iter().map(|(d, n)| (*d, *n)).collect();
    reply.offset = cloud.offset();
    reply
}

#[test]
fn one_tablet_uploads_every_devices_journal_in_bounded_batches_and_gets_the_watermark_back() {
    let m = TestMarket::new(7);
    let (key, cert) = cloud_of(&m, 100);
    let (mut cloud, created) = MarketIngest::create(m.ctx.clone(), key, cert, 0).unwrap();
    let mut cloud_log = MemoryLog::default();
    for r in created.records {
        cloud_log.add(r.entry.change);
    }
    // The uploading tablet holds its own journal and another tablet's (replicated over the mesh).
    let (mut me, mine) = tablet(&m, 1, 2_500);
    let (_, theirs) = tablet(&m, 2, 1_000);
    assert!(me.apply_remote(theirs.clone()).rejected.is_empty());
    let mut log = MemoryLog::default();
    for c in mine.iter().chain(&theirs) {
        log.add(c.clone());
    }
    let mut up = Uplink::new(1);
    let mut now = 0;
    let mut uploads = Vec::new();
    for _ in 0..20 {
        let Some(out) = up.poll(now, me.heads_ref(), &log) else { break };
        uploads.push(out.changes);
        let reply = reply_from(&mut cloud, &out.body, now, &mut cloud_log);
        let back = up.on_reply(reply, out.changes, now);
        assert!(me.apply_remote(back).rejected.is_empty());
        now += 1;
    }
    assert_eq!(uploads[0], 0, "the cloud's heads come first");
    assert!(uploads.iter().all(|n| *n <= uplink::UPLOAD_MAX_CHANGES), "bounded batches");
    assert_eq!(uploads.iter().sum::<usize>(), mine.len() + theirs.len(), "both journals, each change once");
    assert_eq!(up.lacking(me.heads_ref()), 0);
    assert_eq!(up.poll(now, me.heads_ref(), &log), None, "nothing to send until the refresh interval");
    // The cloud records its watermark when due; the next heads refresh brings it to the tablet.
    now += uplink::HEADS_REFRESH_MS.max(DEFAULT_WATERMARK_INTERVAL_MS);
    for r in cloud.tick(now).expect("a watermark is due").records {
        cloud_log.add(r.entry.change);
    }
    let out = up.poll(now, me.heads_ref(), &log).expect("the refresh is due");
    let reply = reply_from(&mut cloud, &out.body, now, &mut cloud_log);
    assert!(me.apply_remote(up.on_reply(reply, 0, now)).rejected.is_empty());
    let mark = me.state().cloud_watermarks.get(&cloud.cloud_device()).expect("the watermark came back with a heads reply");
    assert_eq!(mark.heads.get(&mine[0].device), Some(&(mine.len() as u64)), "it covers all this tablet uploaded");
    assert_eq!(mark.heads.get(&theirs[0].device), Some(&(theirs.len() as u64)), "and the other tablet's journal");
}

#[test]
fn failures_back_off_exponentially_with_jitter_up_to_the_ceiling_and_resume_from_the_cloud_heads() {
    let m = TestMarket::new(8);
    let (me, mine) = tablet(&m, 1, 3);
    let mut log = MemoryLog::default();
    for c in &mine {
        log.add(c.clone());
    }
    let mut waits = Vec::new();
    let mut up = Uplink::new(42);
    let mut now = 0;
    for _ in 0..12 {
        let out = up.poll(now, me.heads_ref(), &log).expect("due after its wait");
        assert_eq!(out.changes, 0, "after a failure the uplink asks the cloud's heads again");
        up.on_failure(now, "connection refused".into());
        let at = up.poll_timeout(me.heads_ref()).unwrap();
        assert_eq!(up.poll(at - 1, me.heads_ref(), &log), None, "nothing before the backoff ends");
        waits.push(at - now);
        now = at;
    }
    assert!(waits[0] >= 250 && waits[0] <= 500, "{waits:?}");
    assert!(waits[3] >= 2_000 && waits[3] <= 4_000, "{waits:?}");
    assert!(waits.iter().all(|w| *w <= BACKOFF_MAX_MS), "{waits:?}");
    assert!(waits[11] >= BACKOFF_MAX_MS / 2, "{waits:?}");
    let mut other = Uplink::new(43);
    other.poll(0, me.heads_ref(), &log);
    other.on_failure(0, "x".into());
    let mut again = Uplink::new(42);
    again.poll(0, me.heads_ref(), &log);
    again.on_failure(0, "x".into());
    assert_eq!(again.poll_timeout(me.heads_ref()), Some(waits[0]), "deterministic for a seed");
}

#[test]
fn an_upload_that_moves_none_of_the_cloud_heads_backs_off_growing_instead_of_repeating_at_once() {
    let m = TestMarket::new(10);
    let (me, mine) = tablet(&m, 1, 3);
    let mut log = MemoryLog::default();
    for c in &mine {
        log.add(c.clone());
    }
    let mut up = Uplink::new(5);
    let mut now = 0;
    let out = up.poll(now, me.heads_ref(), &log).unwrap();
    // The cloud holds nothing of this tablet and keeps holding nothing (say every change waits
    // there for one of another device's).
    up.on_reply(CloudReply::default(), out.changes, now);
    let mut waits = Vec::new();
    for _ in 0..4 {
        let out = up.poll(now, me.heads_ref(), &log).expect("an upload is due");
        assert!(out.changes > 0);
        up.on_reply(CloudReply::default(), out.changes, now);
        let at = up.poll_timeout(me.heads_ref()).unwrap();
        assert!(up.poll(at - 1, me.heads_ref(), &log).is_none(), "not before the backoff");
        waits.push(at - now);
        now = at;
    }
    assert!(waits[0] >= uplink::BACKOFF_BASE_MS / 2, "{waits:?}");
    assert!(waits[3] > waits[0], "the wait grows while nothing moves: {waits:?}");
    // Progress resets it: the cloud took the batch.
    let out = up.poll(now, me.heads_ref(), &log).unwrap();
    let heads = me.heads_ref().iter().map(|(d, n)| (*d, *n)).collect();
    up.on_reply(CloudReply { heads, ..Default::default() }, out.changes, now);
    assert_eq!(up.lacking(me.heads_ref()), 0);
}

#[test]
fn a_temporary_refusal_is_offered_again_and_a_lasting_one_is_not() {
    let m = TestMarket::new(11);
    let (me, mine) = tablet(&m, 1, 3);
    let mut log = MemoryLog::default();
    for c in &mine {
        log.add(c.clone());
    }
    let device = mine[0].device;
    let refusal = |reason: &str| RejectedChange { device, seq: 1, reason: reason.into(), message: reason.into() };
    let mut up = Uplink::new(6);
    up.poll(0, me.heads_ref(), &log).unwrap();
    up.on_reply(CloudReply::default(), 0, 0);
    up.poll(0, me.heads_ref(), &log).unwrap();
    up.on_rejected(&[refusal("pending_full")], 0);
    assert!(up.refused().is_empty(), "a full pending buffer passes");
    let at = up.poll_timeout(me.heads_ref()).unwrap();
    up.poll(at, me.heads_ref(), &log).expect("asks the heads again");
    up.on_reply(CloudReply::default(), 0, at);
    assert!(up.poll(at, me.heads_ref(), &log).is_some_and(|o| o.changes > 0), "and offers the journal again");
    up.on_rejected(&[refusal("bad_signature")], at);
    assert_eq!(up.refused().get(&device), Some(&1));
    up.poll(at, me.heads_ref(), &log).unwrap();
    up.on_reply(CloudReply::default(), 0, at);
    assert_eq!(up.lacking(me.heads_ref()), 0, "a forged journal is not offered again");
}

#[test]
fn a_refusal_that_names_no_change_backs_off_instead_of_retrying_at_once() {
    let m = TestMarket::new(12);
    let (me, mine) = tablet(&m, 1, 3);
    let mut log = MemoryLog::default();
    for c in &mine {
        log.add(c.clone());
    }
    let mut up = Uplink::new(7);
    up.poll(0, me.heads_ref(), &log).unwrap();
    up.on_reply(CloudReply::default(), 0, 0);
    up.poll(0, me.heads_ref(), &log).expect("an upload");
    // A 422 whose body did not parse (a proxy's page): the driver passes no refused change.
    up.on_rejected(&[], 0);
    assert_eq!(up.failures(), 1, "counted as a failure");
    assert!(up.poll(0, me.heads_ref(), &log).is_none(), "no request at once");
    let at = up.poll_timeout(me.heads_ref()).unwrap();
    assert!(at >= uplink::BACKOFF_BASE_MS / 2, "waits the backoff: {at}");
    assert!(up.refused().is_empty());
}

#[test]
fn an_ask_for_the_online_channels_units_goes_before_any_upload_merged_per_sku_and_bounded() {
    let m = TestMarket::new(12);
    let (me, mine) = tablet(&m, 1, 3);
    let mut log = MemoryLog::default();
    for c in &mine {
        log.add(c.clone());
    }
    let mut up = Uplink::new(9);
    up.want_rights("SKU-1".into(), 2, false);
    up.want_rights("SKU-1".into(), 6, true);
    let out = up.poll(0, me.heads_ref(), &log).expect("the ask is due at once");
    assert_eq!(Message::decode(&out.body).unwrap(), Message::RightsWanted { sku: "SKU-1".into(), qty: 6, for_sale: true });
    assert_eq!(out.changes, 0);
    assert!(up.poll(0, me.heads_ref(), &log).is_none(), "one request at a time");
    up.on_reply(CloudReply::default(), 0, 0);
    let next = up.poll(0, me.heads_ref(), &log).unwrap();
    assert!(matches!(Message::decode(&next.body).unwrap(), Message::Changes { .. }), "then the usual uploads (the reply said what the cloud holds)");

    for i in 0..uplink::MAX_RIGHTS_ASKS + 3 {
        up.want_rights(format!("SKU-{i:02}"), 1, true);
    }
    assert_eq!(up.stats().rights_asks_dropped, 3, "a full queue replaces asks and counts them");
}

#[test]
fn a_reply_asking_for_more_skus_than_its_limit_is_refused() {
    let wants = |n: usize| CloudReply {
        rights_wanted: (0..n).map(|i| crate::wire::OnlineWants { device: DeviceId([1; 32]), sku: format!("S{i}"), qty: 1 }).collect(),
        ..Default::default()
    };
    assert!(CloudReply::decode(&wants(crate::wire::MAX_RIGHTS_WANTED).encode()).is_ok());
    assert!(matches!(CloudReply::decode(&wants(crate::wire::MAX_RIGHTS_WANTED + 1).encode()), Err(crate::wire::ReplyError::OverLimit("rights_wanted"))));
}

#[test]
fn a_reply_with_nothing_to_ask_is_written_in_version_1_so_the_previous_release_reads_it() {
    let plain = CloudReply { offset: 4, heads: vec![(DeviceId([2; 32]), 7)], accepted: 1, more: true, ..Default::default() };
    let bytes = plain.encode();
    assert_eq!(bytes[0], crate::wire::REPLY_VERSION_1);
    assert_eq!(CloudReply::decode(&bytes).unwrap(), plain);
    let asking = CloudReply { rights_wanted: vec![crate::wire::OnlineWants { device: DeviceId([3; 32]), sku: "TOTE".into(), qty: 6 }], ..plain };
    let bytes = asking.encode();
    assert_eq!(bytes[0], crate::wire::REPLY_VERSION);
    assert_eq!(CloudReply::decode(&bytes).unwrap(), asking);
}
