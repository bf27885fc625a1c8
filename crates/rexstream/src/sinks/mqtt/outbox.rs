//! The MQTT outbox: a bounded FIFO of serialized documents that keeps each one until the broker
//! has acknowledged it.
//!
//! In: documents pushed by the detector worker thread ([`Outbox::push`], under a mutex, O(1)).
//! Out: documents taken in order by the MQTT loop ([`Outbox::next_unsent`]), removed only by
//! [`Outbox::ack`] (PUBACK for QoS 1). On a lost connection [`Outbox::unsend_all`] puts every
//! sent-but-unacknowledged document back in line, oldest first, so after reconnect the broker
//! gets them again in the original order: nothing produced during an outage is lost, and the
//! only cost is a possible duplicate of a document whose PUBACK was lost (QoS 1 is
//! at-least-once; consumers deduplicate on `event_id`).
//!
//! Invariant: entries are in push order; the first `n_sent` of them have been handed to the
//! client and await an acknowledgement, the rest wait. Acks may arrive out of order (brokers are
//! allowed to), so `ack` removes from anywhere, which keeps the sent entries a prefix.
//!
//! Pure data structure, no I/O: unit-tested below.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::time::Instant;

use serde::Deserialize;

/// What to do with a document when the outbox is full (the broker has been away long enough to
/// fill `outbox_capacity`). Either way a gap appears and is counted in
/// `rexstream_mqtt_outbox_dropped_total` and logged; the policy says which end of the outage is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Drop the oldest document that has not been sent yet, keep the new one: after a long
    /// outage consumers get the most recent state (the default, like the latest-frame slot).
    #[default]
    DropOldest,
    /// Refuse the new document: consumers get the beginning of the outage without holes.
    DropNewest,
}

/// One queued document. `T` is the caller's tag (the stream's metric handles in the sink, a
/// plain number in tests).
#[derive(Debug)]
pub struct Entry<T> {
    /// Outbox-local id, increasing in push order; the MQTT loop maps packet ids to it.
    pub id: u64,
    pub topic: String,
    pub payload: Vec<u8>,
    /// Publish with the MQTT retain flag (counts, snapshots); documents and events are not.
    pub retain: bool,
    pub tag: T,
    /// When it was pushed: `publish` stage latency is measured from here to the acknowledgement.
    pub enqueued: Instant,
}

/// Result of [`Outbox::push`].
#[derive(Debug)]
pub enum Pushed<T> {
    Queued,
    /// The outbox was full; this entry was dropped to make room (policy `drop_oldest`).
    DroppedOldest(Entry<T>),
    /// The outbox was full; the new entry was refused (policy `drop_newest`).
    Refused(Entry<T>),
}

#[derive(Debug)]
pub struct Outbox<T> {
    entries: VecDeque<Entry<T>>,
    n_sent: usize,
    next_id: u64,
    capacity: usize,
    policy: OverflowPolicy,
}

impl<T> Outbox<T> {
    pub fn new(capacity: NonZeroUsize, policy: OverflowPolicy) -> Self {
        Self {
            entries: VecDeque::new(),
            n_sent: 0,
            next_id: 0,
            capacity: capacity.get(),
            policy,
        }
    }

    /// Queue a document behind everything already queued.
    pub fn push(&mut self, topic: String, payload: Vec<u8>, tag: T) -> Pushed<T> {
        self.push_message(topic, payload, false, tag)
    }

    /// Queue any message (retained or not) behind everything already queued: events, counts and
    /// snapshots share the line with documents, so their relative order survives outages.
    pub fn push_message(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        tag: T,
    ) -> Pushed<T> {
        let entry = Entry {
            id: self.next_id,
            topic,
            payload,
            retain,
            tag,
            enqueued: Instant::now(),
        };
        self.next_id += 1;
        if self.entries.len() < self.capacity {
            self.entries.push_back(entry);
            return Pushed::Queued;
        }
        match self.policy {
            OverflowPolicy::DropNewest => Pushed::Refused(entry),
            OverflowPolicy::DropOldest => {
                // Prefer the oldest entry not yet sent: a sent one may already be delivered and
                // its acknowledgement on the way. Only when everything is in flight (capacity ≤
                // window) drop the oldest sent one.
                let victim = if self.n_sent < self.entries.len() {
                    self.entries.remove(self.n_sent)
                } else {
                    self.n_sent -= 1;
                    self.entries.pop_front()
                };
                self.entries.push_back(entry);
                match victim {
                    Some(v) => Pushed::DroppedOldest(v),
                    None => Pushed::Queued,
                }
            }
        }
    }

    /// The oldest document not handed to the client yet; marks it sent.
    pub fn next_unsent(&mut self) -> Option<&Entry<T>> {
        let e = self.entries.get(self.n_sent)?;
        self.n_sent += 1;
        Some(e)
    }

