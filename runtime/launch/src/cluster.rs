//! Ranks started by another launcher: Slurm's `srun`, `torchrun`, Open MPI's `mpirun`, or an
//! MPICH-style `mpiexec` (PMI). Each launcher tells its processes who they are in variables of
//! its own; [`RankEnv::from_env`] reads whichever convention applies into the [`WorkerEnv`] that
//! `ferrotron launch` would have passed in `FERROTRON_*` variables, so the rank program cannot
//! tell the difference. [`RankEnv::join`] then meets the job's rendezvous [`store`](crate::store).
//!
//! No ferrotron launcher runs to host that store, so global rank 0 hosts it in its own process
//! (as torch's `TCPStore` does under `torchrun`), listening at `MASTER_ADDR:MASTER_PORT`; every
//! rank, rank 0 included, connects to it there as a client, the others retrying until the
//! timeout. The store must outlive every rank's use of it (groups poll its failure record until
//! their last collective), so the ranks leave through [`JobStore::leave`]: each counts itself
//! out, and rank 0 keeps the store up until all have (or, once the job has failed, a moment
//! for the others to read why).
//!
//! ```text
//! srun / torchrun / mpirun ─┬─ rank 0 ── hosts the store ◄─┐ connect (watched), groups,
//!                           ├─ rank 1 ─────────────────────┤ failure record,
//!                           └─ rank N-1 ───────────────────┘ "left" count at exit
//! ```
//!
//! # Which variables
//!
//! The first convention whose trigger variable is set applies:
//!
//! 1. `ferrotron launch`: `FERROTRON_RANK` ([`WorkerEnv::from_vars`]); the launcher hosts the
//!    store.
//! 2. `torchrun`: `RANK`, with `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`,
//!    `MASTER_PORT`, and `GROUP_RANK`, `GROUP_WORLD_SIZE`, `TORCHELASTIC_RUN_ID` when set. When
//!    torchrun's agent already hosts its own store at `MASTER_PORT`
//!    (`TORCHELASTIC_USE_AGENT_STORE=True`), ferrotron's listens at `MASTER_PORT + 1`.
//! 3. Slurm, inside a job step that `srun` started (`SLURM_PROCID` and `SLURM_STEP_ID`; the
//!    batch script itself is no such step, and runs every rank as threads): `SLURM_STEP_NUM_TASKS` (else
//!    `SLURM_NTASKS`), `SLURM_LOCALID`, `SLURM_NODEID`, `SLURM_STEP_NUM_NODES` (else
//!    `SLURM_NNODES`), `SLURM_STEP_TASKS_PER_NODE` (else `SLURM_NTASKS_PER_NODE`, else
//!    `SLURM_TASKS_PER_NODE`). The store's host is `MASTER_ADDR` if set, else the first host of
//!    `SLURM_STEP_NODELIST` (else `SLURM_JOB_NODELIST`); its port `MASTER_PORT` if set, else
//!    [`slurm_port`] of `SLURM_JOB_ID` and `SLURM_STEP_ID`.
//! 4. Open MPI: `OMPI_COMM_WORLD_RANK`, `_SIZE`, `_LOCAL_RANK`, `_LOCAL_SIZE`; `MASTER_ADDR` and
//!    `MASTER_PORT` are required (`mpirun -x MASTER_ADDR=… -x MASTER_PORT=…`).
//! 5. PMI (MPICH's and Intel MPI's Hydra): `PMI_RANK`, `PMI_SIZE`, `MPI_LOCALRANKID`,
//!    `MPI_LOCALNRANKS`; `MASTER_ADDR` and `MASTER_PORT` required.
//!
//! One exception to the order: `mpirun` inside a Slurm allocation starts its ranks from a job
//! step of its own daemons, so they inherit that step's `SLURM_*` variables (one task per node).
//! When an MPI convention's rank or size disagrees with Slurm's, the MPI one describes this
//! process and wins; when they agree (`srun --mpi=pmi2` sets both), Slurm's are read.
//!
//! `FERROTRON_TIMEOUT_SECS`, if set, bounds every wait for peers under any launcher (default
//! 300 s). The conventions that give no node index (the MPI ones, torchrun without
//! `GROUP_RANK`) get one derived as if ranks were placed node by node; it only names the node in
//! messages. Every variable that is missing, does not parse or contradicts another is a
//! [`LaunchError::Cluster`] naming it and the convention.

use std::time::{Duration, Instant};

use crate::store::{Failure, Store, StoreError, StoreServer};
use crate::{host_port, LaunchError, WorkerEnv, ENV_TIMEOUT};

/// The timeout when `FERROTRON_TIMEOUT_SECS` is not set (`ferrotron launch`'s default too).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Where [`slurm_port`] puts the store: `SLURM_PORT_BASE..SLURM_PORT_BASE + 10000`.
pub const SLURM_PORT_BASE: u16 = 20000;
/// How long rank 0 keeps the store up once the job has failed, for the other ranks to read the
/// failure record rather than only lose the store.
const LINGER: Duration = Duration::from_secs(2);
/// How often rank 0 counts the ranks that left.
const LEAVE_POLL: Duration = Duration::from_millis(20);
/// More hosts than this in a Slurm host list is taken for a typo (`node[0-99999999]`).
const MAX_HOSTS: usize = 1 << 20;

/// Which launcher started this process, as told by the variables it set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Convention {
    /// `ferrotron launch` (`FERROTRON_*`); it hosts the store.
    Ferrotron,
    /// `torchrun` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, …).
    Torchrun,
    /// Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, …).
    Slurm,
    /// Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// A PMI launcher: MPICH's or Intel MPI's `mpiexec` (`PMI_RANK`, `PMI_SIZE`, …).
    Pmi,
}

impl Convention {
    /// The launcher's command, as messages name it ("srun started 3 ranks").
    pub fn launcher(self) -> &'static str {
        match self {
            Convention::Ferrotron => "the launcher",
            Convention::Torchrun => "torchrun",
            Convention::Slurm => "srun",
            Convention::OpenMpi => "mpirun",
            Convention::Pmi => "mpiexec",
        }
    }
}

