//! The event queue: events in (virtual time, push order). A market day pops ~150 million events
//! from a queue ~30,000 deep, nearly all of them messages due a few milliseconds ahead, so the queue
//! is a calendar: a ring of one-millisecond buckets covering the next few seconds (a push is an
//! append, a pop takes from the bucket at hand, sorted once when it comes up), with a heap for
//! the rare event beyond the ring. Keys are 24 bytes (time, push number, slot); the events wait in
//! a slab.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// A key: time, push number (unique, so the order is total and the slot never decides), slot.
type Key = (u64, u64, u32);

const _: () = assert!(std::mem::size_of::<Key>() == 24, "a key is three words at most");

/// A bucket spans 2^10 µs: a message (2 ms and more on the simulated Wi-Fi) lands a few buckets
/// ahead, and a bucket holds a handful of events on average (hundreds at a burst, see
/// `BUCKET_KEPT_CAPACITY`).
const BUCKET_SHIFT: u32 = 10;
/// Buckets in the ring: 2^13 of them cover 8.4 s, past a heartbeat round (5 s in the big
/// scenarios), so only arrivals, faults and the like wait in the heap.
const RING_BUCKETS: u64 = 1 << 13;
const _: () = assert!(RING_BUCKETS.is_power_of_two());
/// Capacity a drained bucket keeps. Heartbeats fall into step, so a bucket may hold hundreds of
/// keys for a moment; were every bucket to keep its high-water mark, the ring would hold ~200 MB
/// after half an hour of `stress-1000` and grow all day. Kept: at most 8,192 × 64 × 24 B = 12 MB.
const BUCKET_KEPT_CAPACITY: usize = 64;

pub(super) struct EventQueue<E> {
    /// Bucket `b` (virtual µs >> BUCKET_SHIFT) is at `ring[b % RING_BUCKETS]` while
    /// `current <= b < current + RING_BUCKETS`. The current bucket is sorted latest first once it
    /// comes up (and kept so); the others are in push order.
    ring: Vec<Vec<Key>>,
    /// Keys in the ring.
    in_ring: usize,
    /// The bucket being popped from: every queued event is in it or later.
    current: u64,
    current_sorted: bool,
    /// Events past the ring's horizon.
    later: BinaryHeap<Reverse<Key>>,
    /// Events by slot; `None`: a free slot (listed in `free`).
    slab: Vec<Option<E>>,
    free: Vec<u32>,
    pushed: u64,
}

impl<E> EventQueue<E> {
    pub(super) fn new() -> Self {
        Self {
            ring: (0..RING_BUCKETS).map(|_| Vec::new()).collect(),
            in_ring: 0,
            current: 0,
            current_sorted: false,
            later: BinaryHeap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            pushed: 0,
        }
    }

    /// Queues `ev` at virtual time `t`, after every event already queued at `t`. `t` is never
    /// before the last event popped.
    pub(super) fn push(&mut self, t: u64, ev: E) {
        let slot = match self.free.pop() {
            Some(s) => {
                debug_assert!(self.slab[s as usize].is_none(), "a free slot holds no event");
                self.slab[s as usize] = Some(ev);
                s
            }
            None => {
                let s = u32::try_from(self.slab.len()).expect("fewer than 2^32 events queued at once");
                self.slab.push(Some(ev));
                s
            }
        };
        self.pushed += 1;
        self.insert((t, self.pushed, slot));
    }

    fn insert(&mut self, key: Key) {
        let bucket = key.0 >> BUCKET_SHIFT;
        assert!(bucket >= self.current, "an event is never queued before the current bucket");
        if bucket >= self.current + RING_BUCKETS {
            self.later.push(Reverse(key));
            return;
        }
        let b = &mut self.ring[(bucket % RING_BUCKETS) as usize];
        if bucket == self.current && self.current_sorted {
            // Latest first: the new key goes after (below) every later one.
            let at = b.partition_point(|k| *k > key);
            b.insert(at, key);
        } else {
            b.push(key);
        }
        self.in_ring += 1;
    }

    /// The earliest event (the first pushed among equal times) and its time.
    pub(super) fn pop(&mut self) -> Option<(u64, E)> {
        let (t, _, slot) = self.pop_key()?;
        let ev = self.slab[slot as usize].take().expect("a queued key's slot holds its event");
        self.free.push(slot);
        Some((t, ev))
    }

