//! `ferrotron launch` end to end, through the real binary: ranks learn their identity, output is
//! relayed with rank prefixes, a failing rank stops every other rank quickly (none left behind;
//! a failing pipeline stage too), two launchers rendezvous as two nodes (and a failure on one
//! stops the other; pipeline stages link across them), and bad arguments get clear errors.

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts `ferrotron ARGS` with `env`, collecting its output.
fn start(args: &[&str], env: &[(&str, &str)]) -> mpsc::Receiver<(Output, Duration)> {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_ferrotron"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the ferrotron binary runs");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let out = child.wait_with_output().expect("waits");
        let _ = tx.send((out, start.elapsed()));
    });
    rx
}

/// Waits for a launcher started by [`start`]; a launcher that hangs fails the test.
fn finish(rx: mpsc::Receiver<(Output, Duration)>) -> (Output, Duration) {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the launcher exits within 20 s")
}

fn ferrotron(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    finish(start(args, env))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sorted_lines(b: &[u8]) -> Vec<String> {
    let mut v: Vec<String> = text(b).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "ferrotron-launch-{tag}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether process `pid` is gone (a zombie counts as gone: it runs nothing).
#[cfg(target_os = "linux")]
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Every pid written into the files of `dir` is gone (within a second).
fn assert_all_gone(dir: &std::path::Path) {
    let pids: Vec<u32> = std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let s = std::fs::read_to_string(e.unwrap().path()).unwrap();
            s.split_whitespace()
                .map(|p| p.parse::<u32>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!pids.is_empty(), "the workers wrote their pids");
    #[cfg(target_os = "linux")]
    {
        let deadline = Instant::now() + Duration::from_secs(1);
        while pids.iter().any(|&p| !gone(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| !gone(p)).collect();
        assert!(alive.is_empty(), "left behind: {alive:?}");
    }
}

#[test]
fn ranks_learn_their_identity() {
    let (out, _) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "3",
            "--exec",
            "sh",
            "--",
            "-c",
            "echo $FERROTRON_RANK $FERROTRON_WORLD_SIZE $FERROTRON_LOCAL_RANK \
             $FERROTRON_NODE_RANK; echo err >&2; printf 'no newline'",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sorted_lines(&out.stdout),
        [
            "[rank 0] 0 3 0 0",
            "[rank 0] no newline",
            "[rank 1] 1 3 1 0",
            "[rank 1] no newline",
            "[rank 2] 2 3 2 0",
            "[rank 2] no newline",
        ]
    );
    assert_eq!(
        sorted_lines(&out.stderr),
        ["[rank 0] err", "[rank 1] err", "[rank 2] err"]
    );
    // Everyone can reach the store, and shares the run id.
    let (out, _) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--no-prefix",
            "--run-id",
            "job7",
            "--exec",
            "sh",
            "--",
            "-c",
            "echo $FERROTRON_RUN_ID $FERROTRON_MASTER_ADDR $FERROTRON_MASTER_PORT",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines = sorted_lines(&out.stdout);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0], lines[1]);
    let f: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(&f[..2], ["job7", "127.0.0.1"]);
    assert!(f[2].parse::<u16>().unwrap() > 0);
}

#[test]
fn launches_ferrotron_itself() {
    let (out, _) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--",
            "check",
            "models/tiny-gpt.ron",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for rank in 0..2 {
        assert!(
            stdout.contains(&format!("[rank {rank}] model       tiny-gpt")),
            "{stdout}"
        );
    }
}

#[test]
fn a_failing_rank_stops_every_other_rank() {
    let dir = scratch_dir("fail");
    let script = r#"
        if [ "$FERROTRON_RANK" = 1 ]; then sleep 0.5; echo giving up >&2; exit 3; fi
        sleep 60 & echo $$ $! > "$PIDS/$FERROTRON_RANK"; wait"#;
    let (out, took) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "3",
            "--exec",
            "sh",
            "--",
            "-c",
            script,
        ],
        &[("PIDS", dir.to_str().unwrap())],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    assert!(err.contains("[rank 1] giving up"), "{err}");
    assert!(
        err.contains("rank 1 (node 0, local rank 1") && err.contains("exit status: 3"),
        "{err}"
    );
    assert_all_gone(&dir);
    let _ = std::fs::remove_dir_all(&dir);

    // Killed by a signal: named as such.
    let (out, took) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--exec",
            "sh",
            "--",
            "-c",
            r#"if [ "$FERROTRON_RANK" = 0 ]; then kill -9 $$; fi; sleep 60"#,
        ],
        &[],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && took < Duration::from_secs(8),
        "{err}"
    );
    assert!(
        err.contains("rank 0 (") && err.contains("signal 9"),
        "{err}"
    );
}

