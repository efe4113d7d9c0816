//! Ranks as processes: the launcher behind `ferrotron launch` (like `torchrun`), the rendezvous
//! [`store`], the cross-process host collectives [`TcpGroup`] and the pipeline stages'
//! point-to-point [`TcpLink`]. Each process then runs one rank of the same rank program the
//! in-process launcher runs as threads (`ferrotron-exec`).
//!
//! ```text
//! node 0: launcher ── hosts the store (master-addr:master-port) ─┐
//!           ├─ worker rank 0 ─┐                                   │ set / get / add / wait,
//!           └─ worker rank 1 ─┤── TcpGroup sockets (full mesh) ───│ failure record
//! node 1: launcher ───────────┼───────────────────────────────────┘
//!           ├─ worker rank 2 ─┤
//!           └─ worker rank 3 ─┘
//! ```
//!
//! * [`launch`] runs on every node. It meets the other nodes' launchers through the store
//!   (hosted by node 0's, at `master_addr:master_port`), starts `nproc_per_node` workers, each
//!   told who it is in `FERROTRON_*` environment variables ([`WorkerEnv`]), relays their output
//!   line by line (`[rank R] …`), and watches them.
//! * A worker calls [`WorkerEnv::from_env`], connects to the store ([`WorkerEnv::connect_store`])
//!   and builds its communicators from it: [`TcpGroup::connect`] on the CPU backend; on the CUDA
//!   backend the NCCL unique id travels through [`Store::broadcast`]. With pipeline stages, it
//!   also joins the ranks of the other stages at its tensor- and data-parallel place with
//!   [`TcpLink::connect`] (host tensors; a device's go through host copies).
//! * Failure: a rank that exits non-zero (or is killed) makes its launcher record the job's
//!   [`Failure`] in the store, stop its other workers (SIGTERM, SIGKILL after a grace period) and
//!   exit with an error naming the rank. A worker that exits with [`PEER_FAILED_EXIT`] says it
//!   only lost a peer: the launcher then waits a moment for the cause to exit and names it. Every other launcher sees the record (or loses node 0)
//!   within a fraction of a second and does the same; a worker blocked in a `TcpGroup`
//!   collective sees it too, or loses its peer, and returns an error. A launcher exits cleanly
//!   only when every rank of every node exited 0.
//! * Other launchers: a rank that `srun`, `torchrun` or `mpirun` started (no `FERROTRON_*`
//!   variables) reads their variables instead ([`cluster`]: [`RankEnv::from_env`]); there
//!   global rank 0 hosts the store in its own process, and [`RankEnv::join`] /
//!   [`JobStore::leave`] keep it up until every rank is done with it.
//! * Orphans: each worker runs in its own process group, which is killed when the worker exits
//!   or is stopped; on Linux the worker itself also dies with the launcher, even if the launcher
//!   is SIGKILLed.
//!
//! The store, the group and the link sockets are unauthenticated plain TCP, like `torchrun`'s: on several
//! nodes node 0's store listens on every interface, so run jobs on a trusted network. The store
//! serves each connection on a thread of node 0's launcher (a worker opens one, plus one per
//! `TcpGroup` and one for its `TcpLink`), which suits jobs of up to a few thousand ranks.
//!
//! ```no_run
//! use ferrotron_exec::{HostCollectives, ReduceOp};
//! use ferrotron_launch::{TcpGroup, WorkerEnv};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! if let Some(env) = WorkerEnv::from_env()? {
//!     let store = env.connect_store()?;
//!     let group = TcpGroup::connect(&store, "tp/dp0", env.rank, env.world_size, env.timeout)?;
//!     let mut grads = vec![1.0f32; 1000];
//!     group.all_reduce(env.rank, &mut grads, ReduceOp::Sum)?;
//! }
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod store;
pub mod tcp_group;
pub mod tcp_link;