impl std::fmt::Display for Convention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Convention::Ferrotron => "ferrotron launch's variables",
            Convention::Torchrun => "torchrun's variables",
            Convention::Slurm => "Slurm's variables",
            Convention::OpenMpi => "Open MPI's variables",
            Convention::Pmi => "PMI's variables",
        })
    }
}

/// A rank's identity under whichever launcher started it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// Who this rank is and where the store is, as `ferrotron launch` would have said it.
    pub worker: WorkerEnv,
    /// Whose variables said so.
    pub convention: Convention,
    /// Where the port came from, for messages ("MASTER_PORT").
    port_from: String,
}

impl RankEnv {
    /// This process's identity if any launcher started it (`Ok(None)`: none did, and the
    /// process runs every rank itself), or an error naming a variable that is missing, does not
    /// parse, or contradicts another.
    pub fn from_env() -> Result<Option<RankEnv>, LaunchError> {
        RankEnv::from_vars(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// [`RankEnv::from_env`] over any source of variables (see the module docs for which are
    /// read, in what order).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>, LaunchError> {
        if let Some(worker) = WorkerEnv::from_vars(&var)? {
            return Ok(Some(RankEnv {
                worker,
                convention: Convention::Ferrotron,
                port_from: crate::ENV_MASTER_PORT.into(),
            }));
        }
        let timeout = match var(ENV_TIMEOUT) {
            None => DEFAULT_TIMEOUT,
            Some(v) => {
                let secs = v.trim().parse::<u64>().map_err(|e| LaunchError::Env {
                    var: ENV_TIMEOUT,
                    value: v.clone(),
                    what: format!("not a number of seconds ({e})"),
                })?;
                Duration::from_secs(secs)
            }
        };
        if var("RANK").is_some() {
            return Vars::new(&var, Convention::Torchrun, "RANK")
                .torchrun(timeout)
                .map(Some);
        }
        // Slurm's own steps (the batch script, `extern`, the interactive step) have ids from
        // 0xFFFFFFF0 up: no `srun` started this process there.
        let in_step = var("SLURM_PROCID").is_some()
            && var("SLURM_STEP_ID")
                .is_some_and(|s| s.trim().parse::<u32>().is_ok_and(|s| s < 0xFFFF_FFF0));
        let slurm = Vars::new(&var, Convention::Slurm, "SLURM_PROCID");
        let mpi = if var("OMPI_COMM_WORLD_RANK").is_some() {
            Some(Vars::new(&var, Convention::OpenMpi, "OMPI_COMM_WORLD_RANK"))
        } else if var("PMI_RANK").is_some() {
            Some(Vars::new(&var, Convention::Pmi, "PMI_RANK"))
        } else {
            None
        };
        let env = match (in_step, mpi) {
            (true, Some(mpi)) => {
                if mpi.mpi_place()? == slurm.slurm_place()? {
                    slurm.slurm(timeout)?
                } else {
                    mpi.mpi(timeout)?
                }
            }
            (true, None) => slurm.slurm(timeout)?,
            (false, Some(mpi)) => mpi.mpi(timeout)?,
            (false, None) => return Ok(None),
        };
        Ok(Some(env))
    }

    /// Whether this process hosts the job's store: global rank 0, under any launcher but
    /// ferrotron's (which hosts it itself).
    pub fn hosts_store(&self) -> bool {
        self.convention != Convention::Ferrotron && self.worker.rank == 0
    }

    /// Meets the job's store: under `ferrotron launch`, connects to the launcher's; under
    /// another launcher, global rank 0 first starts hosting it, every rank connects (waiting up
    /// to the timeout for rank 0), marks its connection as vital ([`Store::watch`]: a rank that
    /// dies before [`JobStore::leave`] fails the job) and checks that the ranks agree on the
    /// job and that no rank joined twice.
    pub fn join(&self) -> Result<JobStore, LaunchError> {
        let w = &self.worker;
        if self.convention == Convention::Ferrotron {
            return Ok(JobStore {
                store: w.connect_store()?,
                server: None,
                leave: None,
            });
        }
        let server = match self.hosts_store() {
            true => Some(self.host()?),
            false => None,
        };
        let store = Store::connect(&w.store_addr(), w.timeout).map_err(|e| match e {
            StoreError::Connect { .. } => LaunchError::Rendezvous(format!(
                "{e}; under {}, global rank 0 hosts the store on its own node at port {} ({}), \
                 so `{}` must name rank 0's node",
                self.convention.launcher(),
                w.master_port,
                self.port_from,
                w.master_addr,
            )),
            e => e.into(),
        })?;
        let me = format!("rank {} ({})", w.rank, self.convention.launcher());
        let shape = format!("{} ranks, run `{}`", w.world_size, w.run_id);
        let agreed = store.set_if_absent("cluster/shape", shape.as_bytes())?;
        if agreed != shape.as_bytes() {
            return Err(LaunchError::Rendezvous(format!(
                "{me} was started as one of {shape}, but another rank as one of {} \
                 (a rank of another job at the same store address?)",
                String::from_utf8_lossy(&agreed)
            )));
        }
        if store.add(&format!("cluster/rank/{}", w.rank), 1)? != 1 {
            return Err(LaunchError::Rendezvous(format!(
                "rank {} joined twice: two processes were given the same rank by {}",
                w.rank, self.convention
            )));
        }
        // Only a rank that belongs to the job fails it by dying.
        store.watch(&me)?;
        Ok(JobStore {
            store,
            server,
            leave: Some(Leave {
                rank: w.rank,
                world_size: w.world_size,
                timeout: w.timeout,
            }),
        })
    }

    /// Rank 0's store server: on the loopback address when the store's address is one (a job
    /// on one machine), else on every interface (other nodes reach it by `master_addr`).
    fn host(&self) -> Result<StoreServer, LaunchError> {
        let w = &self.worker;
        let addr = w.master_addr.trim_start_matches('[').trim_end_matches(']');
        let loopback = addr == "localhost"
            || addr
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let bind = if loopback {
            host_port(addr, w.master_port)
        } else if addr.contains(':') {
            host_port("::", w.master_port)
        } else {
            host_port("0.0.0.0", w.master_port)
        };
        StoreServer::bind(&bind).map_err(|e| {
            LaunchError::Rendezvous(format!(
                "global rank 0 hosts the job's store under {}: {e} (its port comes from {}; is \
                 another job using it?)",
                self.convention.launcher(),
                self.port_from
            ))
        })
    }
}

/// The job's store as one rank holds it, from [`RankEnv::join`] until [`JobStore::leave`].
#[derive(Debug)]
pub struct JobStore {
    store: Store,
    /// Rank 0's, under another launcher than ferrotron's: the store itself.
    server: Option<StoreServer>,
    /// Under another launcher than ferrotron's: this rank's part in leaving.
    leave: Option<Leave>,
}

#[derive(Debug)]
struct Leave {
    rank: usize,
    world_size: usize,
    timeout: Duration,
}

impl JobStore {
    /// The connection to the store, for building groups and links.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the store lives in this process (global rank 0 under another launcher).
    pub fn hosts_store(&self) -> bool {
        self.server.is_some()
    }

