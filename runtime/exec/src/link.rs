//! Point-to-point transfers between pipeline stages: a stage sends the values the next stage
//! reads (forward activations, backward gradients) to its peer there, the rank at the same
//! tensor- and data-parallel place ([`ferrotron_partitioner::Mesh::peer`]).
//!
//! ```text
//! rank program (stage s, micro-batch m) ─► Link::send(to peer, Tag { transfer, m }, tensor)
//! rank program (stage t)                ─► Link::recv(from peer, Tag { transfer, m }) when a
//!                                           step first reads it
//! ```
//!
//! A send never waits: it leaves the tensor in the receiver's mailbox, tagged with the transfer
//! and the micro-batch, and a receive takes the one it asks for whatever order they arrived in.
//! So no schedule whose steps respect the data dependencies can deadlock, however the stages'
//! steps interleave. Between ranks of one process ([`Mailbox`]) the tensor moves: nothing is
//! copied. Every receive is bounded by a timeout, and an abort wakes every waiting receiver.

use crate::comm::CommError;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which message: the pipeline transfer (its index in the plan's list) of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    /// The transfer's index in [`ferrotron_partitioner::Pipeline::transfers`] (past the end:
    /// a tied parameter's summed gradient).
    pub transfer: u32,
    /// The micro-batch.
    pub micro_batch: u32,
}

/// Point-to-point messages between the ranks of a job, by rank number in the job.
pub trait Link<T>: Send + Sync {
    /// Leaves `t` for rank `to`; never waits for the receiver.
    fn send(&self, from: usize, to: usize, tag: Tag, t: T) -> Result<(), CommError>;
    /// The message `from` sent to `to` with `tag`, waiting for it (bounded by a timeout).
    fn recv(&self, from: usize, to: usize, tag: Tag) -> Result<T, CommError>;
    /// Fails the link: every waiting and later receive returns [`CommError::PeerFailed`].
    fn abort(&self, rank: usize, why: &str);
}

/// The mailboxes of the ranks of one process: messages move from sender to receiver.
#[derive(Debug)]
pub struct Mailbox<T> {
    state: Mutex<Letters<T>>,
    arrived: Condvar,
    timeout: Duration,
}

#[derive(Debug)]
struct Letters<T> {
    waiting: HashMap<(usize, usize, Tag), T>,
    failure: Option<CommError>,
}

impl<T> Mailbox<T> {
    /// Empty mailboxes whose receives wait at most `timeout`.
    pub fn new(timeout: Duration) -> Mailbox<T> {
        Mailbox {
            state: Mutex::new(Letters {
                waiting: HashMap::new(),
                failure: None,
            }),
            arrived: Condvar::new(),
            timeout,
        }
    }

    fn letters(&self) -> std::sync::MutexGuard<'_, Letters<T>> {
        // A rank that panicked while holding the lock left the map consistent (every change is
        // one insert or remove): keep going, so the others see its abort.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Send> Link<T> for Mailbox<T> {
    fn send(&self, from: usize, to: usize, tag: Tag, t: T) -> Result<(), CommError> {
        let mut letters = self.letters();
        if let Some(e) = &letters.failure {
            return Err(e.clone());
        }
        if letters.waiting.insert((from, to, tag), t).is_some() {
            return Err(CommError::Mismatch {
                what: format!("rank {from} sent {tag:?} to rank {to} twice"),
            });
        }
        drop(letters);
        self.arrived.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize, to: usize, tag: Tag) -> Result<T, CommError> {
        let deadline = Instant::now() + self.timeout;
        let mut letters = self.letters();
        loop {
            if let Some(t) = letters.waiting.remove(&(from, to, tag)) {
                return Ok(t);
            }
            if let Some(e) = &letters.failure {
                return Err(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    op: "pipeline receive",
                    waited: self.timeout,
                    missing: vec![from],
                });
            }
            letters = self
                .arrived
                .wait_timeout(letters, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn abort(&self, rank: usize, why: &str) {
        let mut letters = self.letters();
        letters
            .failure
            .get_or_insert_with(|| CommError::PeerFailed {
                rank,
                why: why.to_owned(),
            });
        drop(letters);
        self.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(transfer: u32, micro_batch: u32) -> Tag {
        Tag {
            transfer,
            micro_batch,
        }
    }

    #[test]
    fn messages_arrive_by_tag_in_any_order() {
        let mail = Mailbox::new(Duration::from_secs(5));
        mail.send(0, 1, tag(0, 1), "second").unwrap();
        mail.send(0, 1, tag(0, 0), "first").unwrap();
        assert_eq!(mail.recv(0, 1, tag(0, 0)).unwrap(), "first");
        assert_eq!(mail.recv(0, 1, tag(0, 1)).unwrap(), "second");
        assert!(mail.send(0, 1, tag(2, 0), "a").is_ok());
        assert!(matches!(
            mail.send(0, 1, tag(2, 0), "again"),
            Err(CommError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_receive_waits_for_its_sender_and_an_abort_wakes_it() {
        let mail = Mailbox::<Vec<f32>>::new(Duration::from_secs(30));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| mail.recv(1, 0, tag(3, 2)));
            std::thread::sleep(Duration::from_millis(20));
            mail.send(1, 0, tag(3, 2), vec![1.0]).unwrap();
            assert_eq!(waiter.join().unwrap().unwrap(), vec![1.0]);
            let waiter = s.spawn(|| mail.recv(1, 0, tag(4, 0)));
            std::thread::sleep(Duration::from_millis(20));
            let started = Instant::now();
            mail.abort(1, "stage 1 failed");
            let err = waiter.join().unwrap().unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(err.to_string().contains("stage 1 failed"), "{err}");
        });
        let quick = Mailbox::<u8>::new(Duration::from_millis(10));
        assert!(matches!(
            quick.recv(0, 1, tag(0, 0)),
            Err(CommError::Timeout { .. })
        ));
    }
}
