//! One device's journal as a replica holds it: digests of every held change, and the automerge
//! document of its current segment (rebuilt from raw changes on demand); and reading the event of
//! a change on its own ([`decode_change_event`]), for changes that were never applied.

use crate::event::{self, Event};
use crate::{MAX_CHANGE_BYTES, SEGMENT_CHANGES};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ReadDoc, ROOT};
use stallmesh_identity::{ChangeDigest, DeviceId, SignedChange};

pub(crate) struct SegmentDoc {
    pub(crate) doc: Automerge,
    pub(crate) events: Option<ObjId>,
}

/// One device's journal as this replica holds it.
#[derive(Default)]
pub(crate) struct Journal {
    pub(crate) next_seq: u64,
    /// Digest of every held change, by seq: a change at a held position is a duplicate only if it
    /// is this very change.
    pub(crate) digests: Vec<ChangeDigest>,
    /// Raw changes of the current segment, so its document can be rebuilt on demand.
    pub(crate) segment_changes: Vec<bytes::Bytes>,
    /// Boxed: an `Automerge` is kilobytes inline, and a replica keeps a journal for every device
    /// of the market while at most `MAX_OPEN_SEGMENT_DOCS` have a document.
    pub(crate) doc: Option<Box<SegmentDoc>>,
}

// A journal per device of the market, on every replica: keep it small (the simulator holds a
// thousand replicas of a thousand devices).
const _: () = assert!(std::mem::size_of::<Journal>() <= 96);

impl Journal {
    pub(crate) fn segment_index(seq: u64) -> usize {
        (seq % SEGMENT_CHANGES) as usize
    }