    fn pop_key(&mut self) -> Option<Key> {
        loop {
            if self.in_ring == 0 {
                // Nothing within the ring: jump to the heap's earliest bucket.
                let Reverse(first) = *self.later.peek()?;
                self.advance_to(first.0 >> BUCKET_SHIFT);
                continue;
            }
            let i = (self.current % RING_BUCKETS) as usize;
            if !self.current_sorted {
                self.ring[i].sort_unstable_by(|a, b| b.cmp(a));
                self.current_sorted = true;
            }
            if let Some(key) = self.ring[i].pop() {
                self.in_ring -= 1;
                debug_assert_eq!(key.0 >> BUCKET_SHIFT, self.current);
                return Some(key);
            }
            self.advance_to(self.current + 1);
        }
    }

    /// Makes `bucket` (empty so far, or the next) current and brings the heap's events that
    /// now fall within the ring into it.
    fn advance_to(&mut self, bucket: u64) {
        debug_assert!(bucket > self.current || self.in_ring == 0);
        let drained = &mut self.ring[(self.current % RING_BUCKETS) as usize];
        debug_assert!(drained.is_empty(), "a bucket is left only when drained");
        if drained.capacity() > BUCKET_KEPT_CAPACITY {
            drained.shrink_to(BUCKET_KEPT_CAPACITY);
        }
        self.current = bucket;
        self.current_sorted = false;
        let horizon = self.current + RING_BUCKETS;
        while let Some(&Reverse(key)) = self.later.peek() {
            if key.0 >> BUCKET_SHIFT >= horizon {
                break;
            }
            self.later.pop();
            self.ring[((key.0 >> BUCKET_SHIFT) % RING_BUCKETS) as usize].push(key);
            self.in_ring += 1;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_ring + self.later.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_pop_in_time_order_and_in_push_order_within_a_time() {
        let mut q = EventQueue::new();
        for (t, name) in [(5, "c"), (1, "a"), (5, "d"), (3, "b"), (1, "a2"), (9, "e")] {
            q.push(t, name);
        }
        let first: Vec<_> = std::iter::from_fn(|| q.pop()).take(3).collect();
        assert_eq!(first, [(1, "a"), (1, "a2"), (3, "b")]);
        // Slots freed by pops are reused; order still holds.
        q.push(5, "d2");
        q.push(2, "early");
        let rest: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(rest, [(2, "early"), (5, "c"), (5, "d"), (5, "d2"), (9, "e")]);
        assert_eq!(q.len(), 0);
        assert!(q.slab.len() <= 6, "slots are reused, the slab does not grow past the most queued at once");
    }

    /// A burst (heartbeats in step) fills a bucket for a moment; the ring does not keep every
    /// bucket's high-water mark for the rest of the day.
    #[test]
    fn a_drained_bucket_gives_back_what_a_burst_took() {
        let mut q = EventQueue::new();
        for round in 0..8u64 {
            let t = round * 5_000_000;
            for i in 0..1_000 {
                q.push(t + 3_000 + i % 7, i);
            }
            while q.pop().is_some() {}
        }
        q.push(100_000_000, 0); // the last burst's bucket is left behind too
        assert_eq!(q.pop(), Some((100_000_000, 0)));
        let kept: usize = q.ring.iter().map(Vec::capacity).sum();
        assert!(kept <= 9 * BUCKET_KEPT_CAPACITY, "the ring keeps room for {kept} keys");
    }

    /// The calendar against the plain order it stands for: pushes near (same bucket, a few
    /// buckets ahead), at the ring's edge and far beyond it, interleaved with pops.
    #[test]
    fn the_calendar_pops_exactly_what_a_sorted_queue_pops() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut q = EventQueue::new();
        let mut reference = std::collections::BTreeSet::new();
        let mut pushed = 0u64;
        let mut now = 0u64;
        let ring_us = RING_BUCKETS << BUCKET_SHIFT;
        for _ in 0..200_000 {
            if rng.gen_bool(0.52) {
                let ahead = match rng.gen_range(0..6) {
                    0 => 0,
                    1 => rng.gen_range(0..1 << BUCKET_SHIFT),
                    2 => rng.gen_range(2_000..20_000),
                    3 => ring_us - rng.gen_range(0..3 << BUCKET_SHIFT),
                    4 => ring_us + rng.gen_range(0..ring_us * 3),
                    _ => rng.gen_range(0..ring_us / 2),
                };
                pushed += 1;
                q.push(now + ahead, pushed);
                reference.insert((now + ahead, pushed));
            } else {
                let want = reference.pop_first();
                let got = q.pop();
                assert_eq!(got, want);
                if let Some((t, _)) = got {
                    now = t;
                }
            }
            assert_eq!(q.len(), reference.len());
        }
        while let Some(want) = reference.pop_first() {
            assert_eq!(q.pop(), Some(want));
        }
        assert_eq!(q.pop(), None);
    }
}