    /// Leaves the job, once this rank is done with every group and link. With `failure` (why
    /// this rank failed, when it failed on its own account), records the job's failure first,
    /// so that every other rank stops at once. Under another launcher than ferrotron's, counts
    /// this rank out, and on rank 0 keeps the store up until every rank has left, or for a
    /// moment once the job has failed (ranks that died cannot count themselves out), or at most
    /// the job's timeout. Under `ferrotron launch` the launcher does all this.
    pub fn leave(self, failure: Option<String>) -> Result<(), StoreError> {
        let JobStore {
            store,
            server,
            leave,
        } = self;
        let Some(leave) = leave else {
            return Ok(());
        };
        if let Some(why) = failure {
            store.fail(&Failure {
                rank: Some(leave.rank),
                why,
            })?;
        }
        store.add("cluster/left", 1)?;
        if server.is_some() {
            let start = Instant::now();
            let mut failed_at = None;
            while (store.add("cluster/left", 0)? as usize) < leave.world_size {
                let now = Instant::now();
                if failed_at.is_none() && store.failure()?.is_some() {
                    failed_at = Some(now);
                }
                let waited_out = match failed_at {
                    Some(at) => now - at >= LINGER,
                    None => now - start >= leave.timeout,
                };
                if waited_out {
                    break;
                }
                std::thread::sleep(LEAVE_POLL);
            }
        }
        store.close()?;
        drop(server);
        Ok(())
    }
}

/// One convention's variables, read with errors that name them.
struct Vars<'a, F> {
    var: &'a F,
    convention: Convention,
    /// The variable whose presence chose the convention.
    trigger: &'static str,
}

impl<'a, F: Fn(&str) -> Option<String>> Vars<'a, F> {
    fn new(var: &'a F, convention: Convention, trigger: &'static str) -> Self {
        Vars {
            var,
            convention,
            trigger,
        }
    }

    fn err(&self, var: &'static str, value: Option<String>, what: String) -> LaunchError {
        LaunchError::Cluster {
            convention: self.convention,
            var,
            value,
            what,
        }
    }

    fn get(&self, name: &'static str) -> Option<String> {
        (self.var)(name).map(|v| v.trim().to_string())
    }