pub use cluster::{Convention, JobStore, RankEnv};
pub use store::{Failure, Store, StoreError, StoreServer};
pub use tcp_group::TcpGroup;
pub use tcp_link::TcpLink;

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The worker's global rank, `0..FERROTRON_WORLD_SIZE`.
pub const ENV_RANK: &str = "FERROTRON_RANK";
/// Workers in the job.
pub const ENV_WORLD_SIZE: &str = "FERROTRON_WORLD_SIZE";
/// The worker's rank on its node (its GPU, on the CUDA backend).
pub const ENV_LOCAL_RANK: &str = "FERROTRON_LOCAL_RANK";
/// Workers on the node.
pub const ENV_LOCAL_WORLD_SIZE: &str = "FERROTRON_LOCAL_WORLD_SIZE";
/// The node's rank, `0..FERROTRON_NNODES`.
pub const ENV_NODE_RANK: &str = "FERROTRON_NODE_RANK";
/// Nodes in the job.
pub const ENV_NNODES: &str = "FERROTRON_NNODES";
/// The store's host (node 0).
pub const ENV_MASTER_ADDR: &str = "FERROTRON_MASTER_ADDR";
/// The store's port.
pub const ENV_MASTER_PORT: &str = "FERROTRON_MASTER_PORT";
/// The same for every worker of one job, different between jobs.
pub const ENV_RUN_ID: &str = "FERROTRON_RUN_ID";
/// Seconds a worker should wait for peers (store requests, group set-up, collectives).
pub const ENV_TIMEOUT: &str = "FERROTRON_TIMEOUT_SECS";

/// The exit code by which a worker says it stopped only because another rank failed (as
/// `ferrotron` does): the launcher then names another rank, one that failed on its own account,
/// as the job's failure when one exits within the grace period.
pub const PEER_FAILED_EXIT: u8 = 86;

/// How often a launcher checks its workers and the store.
const POLL: Duration = Duration::from_millis(50);
/// How long a launcher whose first failed worker only lost a peer waits for the cause to exit.
const SETTLE: Duration = Duration::from_secs(2);
/// How often a launcher polls the store's failure record.
const STORE_POLL: Duration = Duration::from_millis(100);

/// What `ferrotron launch` failed at.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The arguments do not describe a job (`--node-rank 2` of `--nnodes 2`, …).
    #[error("{0}")]
    Config(String),
    /// The nodes did not meet (one missing, or started with different arguments).
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// A `FERROTRON_*` variable a worker was given does not parse.
    #[error("{var}={value:?}: {what}")]
    Env {
        /// The variable.
        var: &'static str,
        /// The value it has.
        value: String,
        /// What is wrong with it.
        what: String,
    },
    /// A variable of another launcher's convention (`srun`'s, `torchrun`'s, `mpirun`'s) is
    /// missing, does not parse, or contradicts another.
    #[error("{convention}: {var}{}: {what}", .value.as_ref().map(|v| format!("={v:?}")).unwrap_or_default())]
    Cluster {
        /// Whose variables were read.
        convention: Convention,
        /// The variable.
        var: &'static str,
        /// Its value, when it is set.
        value: Option<String>,
        /// What is wrong with it.
        what: String,
    },
    /// Talking to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A worker could not be started.
    #[error("cannot start worker `{program}`: {source}")]
    Spawn {
        /// The program that could not be started.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// One of this node's ranks failed; the others were stopped.
    #[error("{0}; stopped the other ranks")]
    RankFailed(Failure),
    /// The job failed elsewhere (another node's rank, a lost node); this node's ranks were
    /// stopped.
    #[error("{0}; stopped this node's ranks")]
    JobFailed(Failure),
    /// The launcher was interrupted (Ctrl-C, SIGTERM); every rank was stopped.
    #[error("interrupted by signal {0}; stopped every rank")]
    Interrupted(i32),
}

/// A worker's identity, as the launcher passes it in `FERROTRON_*` environment variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank, `0..world_size`: node-major (`node_rank × local_world_size + local_rank`).
    pub rank: usize,
    /// Workers in the job.
    pub world_size: usize,
    /// Rank on this node (the GPU to use, on the CUDA backend).
    pub local_rank: usize,
    /// Workers on this node.
    pub local_world_size: usize,
    /// This node's index, 0..nnodes (node 0 hosts the store).
    pub node_rank: usize,
    /// Nodes in the job.
    pub nnodes: usize,
    /// The store's host.
    pub master_addr: String,
    /// The store's port.
    pub master_port: u16,
    /// The job's id (the same on every node).
    pub run_id: String,
    /// How long to wait for peers (store requests, group set-up, each collective).
    pub timeout: Duration,
}

