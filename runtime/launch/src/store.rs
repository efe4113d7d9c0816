//! The rendezvous store: a small TCP key-value server (like PyTorch's `TCPStore`) that node 0's
//! launcher hosts for the whole job, and its client, [`Store`].
//!
//! Launchers meet through it (every node joins, the run id, who finished), workers share what
//! they must agree on before they can talk directly (a [`TcpGroup`](super::TcpGroup)'s member
//! addresses, the CUDA backend's 128-byte NCCL unique id), and it holds the job's **failure
//! record**: the first [`Failure`] any launcher (or worker) reports. Recording one wakes every
//! client blocked in [`Store::get`], [`Store::wait`] or [`Store::barrier`] with
//! [`StoreError::Failed`], so that a rank dying on one node stops every other node instead of
//! leaving it blocked. A launcher marks its connection with [`Store::watch`]: if that connection
//! drops without [`Store::close`] (the launcher's node died), the server records the failure
//! itself.
//!
//! # Protocol
//!
//! One TCP connection per client, opened with a magic/version handshake; then requests and
//! replies alternate. Every message is length-prefixed and little-endian:
//!
//! ```text
//! request  op:u8  key:bytes  value:bytes  arg:u64      (bytes = len:u32 + that many bytes)
//! reply    status:u8  payload:bytes                    (OK, MISSING, TIMEOUT, FAILED, ERROR)
//! ```
//!
//! Blocking requests carry their timeout (milliseconds) in `arg` and the server answers
//! `TIMEOUT` when it passes; the client's socket timeout is that plus a margin, so a dead server
//! is noticed too. Nothing here waits without a bound.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The handshake's magic and protocol version.
const MAGIC: &[u8; 4] = b"FTRS";
const VERSION: u32 = 1;
/// The longest key and value accepted (a value is read as it arrives, never preallocated).
const MAX_KEY: usize = 64 << 10;
const MAX_VALUE: usize = 1 << 30;
/// How long a non-blocking request may take before the connection counts as lost.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Request codes.
mod op {
    pub const SET: u8 = 1;
    pub const GET: u8 = 2;
    pub const TRY_GET: u8 = 3;
    pub const ADD: u8 = 4;
    pub const WAIT: u8 = 5;
    pub const SET_IF_ABSENT: u8 = 6;
    pub const FAIL: u8 = 7;
    pub const FAILURE: u8 = 8;
    pub const WATCH: u8 = 9;
    pub const BYE: u8 = 10;
}

/// Reply codes.
mod status {
    pub const OK: u8 = 0;
    pub const MISSING: u8 = 1;
    pub const TIMEOUT: u8 = 2;
    pub const FAILED: u8 = 3;
    pub const ERROR: u8 = 4;
}

/// The job's failure record: who failed (the job's global rank, when a rank did) and why, in a
/// sentence a user can read ("rank 3 (node 1, local rank 1) failed: exit status: 3").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The global rank that failed, if the failure is a rank's.
    pub rank: Option<usize>,
    /// What happened.
    pub why: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

impl Failure {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.why.len());
        out.push(self.rank.is_some() as u8);
        out.extend_from_slice(&(self.rank.unwrap_or(0) as u64).to_le_bytes());
        out.extend_from_slice(self.why.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Failure> {
        let (&has_rank, rest) = bytes.split_first()?;
        let (rank, why) = rest.split_at_checked(8)?;
        let rank = u64::from_le_bytes(rank.try_into().ok()?);
        Some(Failure {
            rank: (has_rank != 0).then_some(rank as usize),
            why: String::from_utf8_lossy(why).into_owned(),
        })
    }
}

