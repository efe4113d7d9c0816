//! `ferrotron run` with no ferrotron launcher: each rank a process started here by hand with
//! only the variables `srun`, `torchrun`, `mpirun` (Open MPI) or `mpiexec` (PMI) would set, at
//! 2 and 4 ranks. Global rank 0 hosts the rendezvous store; every rank verifies its gradient
//! shards against the unpartitioned model. A missing required variable is a clear error, and a
//! rank that dies stops the others.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ferrotron");
const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-gpt.ron");
/// How long a job of ranks may take before the test kills it and fails.
const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug)]
enum Launcher {
    Slurm,
    Torchrun,
    OpenMpi,
    Pmi,
}

/// The variables `launcher` sets for rank `rank` of `world` ranks, `per_node` to a node; the
/// store's port is `port` (for Slurm, through `SLURM_JOB_ID`, see [`slurm_job`]).
fn vars(
    launcher: Launcher,
    rank: usize,
    world: usize,
    per_node: usize,
    port: u16,
) -> Vec<(String, String)> {
    let nodes = world / per_node;
    let (local, node) = (rank % per_node, rank / per_node);
    let v: Vec<(&str, String)> = match launcher {
        Launcher::Slurm => {
            let (job, step) = slurm_job(port);
            vec![
                ("SLURM_JOB_ID", job.to_string()),
                ("SLURM_STEP_ID", step.to_string()),
                ("SLURM_PROCID", rank.to_string()),
                ("SLURM_NTASKS", world.to_string()),
                ("SLURM_STEP_NUM_TASKS", world.to_string()),
                ("SLURM_LOCALID", local.to_string()),
                ("SLURM_NODEID", node.to_string()),
                ("SLURM_NNODES", nodes.to_string()),
                ("SLURM_STEP_NUM_NODES", nodes.to_string()),
                ("SLURM_STEP_TASKS_PER_NODE", format!("{per_node}(x{nodes})")),
                // The first host is where rank 0 runs: here, every "node" is this machine.
                ("SLURM_STEP_NODELIST", vec!["localhost"; nodes].join(",")),
            ]
        }
        Launcher::Torchrun => vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", per_node.to_string()),
            ("GROUP_RANK", node.to_string()),
            ("GROUP_WORLD_SIZE", nodes.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
            ("TORCHELASTIC_RUN_ID", "cluster-env-test".into()),
        ],
        Launcher::OpenMpi => vec![
            ("OMPI_COMM_WORLD_RANK", rank.to_string()),
            ("OMPI_COMM_WORLD_SIZE", world.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", local.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", per_node.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ],
        Launcher::Pmi => vec![
            ("PMI_RANK", rank.to_string()),
            ("PMI_SIZE", world.to_string()),
            ("MPI_LOCALRANKID", local.to_string()),
            ("MPI_LOCALNRANKS", per_node.to_string()),
            ("MASTER_ADDR", "localhost".into()),
            ("MASTER_PORT", port.to_string()),
        ],
    };
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A Slurm job and step id whose derived store port (`20000 + 10 × (job mod 1000) + step mod
/// 10`) is `port`.
fn slurm_job(port: u16) -> (u32, u32) {
    let off = u32::from(port - 20000);
    (7_000_000 + off / 10, off % 10)
}

/// Whether a launcher convention could read `name`: what the test must not inherit.
fn launcher_var(name: &str) -> bool {
    const EXACT: [&str; 13] = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MPI_LOCALRANKID",
        "MPI_LOCALNRANKS",
        "CUDA_VISIBLE_DEVICES",
    ];
    const PREFIXES: [&str; 6] = [
        "FERROTRON_",
        "SLURM_",
        "OMPI_",
        "PMI_",
        "PMIX_",
        "TORCHELASTIC_",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `ferrotron ARGS` with exactly `vars` of the launcher conventions' variables.
fn rank(args: &[&str], vars: &[(String, String)]) -> Child {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if launcher_var(&k.to_string_lossy()) {
            cmd.env_remove(&k);
        }
    }
    cmd.args(args)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ferrotron binary runs")
}

/// Waits for every rank, killing them all at the deadline; their outputs, in rank order.
fn wait_all(ranks: Vec<Child>, deadline: Instant) -> Vec<Output> {
    let mut ranks: Vec<Option<Child>> = ranks.into_iter().map(Some).collect();
    let mut timed_out = false;
    while ranks
        .iter_mut()
        .flatten()
        .any(|c| c.try_wait().ok().flatten().is_none())
    {
        if Instant::now() >= deadline {
            timed_out = true;
            for c in ranks.iter_mut().flatten() {
                let _ = c.kill();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let outputs: Vec<Output> = ranks
        .iter_mut()
        .map(|c| c.take().unwrap().wait_with_output().expect("waits"))
        .collect();
    assert!(
        !timed_out,
        "the ranks did not finish in {DEADLINE:?}: {}",
        show(&outputs)
    );
    outputs
}

fn show(outputs: &[Output]) -> String {
    outputs
        .iter()
        .enumerate()
        .map(|(r, o)| {
            format!(
                "\n--- rank {r}: {}\n{}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .collect()
}

/// A port nothing listens on (for Slurm, one in its derived range).
fn free_port(launcher: Launcher) -> u16 {
    match launcher {
        Launcher::Slurm => {
            // Derived ports lie in 20000..30000; start at a spot of this process's own.
            let start = (std::process::id() as u16 % 1000) * 10;
            (0..10000)
                .map(|i| 20000 + (start + i * 7) % 10000)
                .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
                .expect("a free port in 20000..30000")
        }
        _ => TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(),
    }
}

/// Runs `ferrotron run tiny-gpt --verify MESH` as `world` processes under `launcher`'s
/// variables, and checks that every rank exits 0 having verified its shards.
fn verifies(launcher: Launcher, world: usize, per_node: usize, mesh: &[&str]) {
    verifies_with(launcher, world, per_node, mesh, &[]);
}

/// [`verifies`], each rank also given `extra` (not a launcher's variables).
fn verifies_with(
    launcher: Launcher,
    world: usize,
    per_node: usize,
    mesh: &[&str],
    extra: &[(String, String)],
) {
    let start = Instant::now();
    let port = free_port(launcher);
    let mut args = vec!["run", MODEL, "--verify"];
    args.extend(mesh);
    let ranks = (0..world)
        .map(|r| {
            let mut v = vars(launcher, r, world, per_node, port);
            v.extend(extra.iter().cloned());
            rank(&args, &v)
        })
        .collect();
    let outputs = wait_all(ranks, start + DEADLINE);
    let all = show(&outputs);
    for (r, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "{launcher:?}, rank {r} failed: {all}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("rank {r} (")) && stdout.contains("verified"),
            "{launcher:?}, rank {r} verifies its shards: {all}"
        );
    }
    let rank0 = String::from_utf8_lossy(&outputs[0].stdout);
    let backend = if mesh.contains(&"cuda") {
        "cuda"
    } else {
        "cpu"
    };
    assert!(
        rank0.contains(&format!("run ({backend}, {world} processes): loss ")),
        "rank 0 reports the job: {all}"
    );
    eprintln!("{launcher:?}, {world} ranks: {:.1?}", start.elapsed());
}

#[test]
fn slurm_ranks_verify() {
    verifies(Launcher::Slurm, 2, 2, &["--tp", "2"]);
    verifies(Launcher::Slurm, 4, 2, &["--tp", "2", "--dp", "2"]);
}

#[test]
fn torchrun_ranks_verify() {
    verifies(Launcher::Torchrun, 2, 2, &["--tp", "2"]);
    verifies(Launcher::Torchrun, 4, 2, &["--tp", "2", "--dp", "2"]);
}

#[test]
fn open_mpi_ranks_verify() {
    verifies(Launcher::OpenMpi, 2, 1, &["--tp", "2"]);
    verifies(Launcher::OpenMpi, 4, 4, &["--tp", "2", "--dp", "2"]);
}

#[test]
fn pmi_ranks_verify_with_pipeline_stages() {
    verifies(Launcher::Pmi, 4, 2, &["--tp", "2", "--pp", "2"]);
}

/// GPU ranks (one device each, NCCL between them) on the CPU stand-in for the CUDA driver,
/// cuBLAS and NCCL (`cuda-emu`, as in `tests/cuda_cli.rs`): skipped, saying why, where the
/// stand-in cannot be built.
#[test]
fn slurm_ranks_verify_on_the_emulated_gpu() {
    let existing = std::env::var("LD_LIBRARY_PATH").ok();
    let nvrtc = ferrotron_cuda_emu::nvrtc_dir().is_some()
        || existing.as_deref().is_some_and(|p| {
            p.split(':')
                .any(|d| !d.is_empty() && std::path::Path::new(d).join("libnvrtc.so.13").exists())
        });
    let path = match ferrotron_cuda_emu::library_path(existing.as_deref()) {
        Some(path) if nvrtc => path,
        _ => {
            assert!(
                std::env::var_os("FERROTRON_REQUIRE_NVRTC").is_none(),
                "FERROTRON_REQUIRE_NVRTC is set but the stand-in CUDA libraries are missing"
            );
            eprintln!("SKIPPED: no C++ compiler or no NVRTC for the stand-in CUDA libraries");
            return;
        }
    };
    let cache =
        std::env::temp_dir().join(format!("ferrotron-cluster-kernels-{}", std::process::id()));
    let extra = [
        ("LD_LIBRARY_PATH".to_string(), path),
        (
            "FERROTRON_CACHE_DIR".to_string(),
            cache.display().to_string(),
        ),
    ];
    verifies_with(
        Launcher::Slurm,
        2,
        2,
        &["--tp", "2", "--backend", "cuda"],
        &extra,
    );
}

#[test]
fn open_mpi_without_master_addr_is_a_clear_error() {
    let port = free_port(Launcher::OpenMpi);
    let mut v = vars(Launcher::OpenMpi, 1, 2, 2, port);
    v.retain(|(k, _)| k != "MASTER_ADDR");
    let out = wait_all(
        vec![rank(&["run", MODEL, "--tp", "2"], &v)],
        Instant::now() + DEADLINE,
    );
    let err = String::from_utf8_lossy(&out[0].stderr);
    assert!(!out[0].status.success());
    assert!(
        err.contains("Open MPI's variables: MASTER_ADDR: not set")
            && err.contains("mpirun -x MASTER_ADDR="),
        "{err}"
    );
}

#[test]
fn a_world_size_that_is_not_the_mesh_names_the_launcher() {
    let port = free_port(Launcher::Slurm);
    let v = vars(Launcher::Slurm, 0, 4, 4, port);
    let out = wait_all(
        vec![rank(&["run", MODEL, "--tp", "2"], &v)],
        Instant::now() + DEADLINE,
    );
    let err = String::from_utf8_lossy(&out[0].stderr);
    assert!(!out[0].status.success());
    assert!(
        err.contains("srun started 4 ranks, the plan needs"),
        "{err}"
    );
}

/// A rank that dies mid-job (killed, as by a node failure) stops the others within seconds:
/// its watched store connection drops, the store records the failure, and the others' groups
/// see it.
#[test]
fn a_killed_rank_stops_the_others() {
    let start = Instant::now();
    let port = free_port(Launcher::Torchrun);
    let readme = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
    let args = [
        "train",
        MODEL,
        "--data",
        readme,
        "--steps",
        "100000",
        "--dim",
        "vocab=256",
        "--tp",
        "2",
    ];
    let mut ranks: Vec<Child> = (0..2)
        .map(|r| rank(&args, &vars(Launcher::Torchrun, r, 2, 2, port)))
        .collect();
    // Let the job get going, then kill rank 1.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        ranks.iter_mut().all(|c| c.try_wait().unwrap().is_none()),
        "both ranks still train"
    );
    ranks[1].kill().unwrap();
    let killed = Instant::now();
    let outputs = wait_all(ranks, killed + Duration::from_secs(15));
    let all = show(&outputs);
    assert!(!outputs[0].status.success(), "rank 0 fails too: {all}");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "promptly: {all}"
    );
    let err = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(err.contains("rank 1"), "rank 0 names rank 1: {all}");
    eprintln!("killed rank: {:.1?}", start.elapsed());
}