    /// The first of `names` that is set, and which it was.
    fn first(&self, names: &[&'static str]) -> Option<(&'static str, String)> {
        names.iter().find_map(|&n| self.get(n).map(|v| (n, v)))
    }

    fn missing(&self, name: &'static str, hint: &str) -> LaunchError {
        let what = format!("not set (but {} is){hint}", self.trigger);
        self.err(name, None, what)
    }

    fn require(&self, name: &'static str, hint: &str) -> Result<String, LaunchError> {
        match self.get(name) {
            Some(v) if v.is_empty() => Err(self.err(name, Some(v), format!("empty{hint}"))),
            Some(v) => Ok(v),
            None => Err(self.missing(name, hint)),
        }
    }

    fn parse_num(&self, name: &'static str, value: String) -> Result<usize, LaunchError> {
        value
            .parse()
            .map_err(|e| self.err(name, Some(value.clone()), format!("not a number ({e})")))
    }

    fn number(&self, name: &'static str) -> Result<usize, LaunchError> {
        let v = self.require(name, "")?;
        self.parse_num(name, v)
    }

    fn optional_number(&self, name: &'static str) -> Result<Option<usize>, LaunchError> {
        self.get(name).map(|v| self.parse_num(name, v)).transpose()
    }

    /// The first of `names` that is set, as a number; an error naming them all if none is.
    fn number_of(&self, names: &[&'static str]) -> Result<(&'static str, usize), LaunchError> {
        match self.first(names) {
            Some((n, v)) => Ok((n, self.parse_num(n, v)?)),
            None => Err(self.missing(names[0], &or_else(&names[1..]))),
        }
    }

    fn port(&self, name: &'static str, value: String) -> Result<u16, LaunchError> {
        match value.parse::<u16>() {
            Ok(0) => Err(self.err(name, Some(value), "port 0: give the port to meet at".into())),
            Ok(p) => Ok(p),
            Err(_) => Err(self.err(name, Some(value), "not a port (1 to 65535)".into())),
        }
    }

    /// `MASTER_ADDR` and `MASTER_PORT`, both required: the launcher names no host of its own.
    fn master(&self, hint: &str) -> Result<(String, u16), LaunchError> {
        let addr = self.require("MASTER_ADDR", hint)?;
        let port = self.require("MASTER_PORT", hint)?;
        Ok((addr, self.port("MASTER_PORT", port)?))
    }

    // -----------------------------------------------------------------------------------------
    // torchrun

    fn torchrun(&self, timeout: Duration) -> Result<RankEnv, LaunchError> {
        let rank = self.number("RANK")?;
        let world_size = self.number("WORLD_SIZE")?;
        let local_rank = self.number("LOCAL_RANK")?;
        let local_world_size = self.number("LOCAL_WORLD_SIZE")?;
        let node_rank = self.optional_number("GROUP_RANK")?;
        let nnodes = self.optional_number("GROUP_WORLD_SIZE")?;
        let (master_addr, port) = self.master("")?;
        let agent_store = self
            .get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        let (master_port, port_from) = if agent_store {
            let next = port.checked_add(1).ok_or_else(|| {
                self.err(
                    "MASTER_PORT",
                    Some(port.to_string()),
                    "torchrun's agent holds this port (TORCHELASTIC_USE_AGENT_STORE=True) and \
                     ferrotron's store takes the next one, but there is none"
                        .into(),
                )
            })?;
            let from = "MASTER_PORT + 1: torchrun's agent holds MASTER_PORT".to_string();
            (next, from)
        } else {
            (port, "MASTER_PORT".to_string())
        };
        let run_id = match self.get("TORCHELASTIC_RUN_ID") {
            Some(id) if !id.is_empty() => format!("torchrun-{id}"),
            _ => format!("torchrun-{}", host_port(&master_addr, master_port)),
        };
        let (node_rank, nnodes) = by_node(rank, world_size, local_world_size, node_rank, nnodes);
        let ids = Ids {
            rank: ("RANK", rank),
            world_size: ("WORLD_SIZE", world_size),
            local_rank: ("LOCAL_RANK", local_rank),
            local_world_size: ("LOCAL_WORLD_SIZE", local_world_size),
            node_rank: ("GROUP_RANK", node_rank),
            nnodes: ("GROUP_WORLD_SIZE", nnodes),
        };
        self.finish(ids, master_addr, master_port, port_from, run_id, timeout)
    }

    // -----------------------------------------------------------------------------------------
    // Slurm

    /// The step's rank and size, as Slurm gives them.
    fn slurm_place(&self) -> Result<(usize, usize), LaunchError> {
        let rank = self.number("SLURM_PROCID")?;
        let (_, size) = self.number_of(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])?;
        Ok((rank, size))
    }

    fn slurm(&self, timeout: Duration) -> Result<RankEnv, LaunchError> {
        let rank = self.number("SLURM_PROCID")?;
        let world = self.number_of(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])?;
        let local_rank = self.number("SLURM_LOCALID")?;
        let node_rank = self.number("SLURM_NODEID")?;
        let nnodes = self.number_of(&["SLURM_STEP_NUM_NODES", "SLURM_NNODES"])?;
        // The tasks on each node, then this node's.
        let per_node = match self.first(&["SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"]) {
            Some(("SLURM_NTASKS_PER_NODE", v)) => {
                let n = self.parse_num("SLURM_NTASKS_PER_NODE", v)?;
                ("SLURM_NTASKS_PER_NODE", vec![n; nnodes.1])
            }
            Some((name, v)) => (name, self.tasks_per_node(name, v)?),
            None => match self.get("SLURM_TASKS_PER_NODE") {
                Some(v) => (
                    "SLURM_TASKS_PER_NODE",
                    self.tasks_per_node("SLURM_TASKS_PER_NODE", v)?,
                ),
                None => {
                    let hint = ", nor SLURM_NTASKS_PER_NODE or SLURM_TASKS_PER_NODE";
                    return Err(self.missing("SLURM_STEP_TASKS_PER_NODE", hint));
                }
            },
        };
        if per_node.1.len() != nnodes.1 {
            return Err(self.err(
                per_node.0,
                Some(counts(&per_node.1)),
                format!(
                    "{} nodes' task counts, but {}={}",
                    per_node.1.len(),
                    nnodes.0,
                    nnodes.1
                ),
            ));
        }
        let total: usize = per_node.1.iter().sum();
        if total != world.1 {
            return Err(self.err(
                per_node.0,
                Some(counts(&per_node.1)),
                format!("{total} tasks in all, but {}={}", world.0, world.1),
            ));
        }
        let local_world_size = match per_node.1.get(node_rank) {
            Some(&n) => n,
            None => {
                let what = format!("not below {}={}", nnodes.0, nnodes.1);
                return Err(self.err("SLURM_NODEID", Some(node_rank.to_string()), what));
            }
        };
        let master_addr = match self.get("MASTER_ADDR") {
            Some(a) if !a.is_empty() => a,
            _ => {
                let (name, list) = self
                    .first(&["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"])
                    .ok_or_else(|| {
                        self.missing(
                            "SLURM_STEP_NODELIST",
                            ", nor SLURM_JOB_NODELIST or MASTER_ADDR",
                        )
                    })?;
                let hosts = expand_hostlist(&list)
                    .map_err(|what| self.err(name, Some(list.clone()), what))?;
                if name == "SLURM_STEP_NODELIST" && hosts.len() != nnodes.1 {
                    let what = format!("{} hosts, but {}={}", hosts.len(), nnodes.0, nnodes.1);
                    return Err(self.err(name, Some(list), what));
                }
                hosts.into_iter().next().unwrap_or_default()
            }
        };
        let job = self.get("SLURM_JOB_ID");
        let step = self.get("SLURM_STEP_ID").unwrap_or_default();
        let (master_port, port_from) = match self.get("MASTER_PORT") {
            Some(p) => (self.port("MASTER_PORT", p)?, "MASTER_PORT".to_string()),
            None => {
                let job = job.clone().ok_or_else(|| {
                    self.missing(
                        "SLURM_JOB_ID",
                        ", nor MASTER_PORT: one of them sets the port",
                    )
                })?;
                let job_id = self.parse_num("SLURM_JOB_ID", job)?;
                let step_id = self.parse_num("SLURM_STEP_ID", step.clone())?;
                let from = "SLURM_JOB_ID and SLURM_STEP_ID; set MASTER_PORT to choose another";
                (slurm_port(job_id, step_id), from.to_string())
            }
        };
        let run_id = match job {
            Some(job) => format!("slurm-{job}.{step}"),
            None => format!("slurm-{}", host_port(&master_addr, master_port)),
        };
        let ids = Ids {
            rank: ("SLURM_PROCID", rank),
            world_size: world,
            local_rank: ("SLURM_LOCALID", local_rank),
            local_world_size: (per_node.0, local_world_size),
            node_rank: ("SLURM_NODEID", node_rank),
            nnodes,
        };
        self.finish(ids, master_addr, master_port, port_from, run_id, timeout)
    }

    fn tasks_per_node(&self, name: &'static str, v: String) -> Result<Vec<usize>, LaunchError> {
        expand_tasks_per_node(&v).map_err(|what| self.err(name, Some(v.clone()), what))
    }

    // -----------------------------------------------------------------------------------------
    // Open MPI and PMI

    /// The variable names of this MPI convention: rank, size, local rank, local size.
    fn mpi_names(&self) -> [&'static str; 4] {
        match self.convention {
            Convention::OpenMpi => [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ],
            _ => ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"],
        }
    }