    /// The broker acknowledged `id`: remove it. `None` if it is not here (dropped by overflow
    /// meanwhile, or a duplicate acknowledgement).
    pub fn ack(&mut self, id: u64) -> Option<Entry<T>> {
        let idx = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        if idx < self.n_sent {
            self.n_sent -= 1;
        } else {
            // An ack for an entry we consider unsent: it was sent before a reconnect and acked
            // late. It is delivered; drop it from the line all the same.
        }
        self.entries.remove(idx)
    }

    /// The connection was lost: everything sent but unacknowledged goes back in line, in order.
    /// Returns how many.
    pub fn unsend_all(&mut self) -> usize {
        std::mem::take(&mut self.n_sent)
    }

    /// Documents in the outbox (queued + in flight).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Documents sent and awaiting an acknowledgement.
    pub fn in_flight(&self) -> usize {
        self.n_sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(cap: usize, policy: OverflowPolicy) -> Outbox<u32> {
        Outbox::new(NonZeroUsize::new(cap).expect("cap > 0"), policy)
    }

    fn push(o: &mut Outbox<u32>, n: u32) -> Pushed<u32> {
        o.push(format!("t/{n}"), n.to_le_bytes().to_vec(), n)
    }

    fn take(o: &mut Outbox<u32>) -> Option<(u64, u32)> {
        o.next_unsent().map(|e| (e.id, e.tag))
    }

    #[test]
    fn delivers_in_order_and_removes_on_ack() {
        let mut o = outbox(10, OverflowPolicy::DropOldest);
        for n in 0..5 {
            assert!(matches!(push(&mut o, n), Pushed::Queued));
        }
        let sent: Vec<_> = std::iter::from_fn(|| take(&mut o)).collect();
        assert_eq!(
            sent.iter().map(|s| s.1).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert_eq!(o.in_flight(), 5);
        // Out-of-order acks are allowed.
        assert_eq!(o.ack(sent[2].0).map(|e| e.tag), Some(2));
        assert_eq!(o.ack(sent[0].0).map(|e| e.tag), Some(0));
        assert!(o.ack(sent[0].0).is_none(), "duplicate ack");
        assert_eq!(o.len(), 3);
        assert_eq!(o.in_flight(), 3);
    }

    #[test]
    fn reconnect_resends_unacked_in_order() {
        let mut o = outbox(10, OverflowPolicy::DropOldest);
        for n in 0..6 {
            push(&mut o, n);
        }
        let a = take(&mut o).expect("0");
        let _b = take(&mut o).expect("1");
        let _c = take(&mut o).expect("2");
        o.ack(a.0);
        // Connection lost with 1 and 2 unacknowledged.
        assert_eq!(o.unsend_all(), 2);
        let again: Vec<u32> = std::iter::from_fn(|| take(&mut o)).map(|s| s.1).collect();
        assert_eq!(again, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn overflow_drop_oldest_keeps_newest_and_spares_in_flight() {
        let mut o = outbox(3, OverflowPolicy::DropOldest);
        for n in 0..3 {
            push(&mut o, n);
        }
        let first = take(&mut o).expect("0 in flight");
        // Full: 0 (in flight), 1, 2. Pushing 3 drops 1, the oldest not yet sent.
        match push(&mut o, 3) {
            Pushed::DroppedOldest(e) => assert_eq!(e.tag, 1),
            other => panic!("expected a drop, got {other:?}"),
        }
        match push(&mut o, 4) {
            Pushed::DroppedOldest(e) => assert_eq!(e.tag, 2),
            other => panic!("expected a drop, got {other:?}"),
        }
        assert_eq!(o.ack(first.0).map(|e| e.tag), Some(0));
        let rest: Vec<u32> = std::iter::from_fn(|| take(&mut o)).map(|s| s.1).collect();
        assert_eq!(rest, vec![3, 4]);
    }

    #[test]
    fn overflow_drop_oldest_when_all_in_flight() {
        let mut o = outbox(2, OverflowPolicy::DropOldest);
        push(&mut o, 0);
        push(&mut o, 1);
        take(&mut o);
        take(&mut o);
        match push(&mut o, 2) {
            Pushed::DroppedOldest(e) => assert_eq!(e.tag, 0),
            other => panic!("expected a drop, got {other:?}"),
        }
        assert_eq!(o.in_flight(), 1);
        assert_eq!(take(&mut o).map(|s| s.1), Some(2));
    }

    #[test]
    fn overflow_drop_newest_refuses() {
        let mut o = outbox(2, OverflowPolicy::DropNewest);
        push(&mut o, 0);
        push(&mut o, 1);
        match push(&mut o, 2) {
            Pushed::Refused(e) => assert_eq!(e.tag, 2),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let all: Vec<u32> = std::iter::from_fn(|| take(&mut o)).map(|s| s.1).collect();
        assert_eq!(all, vec![0, 1]);
    }
}