/// A stage that fails mid-step (rank 3, on the last stage, reads a target outside the
/// vocabulary) stops the ranks of the other stage, which wait for its transfers, and its own.
#[test]
fn a_failing_stage_stops_the_pipeline() {
    let dir = scratch_dir("pipeline");
    let row = |bad: bool| -> String {
        (0..16)
            .map(|i| if bad && i == 5 { 500 } else { (i * 7 + 3) % 97 }.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let good = format!("{}\n{}\n", row(false), row(false));
    let bad = format!("{}\n{}\n", row(false), row(true));
    std::fs::write(dir.join("good"), good).unwrap();
    std::fs::write(dir.join("bad"), bad).unwrap();
    let script = r#"
        T="$DIR/good"; if [ "$FERROTRON_RANK" = 3 ]; then T="$DIR/bad"; fi
        exec "$BIN" run models/tiny-gpt.ron --tp 2 --pp 2 --micro-batches 2 --tokens "$T""#;
    let (out, took) = ferrotron(
        &[
            "launch",
            "--nproc-per-node",
            "4",
            "--timeout",
            "60",
            "--exec",
            "sh",
            "--",
            "-c",
            script,
        ],
        &[
            ("DIR", dir.to_str().unwrap()),
            ("BIN", env!("CARGO_BIN_EXE_ferrotron")),
        ],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}: {err}");
    assert!(
        err.contains("[rank 3] error:") && err.contains("target 500"),
        "{err}"
    );
    // The cause is named, not a rank that only lost its peer (whichever exited first).
    assert!(err.contains("error: rank 3 ("), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two launchers, one pipeline stage each: the stages' link crosses the nodes.
#[test]
fn pipeline_stages_on_two_nodes() {
    let port = free_port().to_string();
    let node = |rank: &str| {
        start(
            &[
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-port",
                &port,
                "--nproc-per-node",
                "2",
                "--timeout",
                "15",
                "--",
                "run",
                "models/tiny-gpt.ron",
                "--tp",
                "2",
                "--pp",
                "2",
                "--micro-batches",
                "2",
                "--verify",
            ],
            &[],
        )
    };
    let (n0, n1) = (node("0"), node("1"));
    let (o0, _) = finish(n0);
    let (o1, _) = finish(n1);
    assert!(o0.status.success(), "node 0: {}", text(&o0.stderr));
    assert!(o1.status.success(), "node 1: {}", text(&o1.stderr));
    let (s0, s1) = (text(&o0.stdout), text(&o1.stdout));
    assert!(s0.contains("[rank 0] run (cpu, 4 processes): loss"), "{s0}");
    assert_eq!(s0.matches("verified").count(), 2, "{s0}");
    assert_eq!(s1.matches("verified").count(), 2, "{s1}");
    assert!(s0.contains("pp 0)") && s1.contains("pp 1)"), "{s0}{s1}");
}

#[test]
fn two_nodes_rendezvous() {
    let port = free_port().to_string();
    let node = |rank: &str| {
        start(
            &[
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-port",
                &port,
                "--nproc-per-node",
                "2",
                "--timeout",
                "15",
                "--no-prefix",
                "--exec",
                "sh",
                "--",
                "-c",
                "echo $FERROTRON_RANK $FERROTRON_WORLD_SIZE $FERROTRON_NODE_RANK \
                 $FERROTRON_LOCAL_RANK $FERROTRON_RUN_ID",
            ],
            &[],
        )
    };
    // Node 1 first: it waits for node 0's store.
    let n1 = node("1");
    std::thread::sleep(Duration::from_millis(300));
    let n0 = node("0");
    let (o0, _) = finish(n0);
    let (o1, _) = finish(n1);
    assert!(o0.status.success(), "node 0: {}", text(&o0.stderr));
    assert!(o1.status.success(), "node 1: {}", text(&o1.stderr));
    let fields = |o: &Output| -> Vec<Vec<String>> {
        sorted_lines(&o.stdout)
            .iter()
            .map(|l| l.split(' ').map(str::to_string).collect())
            .collect()
    };
    let (f0, f1) = (fields(&o0), fields(&o1));
    let ids: Vec<[&str; 4]> = f0
        .iter()
        .chain(&f1)
        .map(|f| [f[0].as_str(), f[1].as_str(), f[2].as_str(), f[3].as_str()])
        .collect();
    assert_eq!(
        ids,
        [
            ["0", "4", "0", "0"],
            ["1", "4", "0", "1"],
            ["2", "4", "1", "0"],
            ["3", "4", "1", "1"],
        ]
    );
    // One run id for the whole job.
    assert!(f0.iter().chain(&f1).all(|f| f[4] == f0[0][4]));
}

#[test]
fn a_failure_on_node_1_stops_node_0() {
    let port = free_port().to_string();
    let dir = scratch_dir("nodes");
    let script = r#"
        if [ "$FERROTRON_RANK" = 3 ]; then sleep 0.5; exit 3; fi
        sleep 60 & echo $$ $! > "$PIDS/$FERROTRON_RANK"; wait"#;
    let node = |rank: &str| {
        start(
            &[
                "launch",
                "--nnodes",
                "2",
                "--node-rank",
                rank,
                "--master-port",
                &port,
                "--nproc-per-node",
                "2",
                "--timeout",
                "15",
                "--exec",
                "sh",
                "--",
                "-c",
                script,
            ],
            &[("PIDS", dir.to_str().unwrap())],
        )
    };
    let n0 = node("0");
    let n1 = node("1");
    let (o0, t0) = finish(n0);
    let (o1, t1) = finish(n1);
    let (e0, e1) = (text(&o0.stderr), text(&o1.stderr));
    assert!(!o0.status.success() && !o1.status.success(), "{e0}\n{e1}");
    assert!(t0 < Duration::from_secs(8) && t1 < Duration::from_secs(8));
    assert!(
        e1.contains("rank 3 (node 1, local rank 1") && e1.contains("exit status: 3"),
        "{e1}"
    );
    // Node 0 names the rank that failed on node 1.
    assert!(
        e0.contains("rank 3 (node 1") && e0.contains("stopped this node's ranks"),
        "{e0}"
    );
    assert_all_gone(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clear_errors() {
    let fails_with = |args: &[&str], want: &str| {
        let (out, took) = ferrotron(args, &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    };
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "2",
            "--exec",
            "/nonexistent/worker",
        ],
        "cannot start worker `/nonexistent/worker`",
    );
    fails_with(&["launch", "--nproc-per-node", "2"], "nothing to launch");
    fails_with(
        &["launch", "--nproc-per-node", "0", "--exec", "true"],
        "--nproc-per-node must be at least 1",
    );
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "2",
            "--exec",
            "true",
        ],
        "--node-rank 2 is not below --nnodes 2",
    );
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--master-port",
            "0",
            "--exec",
            "true",
        ],
        "works on a single node only",
    );
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--master-addr",
            "nonexistent.invalid",
            "--exec",
            "true",
        ],
        "cannot resolve",
    );
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--master-port",
            &port,
            "--exec",
            "true",
        ],
        "cannot host the store at 127.0.0.1:",
    );
    // Node 1 with no node 0: a bounded wait, then an error naming the address.
    let port = free_port().to_string();
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-port",
            &port,
            "--timeout",
            "1",
            "--exec",
            "true",
        ],
        "no store answered at 127.0.0.1:",
    );
    // Node 0 alone: a bounded wait for the others.
    fails_with(
        &[
            "launch",
            "--nproc-per-node",
            "1",
            "--nnodes",
            "2",
            "--master-port",
            &port,
            "--timeout",
            "1",
            "--exec",
            "true",
        ],
        "not every node joined",
    );
}