impl WorkerEnv {
    /// The identity of this process if a launcher started it (`Ok(None)` when
    /// `FERROTRON_RANK` is not set), or an error naming a variable that does not parse.
    pub fn from_env() -> Result<Option<WorkerEnv>, LaunchError> {
        WorkerEnv::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`WorkerEnv::from_env`] over any source of variables.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<WorkerEnv>, LaunchError> {
        if var(ENV_RANK).is_none() {
            return Ok(None);
        }
        let get = |name: &'static str| {
            var(name).ok_or_else(|| LaunchError::Env {
                var: name,
                value: String::new(),
                what: format!("not set (but {ENV_RANK} is)"),
            })
        };
        let num = |name: &'static str| -> Result<u64, LaunchError> {
            let value = get(name)?;
            value.trim().parse().map_err(|e| LaunchError::Env {
                var: name,
                value: value.clone(),
                what: format!("not a number ({e})"),
            })
        };
        let idx = |name: &'static str| num(name).map(|n| n as usize);
        let env = WorkerEnv {
            rank: idx(ENV_RANK)?,
            world_size: idx(ENV_WORLD_SIZE)?,
            local_rank: idx(ENV_LOCAL_RANK)?,
            local_world_size: idx(ENV_LOCAL_WORLD_SIZE)?,
            node_rank: idx(ENV_NODE_RANK)?,
            nnodes: idx(ENV_NNODES)?,
            master_addr: get(ENV_MASTER_ADDR)?,
            master_port: {
                let p = num(ENV_MASTER_PORT)?;
                u16::try_from(p).map_err(|_| LaunchError::Env {
                    var: ENV_MASTER_PORT,
                    value: p.to_string(),
                    what: "not a port".into(),
                })?
            },
            run_id: get(ENV_RUN_ID)?,
            timeout: Duration::from_secs(num(ENV_TIMEOUT)?),
        };
        let bad = |var: &'static str, value: usize, what: String| LaunchError::Env {
            var,
            value: value.to_string(),
            what,
        };
        if env.rank >= env.world_size {
            return Err(bad(
                ENV_RANK,
                env.rank,
                format!("not below the world size {}", env.world_size),
            ));
        }
        if env.local_rank >= env.local_world_size {
            let what = format!("not below the local world size {}", env.local_world_size);
            return Err(bad(ENV_LOCAL_RANK, env.local_rank, what));
        }
        if env.node_rank >= env.nnodes {
            let what = format!("not below the number of nodes {}", env.nnodes);
            return Err(bad(ENV_NODE_RANK, env.node_rank, what));
        }
        Ok(Some(env))
    }

    /// The variables that describe this worker (what the launcher sets).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            (ENV_RANK, self.rank.to_string()),
            (ENV_WORLD_SIZE, self.world_size.to_string()),
            (ENV_LOCAL_RANK, self.local_rank.to_string()),
            (ENV_LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (ENV_NODE_RANK, self.node_rank.to_string()),
            (ENV_NNODES, self.nnodes.to_string()),
            (ENV_MASTER_ADDR, self.master_addr.clone()),
            (ENV_MASTER_PORT, self.master_port.to_string()),
            (ENV_RUN_ID, self.run_id.clone()),
            (ENV_TIMEOUT, self.timeout.as_secs().to_string()),
        ]
    }

    /// The store's address, `host:port`.
    pub fn store_addr(&self) -> String {
        host_port(&self.master_addr, self.master_port)
    }

    /// Connects to the job's store (waiting up to the job's timeout for it).
    pub fn connect_store(&self) -> Result<Store, StoreError> {
        Store::connect(&self.store_addr(), self.timeout)
    }
}

/// `host:port`, with an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One node's part of a job: what `ferrotron launch` parses its arguments into.
#[derive(Clone, Debug)]
pub struct LaunchConfig {
    /// Workers on this node.
    pub nproc_per_node: usize,
    /// Nodes in the job (each runs its own launcher).
    pub nnodes: usize,
    /// This node's rank; node 0 hosts the store.
    pub node_rank: usize,
    /// Where node 0 is reachable from every node (its hostname or IP).
    pub master_addr: String,
    /// The store's port; 0 picks a free one (a single node only: the others could not know it).
    pub master_port: u16,
    /// The worker program (the `ferrotron` binary itself, or any program with `--exec`).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How long nodes wait for each other at start-up; passed on to workers
    /// (`FERROTRON_TIMEOUT_SECS`) as their bound on every wait for peers.
    pub timeout: Duration,
    /// How long stopped workers get between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Prefix each line of a worker's output with `[rank R] `.
    pub prefix_output: bool,
    /// The job's id (default: one node 0 makes up).
    pub run_id: Option<String>,
}