/// What went wrong talking to (or hosting) the store, or setting up a group through it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The address does not parse or resolve.
    #[error("cannot resolve the store address `{addr}`: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The server cannot listen there (port in use, address not on this machine).
    #[error("cannot host the store at {addr}: {source}")]
    Bind {
        /// The address as given.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// No store answered there within the time given (retried meanwhile: node 0 may start last).
    #[error("no store answered at {addr} within {waited:?}: {source}")]
    Connect {
        /// The address as given.
        addr: String,
        /// How long it tried.
        waited: Duration,
        /// The last attempt's error.
        source: io::Error,
    },
    /// Something answered that does not speak the store's protocol.
    #[error("{addr}: {what}")]
    Protocol {
        /// The peer's address.
        addr: String,
        /// What was wrong.
        what: String,
    },
    /// The connection broke (the server's node died, or a reply never came).
    #[error("lost the connection to the store at {addr}: {source}")]
    Io {
        /// The server's address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A blocking request timed out.
    #[error("{op} `{key}`: timed out after {waited:?}")]
    Timeout {
        /// The request (`get`, `wait`, `barrier`).
        op: &'static str,
        /// The key (or keys) it waited for.
        key: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The job failed (the store's failure record) while the request waited.
    #[error("the job failed: {0}")]
    Failed(Failure),
    /// The server refused the request (a non-numeric counter, a server shutting down).
    #[error("the store refused `{op}`: {what}")]
    Refused {
        /// The request.
        op: &'static str,
        /// Why.
        what: String,
    },
    /// Setting up a [`TcpGroup`](super::TcpGroup) failed: a member missing, sizes that
    /// disagree, an unreachable peer.
    #[error("group `{group}`: {what}")]
    Group {
        /// The group's name (`tp/dp0`).
        group: String,
        /// What went wrong.
        what: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Wire helpers

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
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

/// Reads a length-prefixed byte string of at most `max` bytes. The buffer grows as data
/// arrives, so a corrupt length cannot make it allocate a gigabyte up front.
fn read_bytes(r: &mut impl Read, max: usize) -> io::Result<Vec<u8>> {
    let len = read_u32(r)? as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a field of {len} bytes (at most {max})"),
        ));
    }
    let mut out = Vec::with_capacity(len.min(64 << 10));
    r.take(len as u64).read_to_end(&mut out)?;
    if out.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(out)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// A list of keys as one value (for `wait`).
fn encode_keys(keys: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    for k in keys {
        put_bytes(&mut out, k.as_bytes());
    }
    out
}

fn decode_keys(mut bytes: &[u8]) -> io::Result<Vec<String>> {
    let n = read_u32(&mut bytes)?;
    (0..n)
        .map(|_| Ok(String::from_utf8_lossy(&read_bytes(&mut bytes, MAX_KEY)?).into_owned()))
        .collect()
}

/// Resolves `addr` ("host:port"), with an error that names it.
fn resolve(addr: &str) -> Result<Vec<SocketAddr>, StoreError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|source| StoreError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(StoreError::Resolve {
            addr: addr.to_string(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        });
    }
    Ok(addrs)
}

// ---------------------------------------------------------------------------------------------
// Server

/// The store's server: a thread accepting connections and one thread per client. Dropping it
/// stops them all (blocked clients get an error, not a hang).
pub struct StoreServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every change (a key set, a failure recorded, shutdown).
    changed: Condvar,
    stop: AtomicBool,
    /// Every connection (a handle to shut it down) and its thread.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

#[derive(Default)]
struct State {
    map: HashMap<String, Vec<u8>>,
    /// Set once, never cleared.
    failure: Option<Failure>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, failure: Failure) -> Failure {
        let mut st = self.lock();
        let f = st.failure.get_or_insert(failure).clone();
        self.changed.notify_all();
        f
    }
}

impl StoreServer {
    /// Listens at `addr` ("host:port"; port 0 picks a free one, see [`StoreServer::addr`]).
    pub fn bind(addr: &str) -> Result<StoreServer, StoreError> {
        let mut last = None;
        for a in resolve(addr)? {
            match TcpListener::bind(a) {
                Ok(l) => return Self::serve(l, addr),
                Err(e) => last = Some(e),
            }
        }
        Err(StoreError::Bind {
            addr: addr.to_string(),
            source: last.unwrap_or_else(|| io::ErrorKind::AddrNotAvailable.into()),
        })
    }

    fn serve(listener: TcpListener, given: &str) -> Result<StoreServer, StoreError> {
        let bind_err = |source| StoreError::Bind {
            addr: given.to_string(),
            source,
        };
        let addr = listener.local_addr().map_err(bind_err)?;
        // Non-blocking, so the accept loop can notice shutdown.
        listener.set_nonblocking(true).map_err(bind_err)?;
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            conns: Mutex::default(),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .map_err(bind_err)?;
        Ok(StoreServer {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens at (with the port chosen, if 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The failure record, if any.
    pub fn failure(&self) -> Option<Failure> {
        self.shared.lock().failure.clone()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _st = self.shared.lock();
            self.shared.changed.notify_all();
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns =
            std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for (stream, _) in &conns {
            // Wakes a thread blocked reading its client's next request.
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let sh = shared.clone();
                let Ok(thread) = std::thread::Builder::new()
                    .name("store-conn".into())
                    .spawn(move || serve_client(stream, &sh))
                else {
                    continue;
                };
                let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|(_, h)| !h.is_finished());
                conns.push((handle, thread));
            }
            Err(_) => std::thread::sleep(ACCEPT_POLL),
        }
    }
}

/// Serves one client until it leaves; records a failure if a watched client vanishes.
fn serve_client(stream: TcpStream, shared: &Shared) {
    let mut watched = None;
    let clean = serve_requests(stream, shared, &mut watched).is_ok();
    if let (false, Some(label)) = (clean, watched) {
        if !shared.stop.load(Ordering::SeqCst) {
            shared.record(Failure {
                rank: None,
                why: format!("{label} lost its connection to the store"),
            });
        }
    }
}

/// The request loop: `Ok` when the client said goodbye, `Err` when it left abruptly or spoke
/// garbage. `watched` is the connection's watch label.
fn serve_requests(
    stream: TcpStream,
    shared: &Shared,
    watched: &mut Option<String>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // The handshake must come promptly: whatever connects and stays silent is dropped.
    reader.get_ref().set_read_timeout(Some(OP_TIMEOUT))?;
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic)?;
    let version = read_u32(&mut reader)?;
    // Reply with our version either way, so a client of another version can say so.
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&VERSION.to_le_bytes());
    writer.write_all(&hello)?;
    if &magic != MAGIC || version != VERSION {
        return Err(io::ErrorKind::InvalidData.into());
    }
    // From now on a client may stay idle for as long as it likes.
    reader.get_ref().set_read_timeout(None)?;
    loop {
        let code = read_u8(&mut reader)?;
        let key = read_bytes(&mut reader, MAX_KEY)?;
        let key = String::from_utf8_lossy(&key).into_owned();
        let value = read_bytes(&mut reader, MAX_VALUE)?;
        let arg = read_u64(&mut reader)?;
        let (st, payload) = match code {
            op::WATCH => {
                *watched = Some(key);
                (status::OK, Vec::new())
            }
            op::BYE => {
                *watched = None;
                (status::OK, Vec::new())
            }
            _ => handle(shared, code, key, value, arg),
        };
        let mut reply = vec![st];
        put_bytes(&mut reply, &payload);
        writer.write_all(&reply)?;
        if code == op::BYE {
            return Ok(());
        }
    }
}

/// Answers one request (all but the connection-level WATCH and BYE).
fn handle(shared: &Shared, code: u8, key: String, value: Vec<u8>, arg: u64) -> (u8, Vec<u8>) {
    let error = |what: String| (status::ERROR, what.into_bytes());
    match code {
        op::SET => {
            let mut st = shared.lock();
            st.map.insert(key, value);
            shared.changed.notify_all();
            (status::OK, Vec::new())
        }
        op::SET_IF_ABSENT => {
            let mut st = shared.lock();
            let now = st.map.entry(key).or_insert(value).clone();
            shared.changed.notify_all();
            (status::OK, now)
        }
        op::TRY_GET => match shared.lock().map.get(&key) {
            Some(v) => (status::OK, v.clone()),
            None => (status::MISSING, Vec::new()),
        },
        op::ADD => {
            let mut st = shared.lock();
            let old = match st.map.get(&key) {
                None => 0,
                Some(v) => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(n) => n,
                    None => return error(format!("`{key}` does not hold a counter")),
                },
            };
            let new = old.wrapping_add(arg as i64);
            st.map.insert(key, new.to_string().into_bytes());
            shared.changed.notify_all();
            (status::OK, new.to_string().into_bytes())
        }
        op::GET | op::WAIT => {
            let keys = if code == op::GET {
                vec![key]
            } else {
                match decode_keys(&value) {
                    Ok(k) => k,
                    Err(e) => return error(format!("bad key list: {e}")),
                }
            };
            let deadline = Instant::now() + Duration::from_millis(arg);
            let mut st = shared.lock();
            loop {
                if keys.iter().all(|k| st.map.contains_key(k)) {
                    let v = match code {
                        op::GET => st.map.get(&keys[0]).cloned().unwrap_or_default(),
                        _ => Vec::new(),
                    };
                    return (status::OK, v);
                }
                if let Some(f) = &st.failure {
                    return (status::FAILED, f.encode());
                }
                if shared.stop.load(Ordering::SeqCst) {
                    return error("the store is shutting down".into());
                }
                let now = Instant::now();
                if now >= deadline {
                    return (status::TIMEOUT, Vec::new());
                }
                st = shared
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        op::FAIL => match Failure::decode(&value) {
            Some(f) => (status::OK, shared.record(f).encode()),
            None => error("bad failure record".into()),
        },
        op::FAILURE => match &shared.lock().failure {
            Some(f) => (status::OK, f.encode()),
            None => (status::MISSING, Vec::new()),
        },
        other => error(format!("unknown request {other}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// A connection to the store. Requests on one `Store` are serialised (a blocking [`get`]
/// holds the connection while it waits); open another with [`Store::reconnect`] to poll, say,
/// [`Store::failure`] meanwhile. `Store` is `Send + Sync`.
///
/// [`get`]: Store::get
pub struct Store {
    addr: SocketAddr,
    local: SocketAddr,
    /// `None` once an error left the connection in an unknown state.
    conn: Mutex<Option<TcpStream>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// A reply, decoded.
enum Reply {
    Ok(Vec<u8>),
    Missing,
    Timeout,
    Failed(Failure),
}

impl Store {
    /// Connects to the store at `addr` ("host:port"), retrying for up to `timeout` while nothing
    /// listens there yet (node 0's launcher may start after this one). An address that does not
    /// resolve, or a server that is not a store, fails at once.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Store, StoreError> {
        let addrs = resolve(addr)?;
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let mut last = io::Error::from(io::ErrorKind::TimedOut);
            for a in &addrs {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(10), Duration::from_secs(2));
                match TcpStream::connect_timeout(a, left) {
                    Ok(s) => return Store::handshake(s, *a, addr),
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Connect {
                    addr: addr.to_string(),
                    waited: start.elapsed(),
                    source: last,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn handshake(mut s: TcpStream, a: SocketAddr, given: &str) -> Result<Store, StoreError> {
        let not_a_store = |what: String| StoreError::Protocol {
            addr: given.to_string(),
            what,
        };
        let io_err = |source| StoreError::Io { addr: a, source };
        s.set_nodelay(true).map_err(io_err)?;
        s.set_read_timeout(Some(OP_TIMEOUT)).map_err(io_err)?;
        s.set_write_timeout(Some(OP_TIMEOUT)).map_err(io_err)?;
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&VERSION.to_le_bytes());
        s.write_all(&hello).map_err(io_err)?;
        let mut magic = [0u8; 4];
        s.read_exact(&mut magic)
            .map_err(|e| not_a_store(format!("not a ferrotron store (handshake: {e})")))?;
        let version = read_u32(&mut s).map_err(io_err)?;
        if &magic != MAGIC {
            return Err(not_a_store("not a ferrotron store".into()));
        }
        if version != VERSION {
            return Err(not_a_store(format!(
                "store protocol version {version}, this build speaks {VERSION}"
            )));
        }
        let local = s.local_addr().map_err(io_err)?;
        Ok(Store {
            addr: a,
            local,
            conn: Mutex::new(Some(s)),
        })
    }

    /// Opens a second connection to the same server.
    pub fn reconnect(&self) -> Result<Store, StoreError> {
        Store::connect(&self.addr.to_string(), OP_TIMEOUT)
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This machine's address on the connection to the store: the interface that reaches node 0,
    /// which is the one peers on other nodes can reach us through. [`TcpGroup`](super::TcpGroup)
    /// listens there.
    pub fn local_ip(&self) -> IpAddr {
        self.local.ip()
    }

    /// Sends one request and reads its reply. `wait` is how long the server may take.
    fn call(
        &self,
        name: &'static str,
        code: u8,
        key: &str,
        value: &[u8],
        arg: u64,
        wait: Duration,
    ) -> Result<Reply, StoreError> {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return Err(StoreError::Refused {
                op: name,
                what: format!(
                    "key of {} bytes or value of {} bytes (at most {MAX_KEY} and {MAX_VALUE})",
                    key.len(),
                    value.len()
                ),
            });
        }
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = guard.as_mut() else {
            return Err(StoreError::Io {
                addr: self.addr,
                source: io::Error::new(io::ErrorKind::NotConnected, "an earlier request failed"),
            });
        };
        let mut req = Vec::with_capacity(1 + 8 + key.len() + value.len() + 8);
        req.push(code);
        put_bytes(&mut req, key.as_bytes());
        put_bytes(&mut req, value);
        req.extend_from_slice(&arg.to_le_bytes());
        let result = (|| -> io::Result<(u8, Vec<u8>)> {
            s.set_read_timeout(Some(wait.saturating_add(OP_TIMEOUT)))?;
            s.write_all(&req)?;
            let st = read_u8(s)?;
            let payload = read_bytes(s, MAX_VALUE)?;
            Ok((st, payload))
        })();
        let (st, payload) = match result {
            Ok(r) => r,
            Err(source) => {
                // A reply may still be in flight: the connection cannot be used any more.
                *guard = None;
                let source = match source.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                    _ => source,
                };
                return Err(StoreError::Io {
                    addr: self.addr,
                    source,
                });
            }
        };
        drop(guard);
        match st {
            status::OK => Ok(Reply::Ok(payload)),
            status::MISSING => Ok(Reply::Missing),
            status::TIMEOUT => Ok(Reply::Timeout),
            status::FAILED => Failure::decode(&payload)
                .map(Reply::Failed)
                .ok_or_else(|| self.garbled()),
            status::ERROR => Err(StoreError::Refused {
                op: name,
                what: String::from_utf8_lossy(&payload).into_owned(),
            }),
            _ => Err(self.garbled()),
        }
    }

    fn garbled(&self) -> StoreError {
        StoreError::Protocol {
            addr: self.addr.to_string(),
            what: "garbled reply".into(),
        }
    }

    /// Sets `key` to `value`, replacing any value; wakes whoever waits for it.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.call("set", op::SET, key, value, 0, Duration::ZERO)?;
        Ok(())
    }

    /// Sets `key` to `value` unless it has a value already; returns the value it has now (so
    /// the first writer wins and everyone learns which value won).
    pub fn set_if_absent(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        match self.call(
            "set_if_absent",
            op::SET_IF_ABSENT,
            key,
            value,
            0,
            Duration::ZERO,
        )? {
            Reply::Ok(v) => Ok(v),
            _ => Err(self.garbled()),
        }
    }

    /// The value of `key`, waiting up to `timeout` for someone to set it. Fails with
    /// [`StoreError::Failed`] as soon as the job's failure is recorded.
    pub fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        match self.call("get", op::GET, key, &[], millis(timeout), timeout)? {
            Reply::Ok(v) => Ok(v),
            Reply::Failed(f) => Err(StoreError::Failed(f)),
            Reply::Timeout => Err(StoreError::Timeout {
                op: "get",
                key: key.to_string(),
                waited: timeout,
            }),
            Reply::Missing => Err(self.garbled()),
        }
    }

    /// The value of `key` if it has one, without waiting.
    pub fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.call("try_get", op::TRY_GET, key, &[], 0, Duration::ZERO)? {
            Reply::Ok(v) => Ok(Some(v)),
            Reply::Missing => Ok(None),
            _ => Err(self.garbled()),
        }
    }

    /// Adds `delta` to the counter `key` (0 if unset) and returns the new count. The count is
    /// stored as decimal text, so [`Store::get`] reads it as such.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        match self.call("add", op::ADD, key, &[], delta as u64, Duration::ZERO)? {
            Reply::Ok(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.garbled()),
            _ => Err(self.garbled()),
        }
    }

    /// Waits up to `timeout` until every key in `keys` has a value (or the job fails).
    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        match self.call(
            "wait",
            op::WAIT,
            "",
            &encode_keys(keys),
            millis(timeout),
            timeout,
        )? {
            Reply::Ok(_) => Ok(()),
            Reply::Failed(f) => Err(StoreError::Failed(f)),
            Reply::Timeout => Err(StoreError::Timeout {
                op: "wait",
                key: keys.join(", "),
                waited: timeout,
            }),
            Reply::Missing => Err(self.garbled()),
        }
    }

    /// Waits until `size` members have called `barrier(name, size, _)`. Reusable: the k-th
    /// `size` calls under one name form the k-th barrier (members must use it in lockstep).
    pub fn barrier(&self, name: &str, size: usize, timeout: Duration) -> Result<(), StoreError> {
        let size = size.max(1) as i64;
        let n = self.add(&format!("barrier/{name}/count"), 1)?;
        let generation = (n - 1) / size;
        let done = format!("barrier/{name}/done/{generation}");
        if n % size == 0 {
            self.set(&done, b"")?;
        }
        match self.wait(&[&done], timeout) {
            Err(StoreError::Timeout { waited, .. }) => {
                let count = self.add(&format!("barrier/{name}/count"), 0)?;
                Err(StoreError::Timeout {
                    op: "barrier",
                    key: format!("{name}: {} of {size} arrived", count - generation * size),
                    waited,
                })
            }
            r => r,
        }
    }

    /// Shares bytes from one member with all: the root passes `Some(value)` (published under
    /// `key`), the others `None` (and wait up to `timeout` for it). Every caller gets the value.
    /// This is how the CUDA backend's NCCL unique id (128 bytes) travels.
    pub fn broadcast(
        &self,
        key: &str,
        value: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, StoreError> {
        match value {
            Some(v) => {
                self.set(key, v)?;
                Ok(v.to_vec())
            }
            None => self.get(key, timeout),
        }
    }

    /// Records the job's failure (the first one recorded wins), waking every blocked request of
    /// every client with [`StoreError::Failed`]. Returns the record that stands.
    pub fn fail(&self, failure: &Failure) -> Result<Failure, StoreError> {
        match self.call("fail", op::FAIL, "", &failure.encode(), 0, Duration::ZERO)? {
            Reply::Ok(v) => Failure::decode(&v).ok_or_else(|| self.garbled()),
            _ => Err(self.garbled()),
        }
    }

    /// The job's failure record, if any.
    pub fn failure(&self) -> Result<Option<Failure>, StoreError> {
        match self.call("failure", op::FAILURE, "", &[], 0, Duration::ZERO)? {
            Reply::Ok(v) => Failure::decode(&v).map(Some).ok_or_else(|| self.garbled()),
            Reply::Missing => Ok(None),
            _ => Err(self.garbled()),
        }
    }

    /// Marks this connection as vital: if it drops without [`Store::close`] (its process or node
    /// died), the server records a failure saying "`label` lost its connection to the store".
    pub fn watch(&self, label: &str) -> Result<(), StoreError> {
        self.call("watch", op::WATCH, label, &[], 0, Duration::ZERO)?;
        Ok(())
    }

    /// Leaves cleanly (a watched connection stops being watched) and closes the connection.
    pub fn close(self) -> Result<(), StoreError> {
        self.call("close", op::BYE, "", &[], 0, Duration::ZERO)?;
        Ok(())
    }
}

/// The store as the rendezvous of a communicator's watchdog.
impl ferrotron_exec::Rendezvous for Store {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), String> {
        Store::set(self, key, value).map_err(|e| e.to_string())
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        Store::try_get(self, key).map_err(|e| e.to_string())
    }
}