    fn mpi_place(&self) -> Result<(usize, usize), LaunchError> {
        let [rank, size, ..] = self.mpi_names();
        Ok((self.number(rank)?, self.number(size)?))
    }

    fn mpi(&self, timeout: Duration) -> Result<RankEnv, LaunchError> {
        let [r, s, lr, ls] = self.mpi_names();
        let (rank, world_size) = (self.number(r)?, self.number(s)?);
        let (local_rank, local_world_size) = (self.number(lr)?, self.number(ls)?);
        let launcher = self.convention.launcher();
        let example = match self.convention {
            Convention::OpenMpi => "mpirun -x MASTER_ADDR=<rank 0's host> -x MASTER_PORT=29500 …",
            _ => "mpiexec -genv MASTER_ADDR <rank 0's host> -genv MASTER_PORT 29500 …",
        };
        let hint = format!(
            ": {launcher} hosts no rendezvous store, so ferrotron's global rank 0 hosts one, and \
             every rank must be told where: pass MASTER_ADDR (rank 0's host) and MASTER_PORT (a \
             free port there), as in `{example}`"
        );
        let (master_addr, master_port) = self.master(&hint)?;
        let run_id = format!("{}-{}", launcher, host_port(&master_addr, master_port));
        let (node_rank, nnodes) = by_node(rank, world_size, local_world_size, None, None);
        let ids = Ids {
            rank: (r, rank),
            world_size: (s, world_size),
            local_rank: (lr, local_rank),
            local_world_size: (ls, local_world_size),
            node_rank: (r, node_rank),
            nnodes: (s, nnodes),
        };
        let port_from = "MASTER_PORT".to_string();
        self.finish(ids, master_addr, master_port, port_from, run_id, timeout)
    }

    // -----------------------------------------------------------------------------------------

    /// Checks the numbers against each other and assembles the rank's identity.
    fn finish(
        &self,
        ids: Ids,
        master_addr: String,
        master_port: u16,
        port_from: String,
        run_id: String,
        timeout: Duration,
    ) -> Result<RankEnv, LaunchError> {
        let below = |(name, value): (&'static str, usize), (bound_name, bound): (&str, usize)| {
            if value < bound {
                Ok(())
            } else {
                let what = format!("not below {bound_name}={bound}");
                Err(self.err(name, Some(value.to_string()), what))
            }
        };
        if ids.world_size.1 == 0 {
            let what = "no ranks".to_string();
            return Err(self.err(ids.world_size.0, Some("0".into()), what));
        }
        below(ids.rank, ids.world_size)?;
        below(ids.local_rank, ids.local_world_size)?;
        below(ids.node_rank, ids.nnodes)?;
        if ids.local_world_size.1 > ids.world_size.1 {
            let (name, value) = ids.local_world_size;
            let what = format!("more than {}={}", ids.world_size.0, ids.world_size.1);
            return Err(self.err(name, Some(value.to_string()), what));
        }
        if master_addr.is_empty() {
            return Err(self.err("MASTER_ADDR", Some(master_addr), "empty".into()));
        }
        Ok(RankEnv {
            worker: WorkerEnv {
                rank: ids.rank.1,
                world_size: ids.world_size.1,
                local_rank: ids.local_rank.1,
                local_world_size: ids.local_world_size.1,
                node_rank: ids.node_rank.1,
                nnodes: ids.nnodes.1,
                master_addr,
                master_port,
                run_id,
                timeout,
            },
            convention: self.convention,
            port_from,
        })
    }
}

/// A rank's numbers, each with the variable it came from.
struct Ids {
    rank: (&'static str, usize),
    world_size: (&'static str, usize),
    local_rank: (&'static str, usize),
    local_world_size: (&'static str, usize),
    node_rank: (&'static str, usize),
    nnodes: (&'static str, usize),
}

/// The node index and count a launcher gave, or, where it gave none, as if ranks were placed
/// node by node, `local_world_size` to a node.
fn by_node(
    rank: usize,
    world_size: usize,
    local_world_size: usize,
    node_rank: Option<usize>,
    nnodes: Option<usize>,
) -> (usize, usize) {
    let per = local_world_size.max(1);
    (
        node_rank.unwrap_or(rank / per),
        nnodes.unwrap_or(world_size.div_ceil(per).max(1)),
    )
}

/// ", nor A or B" for a message about a missing variable with fallbacks.
fn or_else(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        names => format!(", nor {}", names.join(" or ")),
    }
}

/// Task counts as Slurm writes them ("8(x2)").
fn counts(per_node: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < per_node.len() {
        let run = per_node[i..]
            .iter()
            .take_while(|&&n| n == per_node[i])
            .count();
        out.push(match run {
            1 => per_node[i].to_string(),
            r => format!("{}(x{r})", per_node[i]),
        });
        i += run;
    }
    out.join(",")
}

/// The store's port for a Slurm job step when `MASTER_PORT` is not set:
/// `20000 + 10 × (job id mod 1000) + (step id mod 10)`, in 20000..=29999 (below Linux's
/// ephemeral ports). Every task of the step computes the same; concurrent steps of one job, and
/// jobs whose ids differ in their last three digits, get different ports.
pub fn slurm_port(job_id: usize, step_id: usize) -> u16 {
    SLURM_PORT_BASE + 10 * (job_id % 1000) as u16 + (step_id % 10) as u16
}

/// Expands a Slurm host list (`SLURM_STEP_NODELIST`) into host names, in order:
/// `node[01-03,07],gpu-a1` is `node01 node02 node03 node07 gpu-a1`. A range keeps the zero
/// padding of its first number; several bracket groups in one name expand as a product
/// (`r[1-2]n[1-2]`: `r1n1 r1n2 r2n1 r2n2`). An error says what does not parse.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>, String> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        if item.is_empty() {
            return Err("an empty host name (two commas in a row, or one at an end)".into());
        }
        expand_item(item, "", &mut hosts)?;
    }
    if hosts.is_empty() {
        return Err("no hosts".into());
    }
    Ok(hosts)
}

/// The list's items: split at the commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth > 0 => return Err(format!("a '[' inside brackets at byte {i}")),
            '[' => depth = 1,
            ']' if depth == 0 => return Err(format!("a ']' without its '[' at byte {i}")),
            ']' => depth = 0,
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("a '[' without its ']'".into());
    }
    items.push(list[start..].trim());
    Ok(items)
}