impl LaunchConfig {
    /// A single-node job of `nproc_per_node` workers running `program args…`, with defaults:
    /// store on 127.0.0.1 at a free port, 300 s timeout, 5 s grace, prefixed output.
    pub fn new(program: impl Into<PathBuf>, args: Vec<OsString>, nproc_per_node: usize) -> Self {
        LaunchConfig {
            nproc_per_node,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            program: program.into(),
            args,
            timeout: Duration::from_secs(300),
            grace: Duration::from_secs(5),
            prefix_output: true,
            run_id: None,
        }
    }

    fn check(&self) -> Result<usize, LaunchError> {
        let err = |s: String| Err(LaunchError::Config(s));
        if self.nproc_per_node == 0 {
            return err("--nproc-per-node must be at least 1".into());
        }
        if self.nnodes == 0 {
            return err("--nnodes must be at least 1".into());
        }
        if self.node_rank >= self.nnodes {
            return err(format!(
                "--node-rank {} is not below --nnodes {} (node ranks are 0..{})",
                self.node_rank, self.nnodes, self.nnodes
            ));
        }
        if self.nnodes > 1 && self.master_port == 0 {
            return err(format!(
                "--master-port 0 (any free port) works on a single node only: give the {} \
                 nodes a port to meet at",
                self.nnodes
            ));
        }
        if self.master_addr.is_empty() {
            return err("--master-addr is empty".into());
        }
        if self.program.as_os_str().is_empty() {
            return err("no program to launch".into());
        }
        self.nproc_per_node
            .checked_mul(self.nnodes)
            .ok_or_else(|| LaunchError::Config("too many processes".into()))
    }
}

/// Runs this node's part of a job (see the module docs): returns `Ok` once every rank of every
/// node exited 0, an error naming the failed rank otherwise. Installs handlers for SIGINT,
/// SIGTERM and SIGHUP while workers run (so that Ctrl-C stops the workers too), restoring the
/// old ones before returning. Workers get /dev/null as stdin.
pub fn launch(cfg: &LaunchConfig) -> Result<(), LaunchError> {
    let world_size = cfg.check()?;
    // Node 0 hosts the store for the whole job; every launcher (node 0's too) is a client.
    let server = if cfg.node_rank == 0 {
        let bind = if cfg.nnodes == 1 {
            host_port(&cfg.master_addr, cfg.master_port)
        } else if cfg.master_addr.contains(':') {
            host_port("::", cfg.master_port)
        } else {
            host_port("0.0.0.0", cfg.master_port)
        };
        Some(StoreServer::bind(&bind)?)
    } else {
        None
    };
    let (store_addr, master_addr, master_port) = match &server {
        Some(s) if cfg.nnodes == 1 => {
            let ip = s.addr().ip().to_string();
            (s.addr().to_string(), ip, s.addr().port())
        }
        Some(s) => {
            let local = match s.addr() {
                a if a.is_ipv6() => host_port("::1", a.port()),
                a => host_port("127.0.0.1", a.port()),
            };
            (local, cfg.master_addr.clone(), s.addr().port())
        }
        None => (
            host_port(&cfg.master_addr, cfg.master_port),
            cfg.master_addr.clone(),
            cfg.master_port,
        ),
    };
    let store = Store::connect(&store_addr, cfg.timeout)?;
    store.watch(&format!("node {}'s launcher", cfg.node_rank))?;
    let run_id = rendezvous(cfg, &store)?;

    // Only now: until there are workers to stop, Ctrl-C may simply end the launcher (its
    // watched store connection drops, which stops the other nodes).
    let signals = signals::Guard::install();
    let mut workers = Workers::new();
    for local_rank in 0..cfg.nproc_per_node {
        let env = WorkerEnv {
            rank: cfg.node_rank * cfg.nproc_per_node + local_rank,
            world_size,
            local_rank,
            local_world_size: cfg.nproc_per_node,
            node_rank: cfg.node_rank,
            nnodes: cfg.nnodes,
            master_addr: master_addr.clone(),
            master_port,
            run_id: run_id.clone(),
            timeout: cfg.timeout,
        };
        let rank = env.rank;
        if let Err(source) = workers.spawn(cfg, env) {
            let err = LaunchError::Spawn {
                program: cfg.program.display().to_string(),
                source,
            };
            let _ = store.fail(&Failure {
                rank: Some(rank),
                why: format!("node {}: {err}", cfg.node_rank),
            });
            workers.stop(cfg.grace);
            linger(cfg);
            return Err(err);
        }
    }

    let result = match workers.monitor(&store, &signals) {
        Outcome::Done => finish(cfg, &store, &signals),
        Outcome::RankFailed(f) => {
            let f = workers.settle(f, cfg.grace.min(SETTLE));
            match store.fail(&f) {
                // Another node's failure came first: ours is most likely its consequence (a
                // worker that lost a peer), so report the cause.
                Ok(first) if first != f => {
                    eprintln!("ferrotron launch: {f}, after the job had failed");
                    Err(LaunchError::JobFailed(first))
                }
                _ => Err(LaunchError::RankFailed(f)),
            }
        }
        Outcome::JobFailed(f) => Err(LaunchError::JobFailed(f)),
        Outcome::Interrupted(sig) => {
            let _ = store.fail(&Failure {
                rank: None,
                why: format!(
                    "node {}'s launcher was interrupted (signal {sig})",
                    cfg.node_rank
                ),
            });
            Err(LaunchError::Interrupted(sig))
        }
    };
    workers.stop(cfg.grace);
    if result.is_err() {
        linger(cfg);
    }
    let _ = store.close();
    drop(server);
    result
}

