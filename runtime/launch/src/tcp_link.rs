//! [`TcpLink`]: the pipeline stages' point-to-point [`Link`] when ranks are processes (one per
//! rank under `ferrotron launch`), what the in-process [`Mailbox`](ferrotron_exec::Mailbox) is
//! to ranks that are threads. Through it a stage sends the activations (forward) and gradients
//! (backward) that its peers on the other stages read, tied parameters' summed gradients, and
//! the host sums of [`Rank::sum_over_stages`](ferrotron_exec::Rank::sum_over_stages).
//!
//! ```text
//! rank of stage s ── send ─► writer thread ─► socket ─► reader thread (rank of stage t)
//!                                                         └─► mailbox ─► recv(from, tag)
//! ```
//!
//! # Set-up
//!
//! [`TcpLink::connect`] joins the ranks at one tensor- and data-parallel place, one per stage,
//! the way a [`TcpGroup`](crate::TcpGroup) joins its members: each listens on a free port of the
//! interface that reaches the store, publishes `ip:port` there, dials every lower member and
//! accepts every higher one, so each pair of stages shares one socket. The data never passes
//! through the store.
//!
//! # Messages
//!
//! Each message is a header (magic, sender, receiver, transfer, micro-batch, flags, the shape)
//! and the tensor's `f32` elements, little-endian: the bits travel, so integer-valued data
//! arrives exactly. A send never waits: it queues the message for the peer's writer thread. On
//! the receiving side one reader thread per peer files every message in the mailbox under its
//! sender and [`Tag`] as it arrives, and a receive takes the one it asks for whatever order
//! they came in, so, as in process, no schedule that respects the data dependencies deadlocks.
//!
//! # Failure
//!
//! A receive waits at most the link's timeout ([`CommError::Timeout`]). While it waits it polls
//! the job's failure record in the store a few times a second, so a rank failing anywhere in
//! the job stops it. [`Link::abort`] writes why under `group/<name>/failure` (the first reason
//! stands) and then closes the link's sockets: every peer's reader sees the connection end,
//! finds the reason and fails the peer's waiting and later receives with it. A peer whose
//! connection ends without a reason (its process died, or it finished) fails only the receives
//! that wait for a message from it, with [`CommError::PeerFailed`] naming it.