/// Expands one item (`prefix[ranges]rest`), each name after `done`, into `out`.
fn expand_item(item: &str, done: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = item.find('[') else {
        out.push(format!("{done}{item}"));
        return Ok(());
    };
    // `split_top_level` checked that brackets pair up and do not nest.
    let close = open + item[open..].find(']').ok_or("a '[' without its ']'")?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    if ranges.trim().is_empty() {
        return Err(format!("empty brackets in `{item}`"));
    }
    for range in ranges.split(',') {
        let range = range.trim();
        let (lo, hi) = range.split_once('-').unwrap_or((range, range));
        let number = |s: &str| -> Result<u64, String> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "`{range}` in `{item}` is not a number or a range a-b"
                ));
            }
            s.parse()
                .map_err(|_| format!("`{s}` in `{item}` is too large"))
        };
        let (a, b) = (number(lo)?, number(hi)?);
        if a > b {
            return Err(format!("the range `{range}` in `{item}` runs backwards"));
        }
        if out.len() as u64 + (b - a) >= MAX_HOSTS as u64 {
            return Err(format!("more than {MAX_HOSTS} hosts"));
        }
        let width = lo.len();
        for n in a..=b {
            expand_item(rest, &format!("{done}{prefix}{n:0width$}"), out)?;
            if out.len() > MAX_HOSTS {
                return Err(format!("more than {MAX_HOSTS} hosts"));
            }
        }
    }
    Ok(())
}