/// Node 0 keeps the store a moment after a failure, so the other nodes read the failure record
/// rather than only losing the connection.
fn linger(cfg: &LaunchConfig) {
    if cfg.node_rank == 0 && cfg.nnodes > 1 {
        std::thread::sleep(3 * STORE_POLL);
    }
}

/// Meets the other nodes' launchers: checks they agree on the job's shape and that no node rank
/// is taken twice, agrees on the run id, and waits (up to the timeout) until all have joined.
fn rendezvous(cfg: &LaunchConfig, store: &Store) -> Result<String, LaunchError> {
    let shape = format!(
        "--nnodes {} --nproc-per-node {}",
        cfg.nnodes, cfg.nproc_per_node
    );
    let agreed = store.set_if_absent("launch/shape", shape.as_bytes())?;
    if agreed != shape.as_bytes() {
        return Err(LaunchError::Rendezvous(format!(
            "node {} was started with `{shape}`, but another node with `{}`",
            cfg.node_rank,
            String::from_utf8_lossy(&agreed)
        )));
    }
    if store.add(&format!("launch/node/{}", cfg.node_rank), 1)? != 1 {
        return Err(LaunchError::Rendezvous(format!(
            "node rank {} joined twice (two launchers with --node-rank {}?)",
            cfg.node_rank, cfg.node_rank
        )));
    }
    let proposed = cfg.run_id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}-{:x}", nanos as u64, std::process::id())
    });
    let run_id =
        String::from_utf8_lossy(&store.set_if_absent("launch/run_id", proposed.as_bytes())?)
            .into_owned();
    if cfg.run_id.is_some() && run_id != proposed {
        return Err(LaunchError::Rendezvous(format!(
            "this node has run id `{proposed}`, another `{run_id}`"
        )));
    }
    match store.barrier("launch/join", cfg.nnodes, cfg.timeout) {
        Ok(()) => Ok(run_id),
        Err(StoreError::Timeout { key, waited, .. }) => Err(LaunchError::Rendezvous(format!(
            "not every node joined within {waited:?} ({}); start one launcher per node, with \
             --node-rank 0..{} and the same --master-addr and --master-port",
            key.rsplit(": ")
                .next()
                .unwrap_or(&key)
                .replace("arrived", "nodes joined"),
            cfg.nnodes
        ))),
        Err(e) => Err(e.into()),
    }
}

/// A worker's exit, as its waiter thread saw it: index, when, status.
type Exit = (usize, Instant, io::Result<ExitStatus>);

/// A running worker.
struct Worker {
    env: WorkerEnv,
    pid: u32,
    /// Set once its waiter reported the exit (and reaped it).
    status: Option<ExitStatus>,
    waiter: Option<JoinHandle<()>>,
    relays: Vec<JoinHandle<()>>,
}

impl Worker {
    fn describe(&self) -> String {
        format!(
            "rank {} (node {}, local rank {}, pid {})",
            self.env.rank, self.env.node_rank, self.env.local_rank, self.pid
        )
    }
}

