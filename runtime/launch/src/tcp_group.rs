//! [`TcpGroup`]: the host collectives of ranks that are processes (one per rank under
//! `ferrotron launch`) rather than threads: the CPU backend's communicator there. Same
//! operations ([`HostCollectives`]), same results, same failure rules as the in-process
//! [`ThreadGroup`](ferrotron_exec::ThreadGroup).
//!
//! # Set-up
//!
//! [`TcpGroup::connect`] meets the other members through the [`Store`]: each member listens on
//! a free port of the interface that reaches the store, publishes `ip:port` under
//! `group/<name>/addr/<rank>`, dials every lower rank and accepts every higher one. The result is
//! a full mesh, one socket per pair of members; the data never passes through the store.
//!
//! # Collectives
//!
//! The algorithm is the in-process group's, so results match it bit for bit: member `r` owns
//! chunk `r` of the buffer (the same nearly equal split), receives that chunk from every member,
//! reduces it **in rank order** (rank 0's, then + rank 1's, …), and sends the result to everyone.
//! Each member thus sends and receives about `2n` elements per all-reduce whatever the group
//! size. Every message starts with a header (collective number, kind, reduction, length, phase),
//! so members that call different collectives get [`CommError::Mismatch`], not garbage. Sends go
//! through one writer thread per peer, so a member never blocks on a full socket while a peer
//! blocks on one too.
//!
//! # Failure
//!
//! Every wait is bounded: a peer that sends nothing for the group's timeout fails the group with
//! [`CommError::Timeout`]. A member that fails (its timeout, a mismatch, [`HostCollectives::abort`])
//! writes why under `group/<name>/failure` and shuts its sockets, so every peer blocked on it
//! wakes at once and reports the same error; a peer whose process died is a lost connection
//! ([`CommError::PeerFailed`] naming it). While it waits, a member also polls the job's failure
//! record in the store (a few times a second), so a rank dying elsewhere in the job — in another
//! group, on another node — stops it too: then the error is `PeerFailed` with the failed *global*
//! rank of the job. A group that failed stays failed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};
use ferrotron_exec::comm::{
    chunk, reduce_scatter_problem, Call, CommError, HostCollectives, ReduceOp,
};

/// Hello and message magic.
const HELLO: &[u8; 4] = b"FTGH";
const MAGIC: u32 = u32::from_le_bytes(*b"FTGM");
/// How long one socket read blocks before the waiter checks aborts, timeouts and the store.
const READ_SLICE: Duration = Duration::from_millis(50);
/// How often a waiting member polls the job's failure record.
const STORE_POLL: Duration = Duration::from_millis(200);
const HEADER: usize = 32;

const OPS: [&str; 3] = ["all_reduce", "all_gather", "reduce_scatter"];

fn op_code(op: &str) -> u8 {
    OPS.iter().position(|o| *o == op).unwrap_or(OPS.len()) as u8
}

fn reduce_code(r: Option<ReduceOp>) -> u8 {
    match r {
        None => 0,
        Some(ReduceOp::Sum) => 1,
        Some(ReduceOp::Max) => 2,
    }
}

/// A message's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    op: u8,
    reduce: u8,
    phase: u8,
    len: u64,
    /// Elements that follow.
    count: u64,
}

impl Header {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&[self.op, self.reduce, self.phase, 0]);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
    }

    fn decode(b: &[u8; HEADER]) -> Option<Header> {
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == MAGIC).then(|| Header {
            seq: u64_at(4),
            op: b[12],
            reduce: b[13],
            phase: b[14],
            len: u64_at(16),
            count: u64_at(24),
        })
    }

    fn describe(&self) -> String {
        let op = OPS
            .get(self.op as usize)
            .copied()
            .unwrap_or("an unknown collective");
        let reduce = match self.reduce {
            1 => "(Sum)",
            2 => "(Max)",
            _ => "",
        };
        format!("{op}{reduce} of {} elements", self.len)
    }
}