    /// The document of the current segment, built from its raw changes if not in memory.
    pub(crate) fn doc(&mut self, actor: &DeviceId) -> Result<&mut SegmentDoc, String> {
        if self.doc.is_none() {
            let mut doc = Automerge::new().with_actor(ActorId::from(&actor.0[..]));
            let changes = self
                .segment_changes
                .iter()
                .map(|b| Change::from_bytes(b.to_vec()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            doc.apply_changes(changes).map_err(|e| e.to_string())?;
            let events = events_list(&doc);
            self.doc = Some(Box::new(SegmentDoc { doc, events }));
        }
        Ok(self.doc.as_deref_mut().expect("just built"))
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.digests.shrink_to_fit();
        self.segment_changes.shrink_to_fit();
    }

    pub(crate) fn advance(&mut self, change: &SignedChange) {
        debug_assert_eq!(change.seq, self.next_seq, "a journal grows one position at a time");
        let change_bytes = change.change.clone();
        push_compact(&mut self.digests, change.digest());
        if Self::segment_index(self.next_seq) == 0 {
            self.segment_changes.clear();
        }
        push_compact(&mut self.segment_changes, change_bytes);
        self.next_seq += 1;
        if Self::segment_index(self.next_seq) == 0 {
            // Segment complete: its document is never written again; free it.
            self.doc = None;
            self.segment_changes.clear();
        }
        debug_assert_eq!(self.digests.len() as u64, self.next_seq, "one digest per held change");
        debug_assert_eq!(self.segment_changes.len(), Self::segment_index(self.next_seq), "the raw changes of the current segment");
    }
}

/// Pushes growing by an eighth (at least one), not by doubling: a replica keeps a journal for
/// every device of the market, most of them take a change or two a day, and doubling (or a
/// minimum of four) would leave each of those mostly empty: room for three spare changes in the
/// 1,000 journals of 1,000 replicas is 190 MB by the end of `stress-1000`'s day. An eighth keeps
/// pushes amortised O(1) for long journals; a short one is reallocated once per change.
fn push_compact<T>(v: &mut Vec<T>, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact((v.len() / 8).max(1));
    }
    v.push(item);
}

/// Most operations replayed from one change when reading it on its own (a 100-line sale takes
/// about 500); a change is at most [`MAX_CHANGE_BYTES`] anyway.
const MAX_STANDALONE_OPS: usize = 20_000;

/// The journal event `change` carries, read from the change alone: every change appends exactly
/// one event, built entirely by its own operations, so the event can be replayed into an empty
/// document without the journal before it. This is how a replica shows what a conflicting change
/// (never applied, its history not held) recorded.
pub fn decode_change_event(change: &SignedChange) -> Result<Event, String> {
    if change.change.len() > MAX_CHANGE_BYTES {
        return Err(format!("change of {} bytes exceeds the limit", change.change.len()));
    }
    // automerge's expansion asserts on inputs it considers impossible, and the bytes are a peer's.
    std::panic::catch_unwind(|| replay_event(change)).unwrap_or_else(|_| Err("the change's operations do not expand".into()))
}

fn replay_event(change: &SignedChange) -> Result<Event, String> {
    use automerge::legacy::{Key, ObjectId, OpId, OpType};
    let am = Change::from_bytes(change.change.to_vec()).map_err(|e| e.to_string())?;
    let expanded = am.decode();
    let ops = &expanded.operations;
    if ops.len() > MAX_STANDALONE_OPS {
        return Err(format!("{} operations, more than an event has", ops.len()));
    }
    let actor = expanded.actor_id.clone();
    let start_op = expanded.start_op.get();
    start_op.checked_add(ops.len() as u64).ok_or("operation counter overflows")?;
    let id_of = |i: usize| ObjectId::Id(OpId(start_op + i as u64, actor.clone()));
    // The event: the map this change inserts into a list it did not create.
    let event_op =
        ops.iter().position(|o| o.insert && matches!(o.action, OpType::Make(ObjType::Map))).ok_or("the change inserts no journal event")?;
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let am_err = |e: automerge::AutomergeError| e.to_string();
    let list = tx.put_object(ROOT, "events", ObjType::List).map_err(am_err)?;
    let map = tx.insert_object(&list, 0, ObjType::Map).map_err(am_err)?;
    // (object in the change, its copy here): each object is made before what it contains.
    let mut work = vec![(id_of(event_op), map)];
    // Each object is replayed once: a crafted change whose objects contain each other is refused,
    // not walked forever.
    let mut replayed = std::collections::HashSet::new();
    while let Some((src, dst)) = work.pop() {
        if !replayed.insert(src.clone()) || replayed.len() > ops.len() {
            return Err("the change's objects contain each other".into());
        }
        let mut index = 0;
        for (i, op) in ops.iter().enumerate().filter(|(_, o)| o.obj == src) {
            let made = match (&op.key, &op.action) {
                (Key::Map(k), OpType::Put(v)) => tx.put(&dst, k.as_str(), v.clone()).map(|_| None),
                (Key::Map(k), OpType::Make(t)) => tx.put_object(&dst, k.as_str(), *t).map(Some),
                (Key::Seq(_), OpType::Put(v)) if op.insert => tx.insert(&dst, index, v.clone()).map(|_| None),
                (Key::Seq(_), OpType::Make(t)) if op.insert => tx.insert_object(&dst, index, *t).map(Some),
                _ => return Err("the change does more than append one event".into()),
            }
            .map_err(am_err)?;
            if matches!(op.key, Key::Seq(_)) {
                index += 1;
            }
            if let Some(child) = made {
                work.push((id_of(i), child));
            }
        }
    }
    tx.commit();
    event::read_event(&doc, &list, 0).map_err(|e| e.to_string())
}

pub(crate) fn events_list(doc: &Automerge) -> Option<ObjId> {
    match doc.get(ROOT, "events") {
        Ok(Some((automerge::Value::Object(ObjType::List), id))) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::push_compact;

    #[test]
    fn a_short_journal_grows_one_change_at_a_time_and_a_long_one_by_an_eighth() {
        let mut v: Vec<u64> = Vec::new();
        for n in 1..=8u64 {
            push_compact(&mut v, n);
            assert_eq!(v.capacity(), v.len(), "no spare room in a journal of {n}");
        }
        let mut grown = 0;
        for n in 9..=10_000u64 {
            let before = v.capacity();
            push_compact(&mut v, n);
            grown += usize::from(v.capacity() != before);
            assert!(v.capacity() <= v.len() + v.len() / 8, "at most an eighth spare at {n}");
        }
        assert!(grown < 80, "amortised: {grown} reallocations over 10,000 pushes");
    }
}
