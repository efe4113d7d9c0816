//! The in-process launcher: a job's ranks as threads of this process, as `ferrotron launch` makes
//! them processes. Each rank gets its own view of the backend ([`Backend::on_rank`]) and one
//! group per mesh axis, formed in process ([`crate::comm::Comm::in_process`]); every rank then
//! runs the same rank program as a process rank would ([`crate::Rank`], [`crate::Trainer`]).
//!
//! ```text
//! ranks(backend, mesh) ─► [Rank; tp × dp × pp] (the stages linked by one Mailbox)
//!   ─► each(ranks or their trainers, f): f on every rank,
//!     each on its own thread, all at once (ranks meet at their collectives) ─► results in order
//! ```

use crate::backend::Backend;
use crate::comm::Comm;
use crate::error::ExecError;
use crate::link::{Link, Mailbox};
use crate::rank::{Groups, Rank};
use ferrotron_partitioner::Mesh;
use std::sync::Arc;
use std::time::Duration;

/// Every rank of `mesh` in this process, computing on `backend`, its groups' waits bounded by
/// `timeout`; in rank order.
pub fn ranks<B: Backend>(backend: &B, mesh: Mesh, timeout: Duration) -> Vec<Rank<B>> {
    let n = mesh.ranks();
    let devices: Vec<B> = (0..n).map(|r| backend.on_rank(r)).collect();
    let mut groups: Vec<[Option<B::Comm>; 2]> = (0..n).map(|_| [None, None]).collect();
    for (slot, axis) in Mesh::AXES.into_iter().enumerate() {
        for first in mesh.coords().filter(|c| c.on(axis) == 0) {
            let members = mesh.group(axis, first);
            let on: Vec<B> = members.iter().map(|&r| devices[r].clone()).collect();
            for (r, comm) in members.into_iter().zip(B::Comm::in_process(&on, timeout)) {
                groups[r][slot] = Some(comm);
            }
        }
    }
    // The stages' mailboxes: a transfer moves its tensor from sender to receiver.
    let link: Option<Arc<dyn Link<B::Tensor>>> =
        (mesh.pp > 1).then(|| Arc::new(Mailbox::new(timeout)) as Arc<dyn Link<B::Tensor>>);
    devices
        .into_iter()
        .zip(groups)
        .enumerate()
        .map(|(r, (backend, [tp, dp]))| Rank {
            mesh,
            coord: mesh.coord(r),
            backend,
            groups: Groups {
                tp: tp.expect("every rank is in one tp group"),
                dp: dp.expect("every rank is in one dp group"),
            },
            link: link.clone(),
            arena: std::sync::Mutex::new(None),
        })
        .collect()
}

/// Runs `f` on every item (a rank, or what a rank owns, such as its trainer) on a thread of its
/// own, all at the same time (a single item on the calling thread), and returns the results in
/// order. When ranks fail, the error
/// returned is the one that started it, not a peer's that stopped because of it.
pub fn each<T: Send, R: Send>(
    items: &mut [T],
    f: impl Fn(&mut T) -> Result<R, ExecError> + Sync,
) -> Result<Vec<R>, ExecError> {
    let f = &f;
    // One rank runs on the calling thread (which may be a worker of the kernels' pool: see
    // the CLI's CPU ranks), a panic reported as a thread's would be.
    if let [item] = items {
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item)))
            .unwrap_or_else(|_| Err(ExecError::Plan("a rank's thread panicked".into())))
            .map(|r| vec![r]);
    }
    let results: Vec<Result<R, ExecError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter_mut()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ExecError::Plan("a rank's thread panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(results.len());
    let mut first_peer_error = None;
    let mut root_error = None;
    for r in results {
        match r {
            Ok(r) => out.push(r),
            Err(e) if e.is_peer_failure() => {
                first_peer_error.get_or_insert(e);
            }
            Err(e) => {
                root_error.get_or_insert(e);
            }
        }
    }
    match root_error.or(first_peer_error) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