/// A group failure as written to the store (`kind`, then its fields, one per line), so that
/// peers report the originator's error rather than "connection lost".
pub(crate) fn encode_failure(err: &CommError) -> String {
    match err {
        CommError::PeerFailed { rank, why } => format!("peer\n{rank}\n{why}"),
        CommError::Timeout {
            op,
            waited,
            missing,
        } => format!(
            "timeout\n{op}\n{}\n{}",
            waited.as_millis(),
            missing
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        CommError::Mismatch { what } => format!("mismatch\n{what}"),
    }
}

/// What a pipeline link's receive that times out names as the operation (failure records of
/// groups and links are read by the same decoder).
pub(crate) const RECEIVE: &str = "pipeline receive";

pub(crate) fn decode_failure(s: &str) -> Option<CommError> {
    let mut parts = s.splitn(3, '\n');
    match parts.next()? {
        "peer" => Some(CommError::PeerFailed {
            rank: parts.next()?.parse().ok()?,
            why: parts.next().unwrap_or("").to_string(),
        }),
        "timeout" => {
            let op = parts.next()?;
            let op = OPS
                .iter()
                .chain(&[RECEIVE])
                .find(|o| **o == op)
                .copied()
                .unwrap_or("collective");
            let mut rest = parts.next()?.split('\n');
            let waited = Duration::from_millis(rest.next()?.parse().ok()?);
            let missing = rest
                .next()
                .unwrap_or("")
                .split(',')
                .filter_map(|m| m.parse().ok())
                .collect();
            Some(CommError::Timeout {
                op,
                waited,
                missing,
            })
        }
        "mismatch" => Some(CommError::Mismatch {
            what: parts.next().unwrap_or("").to_string(),
        }),
        _ => None,
    }
}

/// The sending side of one peer's socket.
struct Link {
    /// Messages for the writer thread; `None` once dropped.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    /// A handle on the socket, to shut it down.
    stream: TcpStream,
}

/// The receiving side, used by one collective at a time.
struct Io {
    /// Collectives started.
    seq: u64,
    /// By peer rank; `None` at our own.
    readers: Vec<Option<TcpStream>>,
    bytes: Vec<u8>,
    floats: Vec<f32>,
}

/// A communicator group whose members are processes (or threads) connected by TCP; see the
/// module docs. Operations take the caller's rank, as every [`HostCollectives`] does; here it
/// must be the rank given to [`TcpGroup::connect`].
pub struct TcpGroup {
    inner: Box<Inner>,
}

/// The group's state.
struct Inner {
    name: String,
    rank: usize,
    size: usize,
    timeout: Duration,
    links: Vec<Option<Link>>,
    io: Mutex<Io>,
    failure: Mutex<Option<CommError>>,
    /// A connection of our own, for the failure records (`None` for a group of one).
    store: Option<Store>,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.inner;
        f.debug_struct("TcpGroup")
            .field("name", &g.name)
            .field("rank", &g.rank)
            .field("size", &g.size)
            .field("timeout", &g.timeout)
            .finish_non_exhaustive()
    }
}