/// Expands Slurm's tasks per node (`SLURM_STEP_TASKS_PER_NODE`): `2(x3),1` is `2 2 2 1`.
pub fn expand_tasks_per_node(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (count, times) = match part.split_once('(') {
            None => (part, "1"),
            Some((count, rep)) => {
                let times = rep
                    .strip_suffix(')')
                    .and_then(|r| r.trim().strip_prefix('x'))
                    .ok_or_else(|| format!("`{part}` is neither N nor N(xM)"))?;
                (count.trim(), times.trim())
            }
        };
        let count: usize = count
            .parse()
            .map_err(|_| format!("`{part}`: `{count}` is not a number of tasks"))?;
        let times: usize = times
            .parse()
            .map_err(|_| format!("`{part}`: `{times}` is not a number of nodes"))?;
        if times > MAX_HOSTS || out.len() + times > MAX_HOSTS {
            return Err(format!("more than {MAX_HOSTS} nodes"));
        }
        out.extend(std::iter::repeat_n(count, times));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<RankEnv>, LaunchError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn host_lists() {
        let h = |s: &str| expand_hostlist(s).unwrap();
        assert_eq!(
            h("node[01-03,07],gpu-a1"),
            ["node01", "node02", "node03", "node07", "gpu-a1"]
        );
        assert_eq!(h("n1"), ["n1"]);
        assert_eq!(h("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(h("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert_eq!(h("r[1-2]n[1-2]"), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(h("a[1]-ib,b"), ["a1-ib", "b"]);
        assert_eq!(h("x[3, 5]"), ["x3", "x5"]);
        for (bad, why) in [
            ("node[01-03", "without its ']'"),
            ("node01]", "without its '['"),
            ("node[3-1]", "backwards"),
            ("node[a-b]", "not a number"),
            ("node[]", "empty brackets"),
            ("a,,b", "empty host name"),
            ("n[[1]]", "inside brackets"),
            ("", "empty host name"),
            ("n[0-99999999]", "more than"),
            ("n[1-]", "not a number"),
        ] {
            let err = expand_hostlist(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tasks_per_node() {
        assert_eq!(expand_tasks_per_node("8(x2)").unwrap(), [8, 8]);
        assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
        assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
        assert_eq!(counts(&[2, 2, 2, 1]), "2(x3),1");
        for bad in ["x", "2(3)", "2(x)", "(x2)", "2(x2"] {
            assert!(expand_tasks_per_node(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slurm_ports_stay_in_their_range() {
        assert_eq!(slurm_port(123456, 0), 24560);
        assert_eq!(slurm_port(123456, 3), 24563);
        assert_eq!(slurm_port(999, 19), 29999);
        assert_eq!(slurm_port(1000, 0), SLURM_PORT_BASE);
    }

    /// Slurm's variables for task `rank` of a 2-node step of 4 tasks per node.
    fn slurm_vars(rank: usize) -> Vec<(&'static str, String)> {
        vec![
            ("SLURM_JOB_ID", "4242".into()),
            ("SLURM_STEP_ID", "1".into()),
            ("SLURM_PROCID", rank.to_string()),
            ("SLURM_NTASKS", "8".into()),
            ("SLURM_LOCALID", (rank % 4).to_string()),
            ("SLURM_NODEID", (rank / 4).to_string()),
            ("SLURM_NNODES", "2".into()),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2)".into()),
            ("SLURM_STEP_NODELIST", "gpu[007-008]".into()),
        ]
    }

    /// A variable to set (to `Some`) or remove.
    type Change<'a> = (&'static str, Option<&'a str>);

    fn with(vars: &[(&'static str, String)], changes: &[Change]) -> Vec<(&'static str, String)> {
        let mut v = vars.to_vec();
        for (k, value) in changes {
            v.retain(|(n, _)| n != k);
            if let Some(value) = value {
                v.push((k, value.to_string()));
            }
        }
        v
    }

    fn parse(vars: &[(&'static str, String)]) -> Result<Option<RankEnv>, LaunchError> {
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env(&refs)
    }

    #[test]
    fn slurm_step() {
        let e = parse(&slurm_vars(5)).unwrap().unwrap();
        assert_eq!(e.convention, Convention::Slurm);
        let w = &e.worker;
        assert_eq!(
            (
                w.rank,
                w.world_size,
                w.local_rank,
                w.local_world_size,
                w.node_rank,
                w.nnodes
            ),
            (5, 8, 1, 4, 1, 2)
        );
        assert_eq!((w.master_addr.as_str(), w.master_port), ("gpu007", 22421));
        assert_eq!(w.run_id, "slurm-4242.1");
        assert_eq!(w.timeout, DEFAULT_TIMEOUT);
        assert!(!e.hosts_store());
        assert!(parse(&slurm_vars(0)).unwrap().unwrap().hosts_store());
        // MASTER_ADDR and MASTER_PORT override; FERROTRON_TIMEOUT_SECS applies.
        let v = with(
            &slurm_vars(5),
            &[
                ("MASTER_ADDR", Some("10.0.0.1")),
                ("MASTER_PORT", Some("29500")),
                ("FERROTRON_TIMEOUT_SECS", Some("30")),
            ],
        );
        let w = parse(&v).unwrap().unwrap().worker;
        assert_eq!((w.master_addr.as_str(), w.master_port), ("10.0.0.1", 29500));
        assert_eq!(w.timeout, Duration::from_secs(30));
        // Uneven nodes: this node's count.
        let v = with(
            &slurm_vars(0),
            &[
                ("SLURM_NTASKS", Some("7")),
                ("SLURM_STEP_TASKS_PER_NODE", Some("4,3")),
                ("SLURM_PROCID", Some("6")),
                ("SLURM_LOCALID", Some("2")),
                ("SLURM_NODEID", Some("1")),
            ],
        );
        assert_eq!(parse(&v).unwrap().unwrap().worker.local_world_size, 3);
        // --ntasks-per-node alone.
        let v = with(
            &slurm_vars(1),
            &[
                ("SLURM_STEP_TASKS_PER_NODE", None),
                ("SLURM_NTASKS_PER_NODE", Some("4")),
            ],
        );
        assert_eq!(parse(&v).unwrap().unwrap().worker.local_world_size, 4);
        // A batch script outside srun is no step: every rank runs here.
        let v = with(&slurm_vars(0), &[("SLURM_STEP_ID", None)]);
        assert_eq!(parse(&v).unwrap(), None);
        let v = with(&slurm_vars(0), &[("SLURM_STEP_ID", Some("4294967291"))]);
        assert_eq!(parse(&v).unwrap(), None);
    }

    #[test]
    fn slurm_errors_name_the_variable() {
        let cases: [(&[Change], &str, &str); 9] = [
            (&[("SLURM_NTASKS", None)], "SLURM_STEP_NUM_TASKS", "not set"),
            (
                &[("SLURM_LOCALID", Some("four"))],
                "SLURM_LOCALID",
                "not a number",
            ),
            (
                &[("SLURM_PROCID", Some("8"))],
                "SLURM_PROCID",
                "not below SLURM_NTASKS=8",
            ),
            (
                &[("SLURM_LOCALID", Some("4"))],
                "SLURM_LOCALID",
                "not below",
            ),
            (
                &[("SLURM_STEP_TASKS_PER_NODE", Some("4(x3)"))],
                "SLURM_STEP_TASKS_PER_NODE",
                "3 nodes",
            ),
            (
                &[("SLURM_STEP_TASKS_PER_NODE", Some("3(x2)"))],
                "SLURM_STEP_TASKS_PER_NODE",
                "6 tasks in all",
            ),
            (
                &[("SLURM_STEP_NODELIST", Some("gpu[007-"))],
                "SLURM_STEP_NODELIST",
                "without its ']'",
            ),
            (
                &[("SLURM_STEP_NODELIST", Some("gpu007"))],
                "SLURM_STEP_NODELIST",
                "1 hosts",
            ),
            (
                &[("MASTER_PORT", Some("70000"))],
                "MASTER_PORT",
                "not a port",
            ),
        ];
        for (changes, var, what) in cases {
            let err = parse(&with(&slurm_vars(5), changes)).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, LaunchError::Cluster { convention: Convention::Slurm, var: v, .. } if *v == var),
                "{changes:?}: {text}"
            );
            assert!(
                text.contains(what) && text.contains("Slurm"),
                "{changes:?}: {text}"
            );
        }
        let v = with(&slurm_vars(5), &[("SLURM_JOB_ID", None)]);
        let err = parse(&v).unwrap_err().to_string();
        assert!(
            err.contains("SLURM_JOB_ID") && err.contains("MASTER_PORT"),
            "{err}"
        );
    }

    fn torchrun_vars(rank: usize) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "4".into()),
            ("LOCAL_RANK", (rank % 2).to_string()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("GROUP_RANK", (rank / 2).to_string()),
            ("GROUP_WORLD_SIZE", "2".into()),
            ("MASTER_ADDR", "::1".into()),
            ("MASTER_PORT", "29500".into()),
            ("TORCHELASTIC_RUN_ID", "xyz".into()),
        ]
    }

    #[test]
    fn torchrun() {
        let e = parse(&torchrun_vars(3)).unwrap().unwrap();
        assert_eq!(e.convention, Convention::Torchrun);
        let w = &e.worker;
        assert_eq!(
            (
                w.rank,
                w.world_size,
                w.local_rank,
                w.local_world_size,
                w.node_rank,
                w.nnodes
            ),
            (3, 4, 1, 2, 1, 2)
        );
        assert_eq!(w.store_addr(), "[::1]:29500");
        assert_eq!(w.run_id, "torchrun-xyz");
        // The agent's store holds MASTER_PORT: ferrotron's takes the next.
        let v = with(
            &torchrun_vars(3),
            &[("TORCHELASTIC_USE_AGENT_STORE", Some("True"))],
        );
        assert_eq!(parse(&v).unwrap().unwrap().worker.master_port, 29501);
        // Without GROUP_*: derived node by node; without a run id: from the address.
        let v = with(
            &torchrun_vars(3),
            &[
                ("GROUP_RANK", None),
                ("GROUP_WORLD_SIZE", None),
                ("TORCHELASTIC_RUN_ID", None),
            ],
        );
        let w = parse(&v).unwrap().unwrap().worker;
        assert_eq!((w.node_rank, w.nnodes), (1, 2));
        assert_eq!(w.run_id, "torchrun-[::1]:29500");
        // torchrun comes before Slurm (torchrun started by srun).
        let mut v = torchrun_vars(3);
        v.extend(with(&slurm_vars(1), &[]));
        assert_eq!(parse(&v).unwrap().unwrap().convention, Convention::Torchrun);
        for (changes, var, what) in [
            (
                vec![("WORLD_SIZE", None)],
                "WORLD_SIZE",
                "not set (but RANK is)",
            ),
            (vec![("RANK", Some("-1"))], "RANK", "not a number"),
            (vec![("RANK", Some("4"))], "RANK", "not below WORLD_SIZE=4"),
            (vec![("MASTER_ADDR", None)], "MASTER_ADDR", "not set"),
            (vec![("MASTER_PORT", Some("0"))], "MASTER_PORT", "port 0"),
            (
                vec![("LOCAL_WORLD_SIZE", Some("8"))],
                "LOCAL_WORLD_SIZE",
                "more than WORLD_SIZE=4",
            ),
            (
                vec![("GROUP_RANK", Some("2"))],
                "GROUP_RANK",
                "not below GROUP_WORLD_SIZE=2",
            ),
            (
                vec![
                    ("TORCHELASTIC_USE_AGENT_STORE", Some("True")),
                    ("MASTER_PORT", Some("65535")),
                ],
                "MASTER_PORT",
                "none",
            ),
        ] {
            let err = parse(&with(&torchrun_vars(3), &changes)).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(&err, LaunchError::Cluster { convention: Convention::Torchrun, var: v, .. } if *v == var),
                "{changes:?}: {text}"
            );
            assert!(
                text.contains(what) && text.contains("torchrun"),
                "{changes:?}: {text}"
            );
        }
    }

    fn ompi_vars(rank: usize) -> Vec<(&'static str, String)> {
        vec![
            ("OMPI_COMM_WORLD_RANK", rank.to_string()),
            ("OMPI_COMM_WORLD_SIZE", "4".into()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", (rank % 2).to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2".into()),
            ("MASTER_ADDR", "node0".into()),
            ("MASTER_PORT", "29500".into()),
        ]
    }

    #[test]
    fn open_mpi_and_pmi() {
        let e = parse(&ompi_vars(2)).unwrap().unwrap();
        assert_eq!(e.convention, Convention::OpenMpi);
        let w = &e.worker;
        assert_eq!(
            (
                w.rank,
                w.world_size,
                w.local_rank,
                w.local_world_size,
                w.node_rank,
                w.nnodes
            ),
            (2, 4, 0, 2, 1, 2)
        );
        assert_eq!(w.run_id, "mpirun-node0:29500");
        // MASTER_ADDR is required, and the error says how to give it.
        let err = parse(&with(&ompi_vars(2), &[("MASTER_ADDR", None)])).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                &err,
                LaunchError::Cluster {
                    convention: Convention::OpenMpi,
                    var: "MASTER_ADDR",
                    ..
                }
            ),
            "{text}"
        );
        assert!(
            text.contains("-x MASTER_ADDR=") && text.contains("Open MPI"),
            "{text}"
        );
        let err = parse(&with(
            &ompi_vars(2),
            &[("OMPI_COMM_WORLD_LOCAL_SIZE", None)],
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("OMPI_COMM_WORLD_LOCAL_SIZE"),
            "{err}"
        );

        let pmi = |rank: usize| -> Vec<(&'static str, String)> {
            vec![
                ("PMI_RANK", rank.to_string()),
                ("PMI_SIZE", "2".into()),
                ("MPI_LOCALRANKID", rank.to_string()),
                ("MPI_LOCALNRANKS", "2".into()),
                ("MASTER_ADDR", "127.0.0.1".into()),
                ("MASTER_PORT", "29400".into()),
            ]
        };
        let e = parse(&pmi(1)).unwrap().unwrap();
        assert_eq!(e.convention, Convention::Pmi);
        assert_eq!((e.worker.rank, e.worker.world_size), (1, 2));
        let err = parse(&with(&pmi(1), &[("MASTER_PORT", None)]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MASTER_PORT") && err.contains("-genv MASTER_PORT"),
            "{err}"
        );

        // mpirun inside a Slurm allocation: the ranks inherit the daemons' step (one task per
        // node); the MPI variables, which disagree, describe the process.
        let mut v = ompi_vars(3);
        v.extend(with(
            &slurm_vars(1),
            &[
                ("SLURM_NTASKS", Some("2")),
                ("SLURM_STEP_TASKS_PER_NODE", Some("1(x2)")),
                ("SLURM_LOCALID", Some("0")),
            ],
        ));
        let e = parse(&v).unwrap().unwrap();
        assert_eq!((e.convention, e.worker.rank), (Convention::OpenMpi, 3));
        // srun with a PMI plugin sets both, in agreement: Slurm's, which name the host, win.
        let mut v = with(&pmi(1), &[("MASTER_ADDR", None), ("MASTER_PORT", None)]);
        v.extend(with(
            &slurm_vars(1),
            &[
                ("SLURM_NTASKS", Some("2")),
                ("SLURM_STEP_TASKS_PER_NODE", Some("2")),
                ("SLURM_NNODES", Some("1")),
                ("SLURM_NODEID", Some("0")),
                ("SLURM_STEP_NODELIST", Some("gpu007")),
            ],
        ));
        let e = parse(&v).unwrap().unwrap();
        assert_eq!((e.convention, e.worker.rank), (Convention::Slurm, 1));
    }

    #[test]
    fn ferrotron_launch_comes_first_and_nothing_is_none() {
        assert_eq!(env(&[]).unwrap(), None);
        assert_eq!(
            env(&[("MASTER_ADDR", "x"), ("SLURM_JOB_ID", "3")]).unwrap(),
            None
        );
        let w = WorkerEnv {
            rank: 1,
            world_size: 2,
            local_rank: 1,
            local_world_size: 2,
            node_rank: 0,
            nnodes: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 4000,
            run_id: "r".into(),
            timeout: Duration::from_secs(9),
        };
        let mut v: Vec<(&'static str, String)> = w.vars();
        v.extend(torchrun_vars(0));
        let e = parse(&v).unwrap().unwrap();
        assert_eq!((e.convention, &e.worker), (Convention::Ferrotron, &w));
        assert!(!e.hosts_store());
        let err = env(&[("RANK", "0"), ("FERROTRON_TIMEOUT_SECS", "soon")]).unwrap_err();
        assert!(err.to_string().contains("FERROTRON_TIMEOUT_SECS"), "{err}");
    }
}