use std::collections::hash_map::{Entry, HashMap};
use std::io::{self, BufReader, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store::{Store, StoreError};
use crate::tcp_group::{
    connect_all, decode_failure, encode_failure, failure_key, spawn_writer, RECEIVE,
};
use ferrotron_exec::{CommError, Link, Tag, Tensor};

/// A message's magic.
const MAGIC: u32 = u32::from_le_bytes(*b"FTLM");
/// How often a waiting receive polls the job's failure record.
const STORE_POLL: Duration = Duration::from_millis(200);
/// The most dimensions and elements a message may claim (a guard against garbage: the elements
/// are read as they arrive, never preallocated).
const MAX_DIMS: usize = 32;
const MAX_ELEMENTS: u64 = 1 << 34;
/// The reader's buffer; a multiple of 4, so that elements never straddle two reads.
const CHUNK: usize = 1 << 16;
/// Flag bit: the sender held the tensor in `f32` (see [`TcpLink::send_host`]).
const KEPT_F32: u8 = 1;

/// A message as the mailbox holds it.
struct Letter {
    tensor: Tensor,
    kept_f32: bool,
}

/// The messages that arrived for this rank, and how its connections stand.
#[derive(Default)]
struct Mail {
    state: Mutex<Letters>,
    arrived: Condvar,
}

#[derive(Default)]
struct Letters {
    /// By sender (global rank) and tag.
    waiting: HashMap<(usize, Tag), Letter>,
    /// Peers (global ranks) whose connection ended, and how.
    closed: HashMap<usize, String>,
    /// Set once, never cleared: every later receive and send returns it.
    failure: Option<CommError>,
    /// The link is being dropped: connections ending are expected.
    closing: bool,
}

impl Mail {
    fn lock(&self) -> MutexGuard<'_, Letters> {
        // Every change is one insert or remove: a thread that panicked left it consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a message for `to` (this rank) from `from`.
    fn deliver(&self, from: usize, to: usize, tag: Tag, letter: Letter) -> Result<(), CommError> {
        let mut letters = self.lock();
        if let Some(e) = &letters.failure {
            return Err(e.clone());
        }
        match letters.waiting.entry((from, tag)) {
            Entry::Occupied(_) => {
                return Err(CommError::Mismatch {
                    what: format!("rank {from} sent {tag:?} to rank {to} twice"),
                })
            }
            Entry::Vacant(slot) => {
                slot.insert(letter);
            }
        }
        drop(letters);
        self.arrived.notify_all();
        Ok(())
    }

    /// Records `err` unless a failure stands already; returns the one that stands.
    fn fail(&self, err: CommError) -> CommError {
        let mut letters = self.lock();
        let err = letters.failure.get_or_insert(err).clone();
        drop(letters);
        self.arrived.notify_all();
        err
    }
}

/// The sending side of one peer's socket, and its reader thread.
struct Peer {
    /// Messages for the writer thread; `None` once the link is dropped.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
    /// A handle on the socket, to shut it down.
    stream: TcpStream,
}

/// Point-to-point messages between the processes of a job's pipeline stages; see the module
/// docs. One `TcpLink` serves one rank (this process's): it sends as that rank and receives
/// what the other members sent to it.
pub struct TcpLink {
    name: String,
    /// This process's rank in the job.
    rank: usize,
    /// The members' ranks in the job, in member order (stage order).
    members: Vec<usize>,
    timeout: Duration,
    /// By member; `None` at our own.
    peers: Vec<Option<Peer>>,
    mail: Arc<Mail>,
    /// A connection of our own, for the failure records (`None` for a link of one).
    store: Option<Arc<Store>>,
    /// Whether this rank has told its peers it failed (once is enough).
    told: AtomicBool,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("name", &self.name)
            .field("rank", &self.rank)
            .field("members", &self.members)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TcpLink {
    /// Joins link `name` as `rank` (the job's rank of this process), one of `members` (the
    /// job's ranks the link joins, the same list in every member, in stage order): every member
    /// calls this concurrently, and it returns once this one is connected to all others.
    /// `timeout` bounds the set-up and, afterwards, every receive. Names must be unique within a
    /// job, and apart from the [`TcpGroup`](crate::TcpGroup)s' (`pp/tp0/dp1`).
    pub fn connect(
        store: &Store,
        name: &str,
        members: &[usize],
        rank: usize,
        timeout: Duration,
    ) -> Result<TcpLink, StoreError> {
        let link_err = |what: String| StoreError::Group {
            group: name.to_string(),
            what,
        };
        let Some(me) = members.iter().position(|&r| r == rank) else {
            return Err(link_err(format!(
                "rank {rank} is not one of its members {members:?}"
            )));
        };
        if (1..members.len()).any(|i| members[..i].contains(&members[i])) {
            return Err(link_err(format!("members {members:?} repeat a rank")));
        }
        let size = members.len();
        let (streams, own_store) = connect_all(store, name, me, size, timeout)?;
        let own_store = own_store.map(Arc::new);
        // Built before its threads start, so that an error below still stops those started.
        let mut link = TcpLink {
            name: name.to_string(),
            rank,
            members: members.to_vec(),
            timeout,
            peers: (0..size).map(|_| None).collect(),
            mail: Arc::new(Mail::default()),
            store: own_store,
            told: AtomicBool::new(false),
        };
        for (m, stream) in streams.into_iter().enumerate() {
            let Some(stream) = stream else { continue };
            let peer = members[m];
            let setup = |e: io::Error| link_err(format!("socket to rank {peer}: {e}"));
            stream.set_nodelay(true).map_err(setup)?;
            // The reader thread blocks until a message or the end; the receives bound the wait.
            stream.set_read_timeout(None).map_err(setup)?;
            // Writes are bounded: a peer that stops reading fails us within `timeout`.
            stream.set_write_timeout(Some(timeout)).map_err(setup)?;
            let input = stream.try_clone().map_err(setup)?;
            let (tx, writer) = spawn_writer(
                stream.try_clone().map_err(setup)?,
                format!("link-{rank}->{peer}"),
            )
            .map_err(setup)?;
            link.peers[m] = Some(Peer {
                tx: Some(tx),
                writer: Some(writer),
                reader: None,
                stream,
            });
            let (mail, store, key) = (link.mail.clone(), link.store.clone(), failure_key(name));
            let reader = std::thread::Builder::new()
                .name(format!("link-{rank}<-{peer}"))
                .spawn(move || read_loop(input, peer, rank, &mail, store.as_deref(), &key))
                .map_err(setup)?;
            if let Some(p) = link.peers[m].as_mut() {
                p.reader = Some(reader);
            }
        }
        Ok(link)
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The job's ranks it joins, in stage order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// Sends host tensor `t` as [`Link::send`] does, noting whether the sender held it in `f32`
    /// (`kept_f32`) rather than in its backend's compute type, so that a receiver that copies it
    /// to a device holds it the same way (see [`TcpLink::recv_host`]). Never waits.
    pub fn send_host(
        &self,
        from: usize,
        to: usize,
        tag: Tag,
        t: Tensor,
        kept_f32: bool,
    ) -> Result<(), CommError> {
        if from != self.rank {
            return Err(CommError::Mismatch {
                what: format!("rank {from} sent {tag:?} through rank {}'s link", self.rank),
            });
        }
        if let Some(e) = &self.mail.lock().failure {
            return Err(e.clone());
        }
        if to == self.rank {
            return self.mail.deliver(
                from,
                to,
                tag,
                Letter {
                    tensor: t,
                    kept_f32,
                },
            );
        }
        let tx = self
            .member(to)
            .and_then(|m| self.peers[m].as_ref())
            .and_then(|p| p.tx.as_ref());
        let Some(tx) = tx else {
            return Err(CommError::Mismatch {
                what: format!(
                    "rank {from} sent {tag:?} to rank {to}, which link `{}` (ranks {:?}) does \
                     not join",
                    self.name, self.members
                ),
            });
        };
        if tx.send(encode(from, to, tag, &t, kept_f32)).is_err() {
            // The writer stopped: the socket broke.
            return Err(self.lost(to, "the connection broke while sending"));
        }
        Ok(())
    }

    /// Receives as [`Link::recv`] does: the tensor, and whether its sender held it in `f32`.
    pub fn recv_host(&self, from: usize, to: usize, tag: Tag) -> Result<(Tensor, bool), CommError> {
        if to != self.rank || self.member(from).is_none() {
            return Err(CommError::Mismatch {
                what: format!(
                    "rank {to} asked rank {}'s link `{}` (ranks {:?}) for {tag:?} from rank \
                     {from}",
                    self.rank, self.name, self.members
                ),
            });
        }
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut polled = started;
        let mut letters = self.mail.lock();
        loop {
            if let Some(l) = letters.waiting.remove(&(from, tag)) {
                return Ok((l.tensor, l.kept_f32));
            }
            if let Some(e) = &letters.failure {
                return Err(e.clone());
            }
            if let Some(why) = letters.closed.get(&from) {
                let why = why.clone();
                drop(letters);
                return Err(self.lost(from, &why));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Timeout {
                    op: RECEIVE,
                    waited: now - started,
                    missing: vec![from],
                });
            }
            if now - polled >= STORE_POLL {
                drop(letters);
                polled = now;
                if let Some(err) = self.job_failure(from) {
                    return Err(self.mail.fail(err));
                }
                letters = self.mail.lock();
                continue;
            }
            let wait = (deadline - now).min(STORE_POLL - (now - polled));
            letters = self
                .mail
                .arrived
                .wait_timeout(letters, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The member index of the job's rank `rank`.
    fn member(&self, rank: usize) -> Option<usize> {
        self.members.iter().position(|&r| r == rank)
    }

    /// The job's failure record, as the error of a receive waiting for `peer`; a store that is
    /// gone counts as a failure too.
    fn job_failure(&self, peer: usize) -> Option<CommError> {
        match self.store.as_ref()?.failure() {
            Ok(None) => None,
            Ok(Some(f)) => Some(CommError::PeerFailed {
                rank: f.rank.unwrap_or(peer),
                why: format!("the job failed: {f}"),
            }),
            Err(e) => Some(CommError::PeerFailed {
                rank: peer,
                why: format!("the rendezvous store is gone: {e}"),
            }),
        }
    }

    /// The connection to `peer` ended (`detail`): fails the link with the reason a member
    /// recorded, else the job's, else the lost connection.
    fn lost(&self, peer: usize, detail: &str) -> CommError {
        let store = self.store.as_deref();
        let recorded = store.and_then(|s| recorded_failure(s, &failure_key(&self.name)));
        let err = recorded.unwrap_or_else(|| {
            let why = match store.and_then(|s| s.failure().ok().flatten()) {
                Some(f) => format!("lost the connection to rank {peer}: {f}"),
                None => format!("lost the connection to rank {peer} ({detail})"),
            };
            CommError::PeerFailed { rank: peer, why }
        });
        self.mail.fail(err)
    }
}

impl Link<Tensor> for TcpLink {
    fn send(&self, from: usize, to: usize, tag: Tag, t: Tensor) -> Result<(), CommError> {
        self.send_host(from, to, tag, t, true)
    }

    fn recv(&self, from: usize, to: usize, tag: Tag) -> Result<Tensor, CommError> {
        self.recv_host(from, to, tag).map(|(t, _)| t)
    }

    /// Every receive of this rank's fails with `PeerFailed { rank, why }`; the peers learn why
    /// through the store and their connections to this rank close at once, so theirs fail too.
    fn abort(&self, rank: usize, why: &str) {
        let err = self.mail.fail(CommError::PeerFailed {
            rank,
            why: why.to_string(),
        });
        if self.told.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(store) = &self.store {
            // Before closing the sockets, so that a peer that sees them close finds the reason.
            let _ = store.set_if_absent(&failure_key(&self.name), encode_failure(&err).as_bytes());
        }
        for p in self.peers.iter().flatten() {
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.mail.lock().closing = true;
        // Let the writers finish what they queued (a peer may still wait for it): each write is
        // bounded by the socket's write timeout, and an aborted link's sockets are shut already.
        for p in self.peers.iter_mut().flatten() {
            p.tx = None;
        }
        for p in self.peers.iter_mut().flatten() {
            if let Some(w) = p.writer.take() {
                let _ = w.join();
            }
        }
        for p in self.peers.iter_mut().flatten() {
            // Wakes the reader blocked on it.
            let _ = p.stream.shutdown(Shutdown::Both);
            if let Some(r) = p.reader.take() {
                let _ = r.join();
            }
        }
    }
}

/// The failure a member recorded under `key`, if any.
fn recorded_failure(store: &Store, key: &str) -> Option<CommError> {
    let v = store.try_get(key).ok().flatten()?;
    decode_failure(&String::from_utf8_lossy(&v))
}

/// One message: header, then the elements' bits.
fn encode(from: usize, to: usize, tag: Tag, t: &Tensor, kept_f32: bool) -> Vec<u8> {
    let mut msg = Vec::with_capacity(33 + 8 * t.shape.len() + 4 * t.data.len());
    msg.extend_from_slice(&MAGIC.to_le_bytes());
    msg.extend_from_slice(&(from as u64).to_le_bytes());
    msg.extend_from_slice(&(to as u64).to_le_bytes());
    msg.extend_from_slice(&tag.transfer.to_le_bytes());
    msg.extend_from_slice(&tag.micro_batch.to_le_bytes());
    msg.push(if kept_f32 { KEPT_F32 } else { 0 });
    msg.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
    for &d in &t.shape {
        msg.extend_from_slice(&(d as u64).to_le_bytes());
    }
    for x in &t.data {
        msg.extend_from_slice(&x.to_le_bytes());
    }
    msg
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads the next message `peer` sent to `rank`; `None` when the connection ended cleanly
/// between messages.
fn read_letter(
    r: &mut BufReader<TcpStream>,
    peer: usize,
    rank: usize,
) -> io::Result<Option<(Tag, Letter)>> {
    let mut magic = [0u8; 4];
    let mut filled = 0;
    while filled < magic.len() {
        match r.read(&mut magic[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if u32::from_le_bytes(magic) != MAGIC {
        return Err(invalid("not a pipeline message".into()));
    }
    let (from, to) = (read_u64(r)?, read_u64(r)?);
    if from != peer as u64 || to != rank as u64 {
        return Err(invalid(format!(
            "a message from rank {from} to rank {to} on the connection from rank {peer}"
        )));
    }
    let tag = Tag {
        transfer: read_u32(r)?,
        micro_batch: read_u32(r)?,
    };
    let mut flags = [0u8; 1];
    r.read_exact(&mut flags)?;
    let dims = read_u32(r)? as usize;
    if dims > MAX_DIMS {
        return Err(invalid(format!("a tensor of {dims} dimensions")));
    }
    let mut shape = Vec::with_capacity(dims);
    let mut count = 1u64;
    for _ in 0..dims {
        let d = read_u64(r)?;
        count = count.saturating_mul(d);
        shape.push(d as usize);
    }
    if count > MAX_ELEMENTS {
        return Err(invalid(format!("a tensor of shape {shape:?}")));
    }
    let count = count as usize;
    let mut data = Vec::with_capacity(count.min(CHUNK));
    let mut buf = vec![0u8; CHUNK];
    let mut left = 4 * count;
    while left > 0 {
        let n = left.min(CHUNK);
        r.read_exact(&mut buf[..n])?;
        data.extend(
            buf[..n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        left -= n;
    }
    let letter = Letter {
        tensor: Tensor {
            shape,
            data: data.into(),
        },
        kept_f32: flags[0] & KEPT_F32 != 0,
    };
    Ok(Some((tag, letter)))
}

/// A reader thread: files `peer`'s messages to `rank` until the connection ends, then notes
/// how it ended (or, when the peer recorded why it failed, fails the link with that).
fn read_loop(
    stream: TcpStream,
    peer: usize,
    rank: usize,
    mail: &Mail,
    store: Option<&Store>,
    key: &str,
) {
    let mut input = BufReader::with_capacity(CHUNK, stream);
    let ended = loop {
        match read_letter(&mut input, peer, rank) {
            Ok(Some((tag, letter))) => {
                // Once the link failed, later messages are dropped, but still read: the peer's
                // writer must not block on a full socket.
                if let Err(e) = mail.deliver(peer, rank, tag, letter) {
                    mail.fail(e);
                }
            }
            Ok(None) => break "it closed the connection".to_string(),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let closing = mail.lock().closing;
                if !closing {
                    mail.fail(CommError::Mismatch {
                        what: format!("rank {peer} sent rank {rank} garbage: {e}"),
                    });
                }
                return;
            }
            Err(e) => break e.to_string(),
        };
    };
    {
        let letters = mail.lock();
        if letters.closing || letters.failure.is_some() {
            return;
        }
    }
    let recorded = store.and_then(|s| recorded_failure(s, key));
    let mut letters = mail.lock();
    match recorded {
        Some(err) => {
            letters.failure.get_or_insert(err);
        }
        None => {
            letters.closed.insert(peer, ended);
        }
    }
    drop(letters);
    mail.arrived.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreServer;

    fn tag(transfer: u32, micro_batch: u32) -> Tag {
        Tag {
            transfer,
            micro_batch,
        }
    }

    /// `n` members (job ranks `base..base + n`) of link `name`, connected concurrently.
    fn links(server: &StoreServer, name: &str, ranks: &[usize], timeout: Duration) -> Vec<TcpLink> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|&r| {
                    s.spawn(move || {
                        let store =
                            Store::connect(&server.addr().to_string(), Duration::from_secs(5))
                                .unwrap();
                        TcpLink::connect(&store, name, ranks, r, timeout).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn messages_arrive_exactly_by_tag_in_any_order() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let ranks = [5, 1, 3];
        let l = links(&server, "pp/tp0/dp0", &ranks, Duration::from_secs(10));
        // Odd sizes, integers past bf16's range and f32's extremes all arrive bit for bit.
        let ids = Tensor::new(vec![3, 50], (0..150).map(|i| (i * 997) as f32).collect()).unwrap();
        let odd = Tensor::new(
            vec![783],
            (0..783)
                .map(|i| f32::from_bits(0x3f80_0001u32.wrapping_mul(i + 1)))
                .collect(),
        )
        .unwrap();
        let scalar = Tensor::full(Vec::new(), -0.0);
        l[0].send(5, 3, tag(1, 1), odd.clone()).unwrap();
        l[0].send(5, 3, tag(1, 0), ids.clone()).unwrap();
        l[2].send_host(3, 1, tag(u32::MAX, 7), scalar.clone(), false)
            .unwrap();
        l[1].send(1, 1, tag(0, 0), ids.clone()).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            a.shape == b.shape
                && a.data.len() == b.data.len()
                && a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(same(&l[2].recv(5, 3, tag(1, 0)).unwrap(), &ids));
        assert!(same(&l[2].recv(5, 3, tag(1, 1)).unwrap(), &odd));
        let (t, kept) = l[1].recv_host(3, 1, tag(u32::MAX, 7)).unwrap();
        assert!(same(&t, &scalar) && !kept);
        assert!(same(&l[1].recv(1, 1, tag(0, 0)).unwrap(), &ids));
        // Ranks outside the link are a mismatch, not a hang.
        assert!(matches!(
            l[0].send(5, 4, tag(0, 0), scalar.clone()),
            Err(CommError::Mismatch { .. })
        ));
        assert!(matches!(
            l[0].recv(4, 5, tag(0, 0)),
            Err(CommError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_receive_times_out_and_an_abort_stops_every_member() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let ranks = [0, 2, 4];
        let l = links(&server, "pp/tp0/dp1", &ranks, Duration::from_millis(300));
        let started = Instant::now();
        assert!(matches!(
            l[1].recv(0, 2, tag(0, 0)),
            Err(CommError::Timeout { .. })
        ));
        assert!(started.elapsed() >= Duration::from_millis(300));
        let l = links(&server, "pp/tp1/dp1", &ranks, Duration::from_secs(30));
        std::thread::scope(|s| {
            // Rank 2 waits on rank 0, rank 4 on rank 2: rank 0's abort stops both.
            let a = s.spawn(|| l[1].recv(0, 2, tag(3, 0)));
            let b = s.spawn(|| l[2].recv(2, 4, tag(3, 0)));
            std::thread::sleep(Duration::from_millis(50));
            let started = Instant::now();
            l[0].abort(0, "stage 0 ran out of memory");
            for waiter in [a, b] {
                let err = waiter.join().unwrap().unwrap_err();
                assert!(err.to_string().contains("ran out of memory"), "{err}");
            }
            assert!(started.elapsed() < Duration::from_secs(2));
        });
        assert!(l[0].send(0, 2, tag(0, 0), Tensor::zeros(vec![1])).is_err());
    }

    #[test]
    fn a_peer_that_goes_away_fails_only_the_receives_from_it() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let mut l = links(&server, "pp/tp0/dp2", &[0, 1, 2], Duration::from_secs(30));
        // What rank 2 sent before it went is still delivered.
        l[2].send(2, 0, tag(0, 0), Tensor::full(vec![2], 1.5))
            .unwrap();
        drop(l.pop());
        assert_eq!(l[0].recv(2, 0, tag(0, 0)).unwrap().data, vec![1.5, 1.5]);
        let started = Instant::now();
        let err = l[0].recv(2, 0, tag(0, 1)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            err.to_string().contains("lost the connection to rank 2"),
            "{err}"
        );
        // A job failure recorded elsewhere stops a receive within a poll or two.
        let l = links(&server, "pp/tp1/dp2", &[0, 1], Duration::from_secs(30));
        let store = Store::connect(&server.addr().to_string(), Duration::from_secs(5)).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| l[1].recv(0, 1, tag(0, 0)));
            std::thread::sleep(Duration::from_millis(50));
            let started = Instant::now();
            store
                .fail(&crate::Failure {
                    rank: Some(7),
                    why: "rank 7 failed: exit status: 3".into(),
                })
                .unwrap();
            let err = waiter.join().unwrap().unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2));
            assert!(
                matches!(&err, CommError::PeerFailed { rank: 7, .. }),
                "{err}"
            );
        });
    }
}