impl TcpGroup {
    /// Joins group `name` as member `rank` of `size`: every member calls this with the same
    /// name and size (concurrently: it returns once this member is connected to all others).
    /// `timeout` bounds the set-up and, afterwards, every wait in a collective. Names must be
    /// unique within a job (within one store): `"tp/dp0"`, `"dp/tp1"`, ….
    pub fn connect(
        store: &Store,
        name: &str,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<TcpGroup, StoreError> {
        let group_err = |what: String| StoreError::Group {
            group: name.to_string(),
            what,
        };
        if size == 0 || rank >= size {
            return Err(group_err(format!("rank {rank} of a group of {size}")));
        }
        let (readers, own_store) = connect_all(store, name, rank, size, timeout)?;
        let mut links = Vec::with_capacity(size);
        for (peer, reader) in readers.iter().enumerate() {
            let Some(reader) = reader else {
                links.push(None);
                continue;
            };
            let setup = |e: io::Error| group_err(format!("socket to rank {peer}: {e}"));
            reader.set_nodelay(true).map_err(setup)?;
            reader.set_read_timeout(Some(READ_SLICE)).map_err(setup)?;
            // Writes are bounded too: a peer that stops reading fails us within `timeout`.
            reader.set_write_timeout(Some(timeout)).map_err(setup)?;
            let stream = reader.try_clone().map_err(setup)?;
            let (tx, writer) = spawn_writer(
                reader.try_clone().map_err(setup)?,
                format!("{name}-{rank}->{peer}"),
            )
            .map_err(setup)?;
            links.push(Some(Link {
                tx: Some(tx),
                writer: Some(writer),
                stream,
            }));
        }
        Ok(TcpGroup {
            inner: Box::new(Inner {
                name: name.to_string(),
                rank,
                size,
                timeout,
                links,
                io: Mutex::new(Io {
                    seq: 0,
                    readers,
                    bytes: Vec::new(),
                    floats: Vec::new(),
                }),
                failure: Mutex::new(None),
                store: own_store,
            }),
        })
    }

    /// Number of members.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.inner.rank
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
}

/// The same collectives as the in-process [`ThreadGroup`](ferrotron_exec::ThreadGroup), with
/// the same algorithm: results are bit-identical on every member and to it.
impl HostCollectives for TcpGroup {
    fn size(&self) -> usize {
        self.inner.size
    }

    fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        self.inner.all_reduce(rank, buf, op)
    }

    fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.inner.all_gather(rank, local, out)
    }

    fn reduce_scatter(&self, rank: usize, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        self.inner.reduce_scatter(rank, input, out)
    }

    /// Every member waiting in, or later entering, a collective returns `PeerFailed { rank,
    /// why }` promptly (its sockets to us close at once), and so does this one afterwards. May
    /// be called from any thread, also while this member is in a collective.
    fn abort(&self, rank: usize, why: &str) {
        self.inner.fail(CommError::PeerFailed {
            rank,
            why: why.to_string(),
        });
    }
}

impl Inner {
    /// Owners' chunks out, reduce ours in rank order, results out, others' results in.
    fn all_reduce(&self, rank: usize, buf: &mut [f32], op: ReduceOp) -> Result<(), CommError> {
        let call = Call {
            op: "all_reduce",
            reduce: Some(op),
            len: buf.len(),
        };
        let mut io = self.begin(rank, call, None)?;
        if self.size == 1 {
            return Ok(());
        }
        let n = buf.len();
        let seq = io.seq;
        for owner in self.peers() {
            self.send(owner, seq, call, 0, &buf[chunk(n, self.size, owner)]);
        }
        let own = chunk(n, self.size, rank);
        let reduced = self.reduce_own(&mut io, call, own.clone(), buf)?;
        buf[own.clone()].copy_from_slice(&reduced);
        for peer in self.peers() {
            self.send(peer, seq, call, 1, &buf[own.clone()]);
        }
        for owner in self.peers() {
            let c = chunk(n, self.size, owner);
            self.recv(&mut io, owner, call, 1, &mut buf[c])?;
        }
        Ok(())
    }

    /// Ours out to everyone, everyone's in.
    fn all_gather(&self, rank: usize, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let call = Call {
            op: "all_gather",
            reduce: None,
            len: local.len(),
        };
        let want = local.len() * self.size;
        let problem =
            (out.len() != want).then(|| format!("output has {} elements, not {want}", out.len()));
        let mut io = self.begin(rank, call, problem)?;
        let l = local.len();
        out[rank * l..(rank + 1) * l].copy_from_slice(local);
        if self.size == 1 {
            return Ok(());
        }
        let seq = io.seq;
        for peer in self.peers() {
            self.send(peer, seq, call, 0, local);
        }
        for peer in self.peers() {
            self.recv(&mut io, peer, call, 0, &mut out[peer * l..(peer + 1) * l])?;
        }
        Ok(())
    }