/// This node's workers. Each has a waiter thread blocked in `wait` that reports its exit with
/// a timestamp, so when one rank's death makes others fail (they lose a peer) a few
/// milliseconds later, the first to die is the one reported.
struct Workers {
    list: Vec<Worker>,
    tx: mpsc::Sender<Exit>,
    exits: mpsc::Receiver<Exit>,
}

impl Workers {
    fn new() -> Workers {
        let (tx, exits) = mpsc::channel();
        Workers {
            list: Vec::new(),
            tx,
            exits,
        }
    }

    fn spawn(&mut self, cfg: &LaunchConfig, env: WorkerEnv) -> io::Result<()> {
        let mut cmd = Command::new(&cfg.program);
        cmd.args(&cfg.args).envs(env.vars()).stdin(Stdio::null());
        if cfg.prefix_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        #[cfg(unix)]
        {
            // Its own process group, so stopping a worker stops whatever it started too.
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            let launcher = std::process::id() as libc::pid_t;
            // SAFETY: the closure runs in the forked child before exec, and calls only
            // async-signal-safe functions (prctl, getppid) and allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    // If the launcher dies (even by SIGKILL), so does the worker.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // It may have died before the line above.
                    if libc::getppid() != launcher {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn()?;
        let pid = child.id();
        let mut relays = Vec::new();
        let prefix = format!("[rank {}] ", env.rank);
        let mut start = || -> io::Result<()> {
            if let Some(out) = child.stdout.take() {
                relays.push(relay(out, prefix.clone(), false)?);
            }
            if let Some(err) = child.stderr.take() {
                relays.push(relay(err, prefix.clone(), true)?);
            }
            Ok(())
        };
        if let Err(e) = start() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let index = self.list.len();
        let tx = self.tx.clone();
        let waiter = std::thread::Builder::new()
            .name(format!("wait-rank-{}", env.rank))
            .spawn(move || {
                let status = child.wait();
                let at = Instant::now();
                // Whatever it left running in its group goes too.
                signal_group(pid, signals::KILL);
                let _ = tx.send((index, at, status));
            });
        let waiter = match waiter {
            Ok(w) => w,
            Err(e) => {
                signal_group(pid, signals::KILL);
                return Err(e);
            }
        };
        self.list.push(Worker {
            env,
            pid,
            status: None,
            waiter: Some(waiter),
            relays,
        });
        Ok(())
    }

    fn running(&self) -> usize {
        self.list.iter().filter(|w| w.status.is_none()).count()
    }

    /// Waits up to `wait` for exits; records them and returns the earliest failure among them,
    /// a rank's own failure before one that only says a peer failed ([`PEER_FAILED_EXIT`]).
    fn collect(&mut self, wait: Duration) -> Option<Failure> {
        let mut batch: Vec<Exit> = self.exits.recv_timeout(wait).into_iter().collect();
        batch.extend(self.exits.try_iter());
        batch.sort_by_key(|(_, at, _)| *at);
        let mut failure = None;
        let mut downstream = None;
        for (i, _, status) in batch {
            let w = &mut self.list[i];
            let mut secondary = false;
            let why = match status {
                Ok(st) => {
                    w.status = Some(st);
                    if st.success() {
                        continue;
                    }
                    secondary = st.code() == Some(i32::from(PEER_FAILED_EXIT));
                    describe_status(st)
                }
                Err(e) => {
                    // It cannot be waited for: it counts as failed (and stopped: its group is
                    // killed).
                    w.status = Some(ExitStatus::default());
                    format!("cannot be waited for ({e})")
                }
            };
            let f = Failure {
                rank: Some(w.env.rank),
                why: format!("{} failed: {why}", w.describe()),
            };
            if secondary {
                downstream.get_or_insert(f);
            } else {
                failure.get_or_insert(f);
            }
        }
        failure.or(downstream)
    }

    /// After `first` failed: waits up to `settle` for the other workers to exit on their own (a
    /// worker that lost a peer stops within moments, and its last words, or the cause's, are
    /// worth more than a SIGTERM), then names the cause: the first rank that failed on its own
    /// account, else `first`.
    fn settle(&mut self, first: Failure, settle: Duration) -> Failure {
        if !self.stopped_by_peer(&first) {
            return first;
        }
        let deadline = Instant::now() + settle;
        while self.running() > 0 && Instant::now() < deadline {
            let wait = POLL.min(deadline.saturating_duration_since(Instant::now()));
            if let Some(f) = self.collect(wait) {
                if !self.stopped_by_peer(&f) {
                    return f;
                }
            }
        }
        first
    }

    /// Whether the failed rank said it only stopped because a peer failed.
    fn stopped_by_peer(&self, f: &Failure) -> bool {
        self.list
            .iter()
            .find(|w| Some(w.env.rank) == f.rank)
            .and_then(|w| w.status)
            .is_some_and(|st| st.code() == Some(i32::from(PEER_FAILED_EXIT)))
    }

    /// Watches the workers, the store's failure record and our signals until one says stop.
    fn monitor(&mut self, store: &Store, signals: &signals::Guard) -> Outcome {
        let mut polled = Instant::now();
        loop {
            if let Some(f) = self.collect(POLL) {
                return Outcome::RankFailed(f);
            }
            if self.running() == 0 {
                return Outcome::Done;
            }
            if let Some(sig) = signals.caught() {
                return Outcome::Interrupted(sig);
            }
            if polled.elapsed() >= STORE_POLL {
                polled = Instant::now();
                match store.failure() {
                    Ok(None) => {}
                    Ok(Some(f)) => return Outcome::JobFailed(f),
                    Err(e) => return Outcome::JobFailed(lost_store(e)),
                }
            }
        }
    }

    /// Stops every worker still running (SIGTERM to its process group, SIGKILL after
    /// `grace`), waits for them all and (briefly) for their output to drain.
    fn stop(&mut self, grace: Duration) {
        let _ = self.collect(Duration::ZERO);
        for w in self.list.iter().filter(|w| w.status.is_none()) {
            signal_group(w.pid, signals::TERM);
        }
        let deadline = Instant::now() + grace;
        while self.running() > 0 && Instant::now() < deadline {
            let _ = self.collect(deadline.saturating_duration_since(Instant::now()));
        }
        if self.running() > 0 {
            for w in self.list.iter().filter(|w| w.status.is_none()) {
                signal_group(w.pid, signals::KILL);
            }
            // SIGKILL cannot be ignored; the bound only guards against a process stuck in the
            // kernel.
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.running() > 0 && Instant::now() < deadline {
                let _ = self.collect(deadline.saturating_duration_since(Instant::now()));
            }
        }
        // The pipes close once every process holding them is gone: normally at once. A process
        // that left its group (setsid) could hold one forever, so the wait is bounded.
        let deadline = Instant::now() + Duration::from_secs(2);
        for w in &mut self.list {
            let threads = w
                .waiter
                .take()
                .into_iter()
                .chain(std::mem::take(&mut w.relays));
            for t in threads {
                while !t.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
    }
}

/// Sends `sig` to the process group `pgid` (a worker's pid: the waiter reaps the worker only
/// after it is gone, and signals its group at once, so the id cannot have been reused).
fn signal_group(pgid: u32, sig: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-(pgid as libc::pid_t), sig);
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        // No libc here: the `kill` utility does the same.
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(format!("-{pgid}"))
            .stderr(Stdio::null())
            .status();
    }
    #[cfg(not(unix))]
    {
        let _ = (pgid, sig);
    }
}

/// Copies a worker's output to ours, line by line, each line prefixed (one write per line, so
/// lines of different ranks never interleave).
fn relay(
    src: impl Read + Send + 'static,
    prefix: String,
    stderr: bool,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(prefix.trim().to_string())
        .spawn(move || {
            let mut src = BufReader::new(src);
            let mut line = Vec::new();
            loop {
                line.clear();
                line.extend_from_slice(prefix.as_bytes());
                // At most 64 KiB at a time: a binary stream without newlines stays bounded.
                match src.by_ref().take(64 << 10).read_until(b'\n', &mut line) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                // Write errors (our output closed) are ignored: the worker must not block on a
                // full pipe, so keep draining.
                if stderr {
                    let _ = io::stderr().lock().write_all(&line);
                } else {
                    let mut out = io::stdout().lock();
                    let _ = out.write_all(&line);
                    let _ = out.flush();
                }
            }
        })
}

enum Outcome {
    /// Every local rank exited 0.
    Done,
    RankFailed(Failure),
    JobFailed(Failure),
    Interrupted(i32),
}

fn describe_status(st: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = st.signal() {
            return format!("killed by signal {sig}{}", signals::name(sig));
        }
    }
    st.to_string()
}

fn lost_store(e: StoreError) -> Failure {
    Failure {
        rank: None,
        why: format!("lost the rendezvous store on node 0 ({e})"),
    }
}

/// This node's ranks all succeeded: say so, and wait for the other nodes' verdicts (so that the
/// launcher exits 0 only if every rank everywhere did). Node 0 keeps the store up until every
/// other launcher has read the outcome.
fn finish(cfg: &LaunchConfig, store: &Store, signals: &signals::Guard) -> Result<(), LaunchError> {
    store.set(&format!("launch/finished/{}", cfg.node_rank), b"")?;
    let keys: Vec<String> = (0..cfg.nnodes)
        .map(|n| format!("launch/finished/{n}"))
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    loop {
        match store.wait(&keys, Duration::from_millis(500)) {
            Ok(()) => break,
            Err(StoreError::Timeout { .. }) => {
                if let Some(sig) = signals.caught() {
                    let _ = store.fail(&Failure {
                        rank: None,
                        why: format!(
                            "node {}'s launcher was interrupted (signal {sig})",
                            cfg.node_rank
                        ),
                    });
                    return Err(LaunchError::Interrupted(sig));
                }
            }
            Err(StoreError::Failed(f)) => return Err(LaunchError::JobFailed(f)),
            Err(e) => return Err(LaunchError::JobFailed(lost_store(e))),
        }
    }
    if cfg.node_rank != 0 {
        store.add("launch/exited", 1)?;
    } else {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5)
            && store.add("launch/exited", 0)? < cfg.nnodes as i64 - 1
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Signals: the launcher's own (SIGINT, SIGTERM, SIGHUP: stop the workers, then exit) and the
/// ones it sends.
#[cfg(target_os = "linux")]
mod signals {
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Mutex;

    pub const TERM: i32 = libc::SIGTERM;
    pub const KILL: i32 = libc::SIGKILL;

    static CAUGHT: AtomicI32 = AtomicI32::new(0);

    /// Live guards, and the dispositions the first one replaced (restored by the last one):
    /// launches may overlap in one process (tests do).
    static INSTALLED: Mutex<(usize, Vec<(libc::c_int, libc::sigaction)>)> =
        Mutex::new((0, Vec::new()));

    extern "C" fn on_signal(sig: libc::c_int) {
        // Only an atomic store: async-signal-safe.
        CAUGHT.store(sig, Ordering::SeqCst);
    }

    /// Catches the signals while any guard is alive.
    pub struct Guard;

    impl Guard {
        pub fn install() -> Guard {
            let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
            if installed.0 == 0 {
                CAUGHT.store(0, Ordering::SeqCst);
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    // SAFETY: sigaction is plain data (all-zero is valid); the handler only
                    // stores to an atomic; `sigaction` gets valid pointers.
                    unsafe {
                        let mut new: libc::sigaction = std::mem::zeroed();
                        new.sa_sigaction =
                            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                        new.sa_flags = libc::SA_RESTART;
                        libc::sigemptyset(&mut new.sa_mask);
                        let mut prev: libc::sigaction = std::mem::zeroed();
                        if libc::sigaction(sig, &new, &mut prev) == 0 {
                            installed.1.push((sig, prev));
                        }
                    }
                }
            }
            installed.0 += 1;
            Guard
        }

        pub fn caught(&self) -> Option<i32> {
            match CAUGHT.load(Ordering::SeqCst) {
                0 => None,
                s => Some(s),
            }
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
            installed.0 -= 1;
            if installed.0 == 0 {
                for (sig, prev) in std::mem::take(&mut installed.1) {
                    // SAFETY: restores a disposition sigaction gave us.
                    unsafe {
                        libc::sigaction(sig, &prev, std::ptr::null_mut());
                    }
                }
            }
        }
    }

    /// " (SIGKILL)" and the like, for messages.
    pub fn name(sig: i32) -> &'static str {
        match sig {
            libc::SIGHUP => " (SIGHUP)",
            libc::SIGINT => " (SIGINT)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGBUS => " (SIGBUS)",
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGTERM => " (SIGTERM)",
            _ => "",
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod signals {
    pub const TERM: i32 = 15;
    pub const KILL: i32 = 9;

    pub struct Guard;

    impl Guard {
        pub fn install() -> Guard {
            Guard
        }

        pub fn caught(&self) -> Option<i32> {
            None
        }
    }

    #[allow(dead_code)]
    pub fn name(_sig: i32) -> &'static str {
        ""
    }
}