    /// Owners' chunks out, reduce ours in rank order.
    fn reduce_scatter(&self, rank: usize, input: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let call = Call {
            op: "reduce_scatter",
            reduce: Some(ReduceOp::Sum),
            len: input.len(),
        };
        let problem = reduce_scatter_problem(input.len(), out.len(), self.size);
        let mut io = self.begin(rank, call, problem)?;
        if self.size == 1 {
            out.copy_from_slice(input);
            return Ok(());
        }
        let n = input.len();
        let seq = io.seq;
        for owner in self.peers() {
            self.send(owner, seq, call, 0, &input[chunk(n, self.size, owner)]);
        }
        let reduced = self.reduce_own(&mut io, call, chunk(n, self.size, rank), input)?;
        out.copy_from_slice(&reduced);
        Ok(())
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.size).filter(move |&p| p != self.rank)
    }

    fn failed(&self) -> Option<CommError> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Originates a failure: records it (the first stands), tells the peers why through the
    /// store, then closes every socket so they wake. Returns the failure that stands.
    fn fail(&self, err: CommError) -> CommError {
        let (err, first) = {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            let first = f.is_none();
            (f.get_or_insert(err).clone(), first)
        };
        if first {
            if let Some(store) = &self.store {
                // Before closing the sockets, so a peer that sees them close finds the reason.
                let _ =
                    store.set_if_absent(&failure_key(&self.name), encode_failure(&err).as_bytes());
            }
            self.close_all();
        }
        err
    }

    /// A failure we learned of (a lost peer, the job's record): recorded and the sockets closed
    /// so that it spreads, but the store's group record is left to the originator.
    fn fail_quietly(&self, err: CommError) -> CommError {
        let (err, first) = {
            let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            let first = f.is_none();
            (f.get_or_insert(err).clone(), first)
        };
        if first {
            self.close_all();
        }
        err
    }

    fn close_all(&self) {
        for link in self.links.iter().flatten() {
            let _ = link.stream.shutdown(Shutdown::Both);
        }
    }

    /// The connection to `peer` broke: find out why (the originator's record, else the job's),
    /// and fail.
    fn lost(&self, peer: usize, detail: &str) -> CommError {
        if let Some(err) = self.failed() {
            return err;
        }
        let store = self.store.as_ref();
        let recorded = store
            .and_then(|s| s.try_get(&failure_key(&self.name)).ok().flatten())
            .and_then(|v| decode_failure(&String::from_utf8_lossy(&v)));
        let err = recorded.unwrap_or_else(|| {
            let why = match store.and_then(|s| s.failure().ok().flatten()) {
                Some(f) => format!("lost the connection to rank {peer}: {f}"),
                None => format!("lost the connection to rank {peer} ({detail})"),
            };
            CommError::PeerFailed { rank: peer, why }
        });
        self.fail_quietly(err)
    }

    /// Checks what this member can check alone, then takes the receiving side for one
    /// collective and numbers it.
    fn begin(
        &self,
        rank: usize,
        call: Call,
        problem: Option<String>,
    ) -> Result<MutexGuard<'_, Io>, CommError> {
        if let Some(err) = self.failed() {
            return Err(err);
        }
        let what = if rank != self.rank {
            Some(format!(
                "rank {rank} called {call} on member {} of group `{}`",
                self.rank, self.name
            ))
        } else {
            problem.map(|p| format!("rank {rank} called {call}: {p}"))
        };
        if let Some(what) = what {
            return Err(self.fail(CommError::Mismatch { what }));
        }
        let mut io = match self.io.try_lock() {
            Ok(io) => io,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                return Err(self.fail(CommError::Mismatch {
                    what: format!(
                        "rank {rank} called {call} while in another collective of group `{}`",
                        self.name
                    ),
                }))
            }
        };
        io.seq += 1;
        Ok(io)
    }

    /// Queues a message for `peer` (its writer thread sends it).
    fn send(&self, peer: usize, seq: u64, call: Call, phase: u8, data: &[f32]) {
        let header = Header {
            seq,
            op: op_code(call.op),
            reduce: reduce_code(call.reduce),
            phase,
            len: call.len as u64,
            count: data.len() as u64,
        };
        let mut msg = Vec::with_capacity(HEADER + 4 * data.len());
        header.encode(&mut msg);
        for x in data {
            msg.extend_from_slice(&x.to_le_bytes());
        }
        if let Some(tx) = self.links[peer].as_ref().and_then(|l| l.tx.as_ref()) {
            // A writer that stopped has closed the socket: the next receive says why.
            let _ = tx.send(msg);
        }
    }

    /// Sums (or maxes) chunk `own` over every member's contribution, in rank order; ours is
    /// `mine[own]`.
    fn reduce_own(
        &self,
        io: &mut Io,
        call: Call,
        own: Range<usize>,
        mine: &[f32],
    ) -> Result<Vec<f32>, CommError> {
        let mut acc = vec![0.0f32; own.len()];
        let mut incoming = std::mem::take(&mut io.floats);
        incoming.resize(own.len(), 0.0);
        for m in 0..self.size {
            let src: &[f32] = if m == self.rank {
                &mine[own.clone()]
            } else {
                if let Err(e) = self.recv(io, m, call, 0, &mut incoming) {
                    io.floats = incoming;
                    return Err(e);
                }
                &incoming
            };
            if m == 0 {
                acc.copy_from_slice(src);
                continue;
            }
            match call.reduce {
                Some(ReduceOp::Max) => acc.iter_mut().zip(src).for_each(|(a, b)| *a = a.max(*b)),
                _ => acc.iter_mut().zip(src).for_each(|(a, b)| *a += *b),
            }
        }
        io.floats = incoming;
        Ok(acc)
    }

    /// Receives `peer`'s message for phase `phase` of `call` into `dst`, checking its header.
    fn recv(
        &self,
        io: &mut Io,
        peer: usize,
        call: Call,
        phase: u8,
        dst: &mut [f32],
    ) -> Result<(), CommError> {
        let Io {
            seq,
            readers,
            bytes,
            ..
        } = io;
        let Some(stream) = readers[peer].as_mut() else {
            return Err(self.lost(peer, "no connection"));
        };
        let mut raw = [0u8; HEADER];
        self.read_watched(stream, peer, call.op, &mut raw)?;
        let want = Header {
            seq: *seq,
            op: op_code(call.op),
            reduce: reduce_code(call.reduce),
            phase,
            len: call.len as u64,
            count: dst.len() as u64,
        };
        let what = match Header::decode(&raw) {
            None => Some(format!("rank {peer} sent garbage to rank {}", self.rank)),
            Some(h) if h.seq != want.seq => Some(format!(
                "rank {} is at collective #{} ({call}) but rank {peer} at #{} ({})",
                self.rank,
                want.seq,
                h.seq,
                h.describe()
            )),
            Some(h) if h != want => Some(format!(
                "rank {} called {call} but rank {peer} called {}",
                self.rank,
                h.describe()
            )),
            Some(_) => None,
        };
        if let Some(what) = what {
            return Err(self.fail(CommError::Mismatch { what }));
        }
        bytes.resize(4 * dst.len(), 0);
        self.read_watched(stream, peer, call.op, bytes)?;
        for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
            *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Fills `buf` from `peer`'s socket, waking every [`READ_SLICE`] to check for an abort, the
    /// timeout (no progress for the group's timeout) and, every [`STORE_POLL`], the job's
    /// failure record.
    fn read_watched(
        &self,
        stream: &mut TcpStream,
        peer: usize,
        op: &'static str,
        buf: &mut [u8],
    ) -> Result<(), CommError> {
        let mut filled = 0;
        let mut progress = Instant::now();
        let mut polled = Instant::now();
        while filled < buf.len() {
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(self.lost(peer, "it closed the connection")),
                Ok(n) => {
                    filled += n;
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(err) = self.failed() {
                        return Err(err);
                    }
                    let now = Instant::now();
                    if now - progress >= self.timeout {
                        return Err(self.fail(CommError::Timeout {
                            op,
                            waited: now - progress,
                            missing: vec![peer],
                        }));
                    }
                    if now - polled >= STORE_POLL {
                        polled = now;
                        let job = self.store.as_ref().map(|s| s.failure());
                        match job {
                            Some(Ok(Some(f))) => {
                                return Err(self.fail_quietly(CommError::PeerFailed {
                                    rank: f.rank.unwrap_or(peer),
                                    why: format!("the job failed: {f}"),
                                }))
                            }
                            Some(Err(e)) => {
                                return Err(self.fail_quietly(CommError::PeerFailed {
                                    rank: peer,
                                    why: format!("the rendezvous store is gone: {e}"),
                                }))
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => return Err(self.lost(peer, &e.to_string())),
            }
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the writers finish what they queued (peers may still be reading it): each write is
        // bounded by the socket's write timeout, and a failed group's sockets are shut already.
        for link in self.links.iter_mut().flatten() {
            link.tx = None;
        }
        for link in self.links.iter_mut().flatten() {
            if let Some(w) = link.writer.take() {
                let _ = w.join();
            }
        }
    }
}

/// Connects member `me` of the `size` members of `name` to every other one: it listens on the
/// interface that reaches the store, publishes its address there, dials every lower member and
/// accepts every higher one, so each pair shares one socket. Returns the sockets by member
/// (`None` at `me`) and a store connection of its own for the failure records (`None` for a
/// group of one). Every wait is bounded by `timeout`.
pub(crate) fn connect_all(
    store: &Store,
    name: &str,
    me: usize,
    size: usize,
    timeout: Duration,
) -> Result<(Vec<Option<TcpStream>>, Option<Store>), StoreError> {
    let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
    if size <= 1 {
        return Ok((streams, None));
    }
    let deadline = Instant::now() + timeout;
    let (addr, listener) = TcpListener::bind((store.local_ip(), 0))
        .and_then(|l| Ok((l.local_addr()?, l)))
        .map_err(|e| StoreError::Group {
            group: name.to_string(),
            what: format!("cannot listen on {}: {e}", store.local_ip()),
        })?;
    store.set(&addr_key(name, me), addr.to_string().as_bytes())?;
    for (peer, slot) in streams.iter_mut().enumerate().take(me) {
        *slot = Some(dial(store, name, me, size, peer, deadline)?);
    }
    accept(&listener, name, me, size, &mut streams, deadline)?;
    Ok((streams, Some(store.reconnect()?)))
}

/// A thread named `name` that writes every message sent to it on `out`, in order, until the
/// sender is dropped; on a write error it shuts the socket down (the reading side notices and
/// says why) and stops.
pub(crate) fn spawn_writer(
    mut out: TcpStream,
    name: String,
) -> io::Result<(mpsc::Sender<Vec<u8>>, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let writer = std::thread::Builder::new().name(name).spawn(move || {
        for msg in rx {
            if out.write_all(&msg).is_err() {
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
        }
    })?;
    Ok((tx, writer))
}

pub(crate) fn addr_key(name: &str, rank: usize) -> String {
    format!("group/{name}/addr/{rank}")
}

pub(crate) fn failure_key(name: &str) -> String {
    format!("group/{name}/failure")
}

fn hello(name: &str, rank: usize, size: usize) -> Vec<u8> {
    let mut out = HELLO.to_vec();
    out.extend_from_slice(&(rank as u64).to_le_bytes());
    out.extend_from_slice(&(size as u64).to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Reads a peer's hello: (rank, size, group name).
fn read_hello(s: &mut TcpStream) -> io::Result<(usize, usize, String)> {
    let mut head = [0u8; 4 + 8 + 8 + 4];
    s.read_exact(&mut head)?;
    if &head[..4] != HELLO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a group member",
        ));
    }
    let u64_at = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&head[i..i + 8]);
        u64::from_le_bytes(x) as usize
    };
    let (rank, size) = (u64_at(4), u64_at(12));
    let len = u32::from_le_bytes([head[20], head[21], head[22], head[23]]) as usize;
    if len > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "group name too long",
        ));
    }
    let mut name = vec![0u8; len];
    s.read_exact(&mut name)?;
    Ok((rank, size, String::from_utf8_lossy(&name).into_owned()))
}

/// Connects to lower rank `peer`, retrying until `deadline` (its listener may not be up yet).
pub(crate) fn dial(
    store: &Store,
    name: &str,
    rank: usize,
    size: usize,
    peer: usize,
    deadline: Instant,
) -> Result<TcpStream, StoreError> {
    let group_err = |what: String| StoreError::Group {
        group: name.to_string(),
        what,
    };
    let left = || deadline.saturating_duration_since(Instant::now());
    let addr = match store.get(&addr_key(name, peer), left()) {
        Ok(a) => a,
        Err(StoreError::Timeout { waited, .. }) => {
            return Err(group_err(format!(
                "rank {peer} did not join within {waited:?} (rank {rank} waited for it)"
            )))
        }
        Err(e) => return Err(e),
    };
    let addr: SocketAddr = String::from_utf8_lossy(&addr)
        .parse()
        .map_err(|e| group_err(format!("rank {peer} published a bad address: {e}")))?;
    loop {
        let attempt = TcpStream::connect_timeout(&addr, left().max(Duration::from_millis(10)))
            .and_then(|mut s| {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(left().max(Duration::from_millis(10))))?;
                s.set_write_timeout(Some(left().max(Duration::from_millis(10))))?;
                s.write_all(&hello(name, rank, size))?;
                let mut ack = [0u8; 1];
                s.read_exact(&mut ack)?;
                Ok((s, ack[0]))
            });
        match attempt {
            Ok((s, 1)) => return Ok(s),
            Ok((_, _)) => {
                return Err(group_err(format!(
                    "rank {peer} at {addr} refused rank {rank} (is another group `{name}` \
                     running with a different size?)"
                )))
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(group_err(format!(
                    "rank {rank} cannot reach rank {peer} at {addr}: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Accepts every higher rank's connection into `readers`, until `deadline`.
pub(crate) fn accept(
    listener: &TcpListener,
    name: &str,
    rank: usize,
    size: usize,
    readers: &mut [Option<TcpStream>],
    deadline: Instant,
) -> Result<(), StoreError> {
    let group_err = |what: String| StoreError::Group {
        group: name.to_string(),
        what,
    };
    let start = Instant::now();
    listener
        .set_nonblocking(true)
        .map_err(|e| group_err(format!("listener: {e}")))?;
    while readers[rank + 1..].iter().any(Option::is_none) {
        let (mut s, _) = match listener.accept() {
            Ok(c) => c,
            Err(_) => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> =
                        (rank + 1..size).filter(|&p| readers[p].is_none()).collect();
                    return Err(group_err(format!(
                        "ranks {missing:?} did not connect to rank {rank} within {:?}",
                        start.elapsed()
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let hello = s
            .set_nonblocking(false)
            .and_then(|_| s.set_read_timeout(Some(left)))
            .and_then(|_| read_hello(&mut s));
        // Whatever else connects (a stray client, a member of an old group that reused the
        // name) is turned away; only a member's disagreement on the size is an error.
        let Ok((peer, peer_size, peer_name)) = hello else {
            continue;
        };
        let ok = peer_name == name && peer_size == size && peer > rank && peer < size;
        let _ = s.write_all(&[ok as u8]);
        if peer_name == name && peer_size != size {
            return Err(group_err(format!(
                "rank {peer} joined with size {peer_size}, rank {rank} with size {size}"
            )));
        }
        if ok {
            if readers[peer].is_some() {
                return Err(group_err(format!("rank {peer} joined twice")));
            }
            readers[peer] = Some(s);
        }
    }
    Ok(())
}
