//! The launcher's building blocks in one process: the rendezvous store (set/get/add/wait,
//! blocking with timeouts, the failure record waking blocked clients, many clients at once,
//! watched connections, clear errors) and `TcpGroup` (every collective bit-identical to the
//! in-process `ThreadGroup` for 1–4 members; abort, a lost member, the job's failure, timeouts and
//! mismatches all end in an error quickly, never a hang). `WorkerEnv` parsing too.

use std::net::TcpListener;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use ferrotron_exec::{CommError, HostCollectives, ReduceOp, ThreadGroup as Group};
use ferrotron_launch::{Failure, LaunchError, Store, StoreError, StoreServer, TcpGroup, WorkerEnv};

const LONG: Duration = Duration::from_secs(20);

fn server() -> (StoreServer, Store) {
    let server = StoreServer::bind("127.0.0.1:0").expect("binds");
    let store = Store::connect(&server.addr().to_string(), LONG).expect("connects");
    (server, store)
}

fn client(server: &StoreServer) -> Store {
    Store::connect(&server.addr().to_string(), LONG).expect("connects")
}

#[test]
fn store_basics() {
    let (server, store) = server();
    store.set("a", b"one").unwrap();
    assert_eq!(store.get("a", LONG).unwrap(), b"one");
    assert_eq!(store.try_get("a").unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(store.try_get("missing").unwrap(), None);
    store.set("a", b"two").unwrap();
    assert_eq!(store.get("a", LONG).unwrap(), b"two");
    // Empty and binary values (a 128-byte NCCL id) round-trip.
    store.set("empty", b"").unwrap();
    assert_eq!(store.get("empty", LONG).unwrap(), b"");
    let id: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37)).collect();
    assert_eq!(store.broadcast("nccl/tp", Some(&id), LONG).unwrap(), id);
    let other = client(&server);
    assert_eq!(other.broadcast("nccl/tp", None, LONG).unwrap(), id);
    // Counters.
    assert_eq!(store.add("n", 5).unwrap(), 5);
    assert_eq!(other.add("n", -2).unwrap(), 3);
    assert_eq!(store.get("n", LONG).unwrap(), b"3");
    assert!(matches!(
        store.add("a", 1),
        Err(StoreError::Refused { op: "add", .. })
    ));
    // The first writer wins.
    assert_eq!(store.set_if_absent("x", b"first").unwrap(), b"first");
    assert_eq!(other.set_if_absent("x", b"second").unwrap(), b"first");
    // The connection survives a refused request.
    assert_eq!(store.get("x", LONG).unwrap(), b"first");
    assert_eq!(store.failure().unwrap(), None);
}

#[test]
fn store_blocking_get_and_wait() {
    let (server, store) = server();
    // A get that times out says so, after about the timeout.
    let start = Instant::now();
    let err = store.get("never", Duration::from_millis(200)).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&err, StoreError::Timeout { op: "get", key, .. } if key == "never"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A blocked get and wait return as soon as another client sets the keys.
    let setter = client(&server);
    thread::scope(|s| {
        s.spawn(|| {
            thread::sleep(Duration::from_millis(100));
            setter.set("k1", b"v1").unwrap();
            thread::sleep(Duration::from_millis(50));
            setter.set("k2", b"v2").unwrap();
        });
        let start = Instant::now();
        assert_eq!(store.get("k1", LONG).unwrap(), b"v1");
        store.wait(&["k1", "k2"], LONG).unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
    });
    let err = store
        .wait(&["k1", "k3"], Duration::from_millis(50))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Timeout { op: "wait", .. }),
        "{err}"
    );
}

#[test]
fn store_failure_wakes_every_blocked_client() {
    let (server, store) = server();
    let clients: Vec<Store> = (0..6).map(|_| client(&server)).collect();
    let started = Barrier::new(clients.len() + 1);
    thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let started = &started;
                s.spawn(move || {
                    started.wait();
                    let t = Instant::now();
                    let err = if i % 2 == 0 {
                        c.get(&format!("never/{i}"), LONG).unwrap_err()
                    } else {
                        c.barrier("b", 100, LONG).unwrap_err()
                    };
                    (err, t.elapsed())
                })
            })
            .collect();
        started.wait();
        thread::sleep(Duration::from_millis(100));
        let f = Failure {
            rank: Some(3),
            why: "rank 3 failed: exit status: 3".into(),
        };
        assert_eq!(store.fail(&f).unwrap(), f);
        // The first record stands.
        let later = Failure {
            rank: None,
            why: "later".into(),
        };
        assert_eq!(store.fail(&later).unwrap(), f);
        for h in handles {
            let (err, took) = h.join().unwrap();
            assert!(matches!(&err, StoreError::Failed(g) if *g == f), "{err}");
            assert!(took < Duration::from_secs(2), "{took:?}");
        }
    });
    assert_eq!(clients[0].failure().unwrap().unwrap().rank, Some(3));
    assert_eq!(
        server.failure().unwrap().why,
        "rank 3 failed: exit status: 3"
    );
    // Non-blocking requests still work; a get of a key that exists needs no waiting.
    store.set("k", b"v").unwrap();
    assert_eq!(store.get("k", LONG).unwrap(), b"v");
}

#[test]
fn store_many_clients() {
    let (server, store) = server();
    const N: usize = 16;
    thread::scope(|s| {
        for i in 0..N {
            let server = &server;
            s.spawn(move || {
                let c = client(server);
                for _ in 0..50 {
                    c.add("count", 1).unwrap();
                }
                c.set(&format!("member/{i}"), i.to_string().as_bytes())
                    .unwrap();
                // The barrier is reusable: three rounds in lockstep.
                for round in 0..3 {
                    c.barrier("sync", N, LONG).unwrap();
                    c.add(&format!("round/{round}"), 1).unwrap();
                }
                // Everyone passed round 2's barrier, so everyone finished round 1's add.
                assert_eq!(c.get("round/1", LONG).unwrap(), N.to_string().as_bytes());
                for j in 0..N {
                    let v = c.get(&format!("member/{j}"), LONG).unwrap();
                    assert_eq!(v, j.to_string().as_bytes());
                }
            });
        }
    });
    assert_eq!(store.add("count", 0).unwrap(), (N * 50) as i64);
}

#[test]
fn store_watched_connections() {
    let (server, store) = server();
    // A watched connection closed properly records nothing.
    let w = client(&server);
    w.watch("node 1's launcher").unwrap();
    w.close().unwrap();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(store.failure().unwrap(), None);
    // Dropped without goodbye: the node counts as lost, and blocked clients hear of it.
    let w = client(&server);
    w.watch("node 2's launcher").unwrap();
    thread::scope(|s| {
        let h = s.spawn(|| store.get("never", LONG).unwrap_err());
        thread::sleep(Duration::from_millis(100));
        drop(w);
        let err = h.join().unwrap();
        assert!(
            matches!(&err, StoreError::Failed(f) if f.why.contains("node 2's launcher lost")),
            "{err}"
        );
    });
}

#[test]
fn store_errors_are_clear() {
    let (server, store) = server();
    // Port in use.
    let err = StoreServer::bind(&server.addr().to_string()).unwrap_err();
    assert!(matches!(err, StoreError::Bind { .. }), "{err}");
    assert!(err.to_string().contains("cannot host the store"), "{err}");
    // Bad addresses.
    for bad in [
        "not an address",
        "nonexistent.invalid:1234",
        "127.0.0.1:99999",
    ] {
        let err = Store::connect(bad, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, StoreError::Resolve { .. }), "{bad}: {err}");
    }
    // Nothing listening: retried until the timeout, then an error naming the address.
    let free = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let start = Instant::now();
    let err = Store::connect(&free.to_string(), Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    // Something that is not a store.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = other.local_addr().unwrap();
    thread::scope(|s| {
        s.spawn(|| {
            use std::io::Write;
            let (mut c, _) = other.accept().unwrap();
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        });
        let err = Store::connect(&addr.to_string(), LONG).unwrap_err();
        assert!(matches!(err, StoreError::Protocol { .. }), "{err}");
    });
    // The server goes away: a blocked client gets an error promptly, and so do later requests.
    thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            (store.get("never", LONG).unwrap_err(), t.elapsed())
        });
        thread::sleep(Duration::from_millis(100));
        drop(server);
        let (err, took) = h.join().unwrap();
        assert!(took < Duration::from_secs(2), "{took:?}: {err}");
        assert!(store.set("k", b"v").is_err());
    });
}

// ---------------------------------------------------------------------------------------------
// TcpGroup

/// Member `rank`'s data for case `case`: the same wherever it is generated.
fn data(case: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(case.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ rank as u64);
    (0..len).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// One collective's result on every member, through the in-process group or the TCP group.
#[derive(Clone, Copy, Debug)]
enum Op {
    AllReduce(ReduceOp),
    AllGather,
    ReduceScatter,
}

const OPS: [Op; 4] = [
    Op::AllReduce(ReduceOp::Sum),
    Op::AllReduce(ReduceOp::Max),
    Op::AllGather,
    Op::ReduceScatter,
];

fn case_len(op: Op, len: usize, size: usize) -> usize {
    match op {
        // A multiple of the size, as reduce_scatter requires.
        Op::ReduceScatter => len.div_ceil(size) * size,
        _ => len,
    }
}

fn in_process(op: Op, size: usize, case: u64, len: usize) -> Vec<Vec<u32>> {
    let group = Group::new(size, LONG);
    thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let group = &group;
                s.spawn(move || {
                    let mut x = data(case, rank, len);
                    match op {
                        Op::AllReduce(r) => {
                            group.all_reduce(rank, &mut x, r).unwrap();
                            bits(&x)
                        }
                        Op::AllGather => {
                            let mut out = vec![0.0; len * size];
                            group.all_gather(rank, &x, &mut out).unwrap();
                            bits(&out)
                        }
                        Op::ReduceScatter => {
                            let mut out = vec![0.0; len / size];
                            group.reduce_scatter(rank, &x, &mut out).unwrap();
                            bits(&out)
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn over_tcp(group: &TcpGroup, op: Op, case: u64, len: usize) -> Vec<u32> {
    let (rank, size) = (group.rank(), group.size());
    let mut x = data(case, rank, len);
    match op {
        Op::AllReduce(r) => {
            group.all_reduce(rank, &mut x, r).unwrap();
            bits(&x)
        }
        Op::AllGather => {
            let mut out = vec![0.0; len * size];
            group.all_gather(rank, &x, &mut out).unwrap();
            bits(&out)
        }
        Op::ReduceScatter => {
            let mut out = vec![0.0; len / size];
            group.reduce_scatter(rank, &x, &mut out).unwrap();
            bits(&out)
        }
    }
}

/// Runs `f(group)` on `size` member threads, each with its own store connection and TcpGroup.
fn members<T: Send>(
    server: &StoreServer,
    name: &str,
    size: usize,
    timeout: Duration,
    f: impl Fn(TcpGroup, &Store) -> T + Sync,
) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let store = client(server);
                    let group = TcpGroup::connect(&store, name, rank, size, timeout).unwrap();
                    f(group, &store)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tcp_group_matches_in_process_group_bitwise() {
    let (server, _store) = server();
    let lens = [0, 1, 3, 50, 783, 4099];
    for size in 1..=4 {
        // One group per size, reused for every case: collectives back to back.
        let results = members(&server, &format!("g{size}"), size, LONG, |group, _| {
            let mut out = Vec::new();
            for (case, (op, len)) in OPS
                .iter()
                .flat_map(|op| lens.iter().map(move |len| (*op, *len)))
                .enumerate()
            {
                let len = case_len(op, len, size);
                out.push(over_tcp(&group, op, case as u64, len));
            }
            out
        });
        for (case, (op, len)) in OPS
            .iter()
            .flat_map(|op| lens.iter().map(move |len| (*op, *len)))
            .enumerate()
        {
            let len = case_len(op, len, size);
            let want = in_process(op, size, case as u64, len);
            for rank in 0..size {
                assert!(
                    results[rank][case] == want[rank],
                    "size {size}, {op:?} of {len}: rank {rank} differs from the in-process group"
                );
            }
        }
    }
}

#[test]
fn tcp_group_large_all_reduce() {
    // Far more than a socket buffer in every direction at once: no member may block on a full
    // socket while its peer does too.
    let (server, _store) = server();
    let len = 1 << 20;
    let results = members(&server, "big", 3, LONG, |group, _| {
        over_tcp(&group, Op::AllReduce(ReduceOp::Sum), 7, len)
    });
    let want = in_process(Op::AllReduce(ReduceOp::Sum), 3, 7, len);
    assert!(results == want);
}

/// Member 0's `f(group)` runs while the others block in an all-reduce; returns their errors
/// and how long they took.
fn others_fail_while(
    server: &StoreServer,
    name: &str,
    size: usize,
    timeout: Duration,
    first: impl Fn(TcpGroup, &Store) + Sync,
) -> Vec<(CommError, Duration)> {
    members(server, name, size, timeout, |group, store| {
        if group.rank() == 0 {
            first(group, store);
            return None;
        }
        let start = Instant::now();
        let mut x = vec![1.0f32; 1000];
        let err = group
            .all_reduce(group.rank(), &mut x, ReduceOp::Sum)
            .unwrap_err();
        // A failed group stays failed.
        assert_eq!(
            group.all_reduce(group.rank(), &mut x, ReduceOp::Sum),
            Err(err.clone())
        );
        Some((err, start.elapsed()))
    })
    .into_iter()
    .flatten()
    .collect()
}

#[test]
fn tcp_group_abort_wakes_every_member() {
    let (server, _store) = server();
    let errs = others_fail_while(&server, "abort", 3, LONG, |group, _| {
        thread::sleep(Duration::from_millis(200));
        group.abort(0, "out of memory");
        let mut x = vec![0.0f32; 3];
        assert_eq!(
            group.all_reduce(0, &mut x, ReduceOp::Sum),
            Err(CommError::PeerFailed {
                rank: 0,
                why: "out of memory".into()
            })
        );
    });
    for (err, took) in errs {
        assert_eq!(
            err,
            CommError::PeerFailed {
                rank: 0,
                why: "out of memory".into()
            }
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn tcp_group_abort_from_another_thread() {
    // The member itself is blocked in a collective when its own abort comes.
    let (server, _store) = server();
    let errs = members(&server, "self-abort", 2, LONG, |group, _| {
        thread::scope(|s| {
            if group.rank() == 0 {
                s.spawn(|| {
                    thread::sleep(Duration::from_millis(200));
                    group.abort(0, "watchdog");
                });
            }
            let start = Instant::now();
            // Rank 1 never arrives at this one: rank 0 waits until its own abort.
            let mut x = vec![1.0f32; 10];
            let err = if group.rank() == 0 {
                group.all_reduce(0, &mut x, ReduceOp::Sum).unwrap_err()
            } else {
                group.all_gather(1, &x, &mut [0.0; 20]).unwrap_err()
            };
            (err, start.elapsed())
        })
    });
    for (rank, (err, took)) in errs.into_iter().enumerate() {
        assert!(took < Duration::from_secs(2), "rank {rank}: {took:?}");
        assert!(
            matches!(&err, CommError::PeerFailed { rank: 0, why } if why == "watchdog")
                || matches!(err, CommError::Mismatch { .. }),
            "rank {rank}: {err}"
        );
    }
}

#[test]
fn tcp_group_lost_member() {
    // Member 0 vanishes (as a process that dies does: its sockets close).
    let (server, _store) = server();
    let errs = others_fail_while(&server, "lost", 3, LONG, |group, _| {
        thread::sleep(Duration::from_millis(200));
        drop(group);
    });
    for (err, took) in errs {
        assert!(
            matches!(&err, CommError::PeerFailed { rank: 0, why } if why.contains("lost the connection to rank 0")),
            "{err}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn tcp_group_sees_the_jobs_failure() {
    // Member 0 is alive but busy elsewhere; a rank in another group (or on another node) failed
    // and its launcher recorded it: the members waiting here stop too.
    let (server, _store) = server();
    let errs = others_fail_while(&server, "job", 3, LONG, |_group, store| {
        thread::sleep(Duration::from_millis(200));
        store
            .fail(&Failure {
                rank: Some(5),
                why: "rank 5 (node 1, local rank 1) failed: exit status: 3".into(),
            })
            .unwrap();
        // Keep the group open: only the store tells the others.
        thread::sleep(Duration::from_millis(1500));
    });
    for (err, took) in errs {
        assert!(
            matches!(&err, CommError::PeerFailed { rank: 5, why } if why.contains("exit status: 3")),
            "{err}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn tcp_group_timeout() {
    let (server, _store) = server();
    let timeout = Duration::from_millis(300);
    let errs = others_fail_while(&server, "timeout", 2, timeout, |group, _| {
        // Arrives long after the peer gave up: it learns the peer's error.
        thread::sleep(Duration::from_millis(800));
        let mut x = vec![0.0f32; 1000];
        let err = group.all_reduce(0, &mut x, ReduceOp::Sum).unwrap_err();
        assert!(
            matches!(
                err,
                CommError::Timeout {
                    op: "all_reduce",
                    ..
                }
            ),
            "{err}"
        );
    });
    for (err, took) in errs {
        // The member that waited names the one it waited for, member 0.
        assert!(
            matches!(
                &err,
                CommError::Timeout {
                    op: "all_reduce",
                    missing,
                    ..
                } if missing == &[0]
            ),
            "{err}"
        );
        assert!(took >= timeout && took < Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn tcp_group_mismatch() {
    let (server, _store) = server();
    let errs = members(&server, "mismatch", 3, LONG, |group, _| {
        let rank = group.rank();
        let mut x = vec![1.0f32; if rank == 2 { 12 } else { 10 }];
        let first = group.all_reduce(rank, &mut x, ReduceOp::Sum);
        // Local checks fail at once, without talking to anyone.
        let bad_rank = group.all_reduce(rank + 1, &mut x, ReduceOp::Sum);
        (first, bad_rank)
    });
    for (rank, (first, later)) in errs.into_iter().enumerate() {
        let err = first.unwrap_err();
        assert!(
            matches!(&err, CommError::Mismatch { what } if what.contains("12 elements")),
            "rank {rank}: {err}"
        );
        assert_eq!(later, Err(err));
    }
    // A wrong rank or output size on a healthy group: a mismatch, the group fails.
    let errs = members(&server, "local", 2, LONG, |group, _| {
        if group.rank() == 0 {
            let err = group.all_gather(0, &[1.0; 3], &mut [0.0; 5]).unwrap_err();
            assert!(matches!(err, CommError::Mismatch { .. }), "{err}");
            None
        } else {
            Some(group.all_gather(1, &[1.0; 3], &mut [0.0; 6]).unwrap_err())
        }
    });
    let err = errs.into_iter().flatten().next().unwrap();
    assert!(
        matches!(&err, CommError::Mismatch { what } if what.contains("output has 5 elements")),
        "{err}"
    );
}

#[test]
fn tcp_group_connect_errors() {
    let (server, store) = server();
    // Bad arguments.
    let err = TcpGroup::connect(&store, "g", 2, 2, LONG).unwrap_err();
    assert!(matches!(err, StoreError::Group { .. }), "{err}");
    // A member that never comes: a bounded wait, naming it.
    let start = Instant::now();
    let errs: Vec<_> = thread::scope(|s| {
        let hs: Vec<_> = [0usize, 2]
            .into_iter()
            .map(|rank| {
                let server = &server;
                s.spawn(move || {
                    let c = client(server);
                    TcpGroup::connect(&c, "missing", rank, 3, Duration::from_millis(400))
                        .unwrap_err()
                        .to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        errs[0].contains("[1, 2]") || errs[0].contains("[1]"),
        "{}",
        errs[0]
    );
    assert!(errs[1].contains("rank 1 did not join"), "{}", errs[1]);
    // Members that disagree on the size.
    let errs: Vec<_> = thread::scope(|s| {
        let hs: Vec<_> = [(0usize, 2usize), (1, 3)]
            .into_iter()
            .map(|(rank, size)| {
                let server = &server;
                s.spawn(move || {
                    let c = client(server);
                    TcpGroup::connect(&c, "sizes", rank, size, Duration::from_secs(2))
                        .map(|_| ())
                        .unwrap_err()
                        .to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs[0].contains("size 3"), "{}", errs[0]);
    assert!(errs[1].contains("refused"), "{}", errs[1]);
    // The job fails while members wait for each other: they stop at once.
    let start = Instant::now();
    thread::scope(|s| {
        let h = s.spawn(|| {
            let c = client(&server);
            TcpGroup::connect(&c, "doomed", 1, 2, LONG).unwrap_err()
        });
        thread::sleep(Duration::from_millis(100));
        store
            .fail(&Failure {
                rank: Some(0),
                why: "gone".into(),
            })
            .unwrap();
        let err = h.join().unwrap();
        assert!(matches!(err, StoreError::Failed(_)), "{err}");
    });
    assert!(start.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// WorkerEnv

#[test]
fn worker_env_round_trip_and_errors() {
    assert_eq!(WorkerEnv::from_vars(|_| None).unwrap(), None);
    let env = WorkerEnv {
        rank: 5,
        world_size: 8,
        local_rank: 1,
        local_world_size: 4,
        node_rank: 1,
        nnodes: 2,
        master_addr: "::1".into(),
        master_port: 29500,
        run_id: "abc".into(),
        timeout: Duration::from_secs(60),
    };
    let vars = env.vars();
    let get = |vars: &[(&str, String)], k: &str| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    };
    assert_eq!(
        WorkerEnv::from_vars(|k| get(&vars, k)).unwrap(),
        Some(env.clone())
    );
    assert_eq!(env.store_addr(), "[::1]:29500");
    // A value that does not parse, a missing one, an inconsistent one: named errors.
    let with = |var: &'static str, value: Option<&str>| {
        let mut v = vars.clone();
        v.retain(|(n, _)| *n != var);
        if let Some(value) = value {
            v.push((var, value.to_string()));
        }
        WorkerEnv::from_vars(|k| get(&v, k)).unwrap_err()
    };
    let err = with("FERROTRON_WORLD_SIZE", Some("eight"));
    assert!(
        matches!(
            &err,
            LaunchError::Env {
                var: "FERROTRON_WORLD_SIZE",
                ..
            }
        ),
        "{err}"
    );
    let err = with("FERROTRON_MASTER_PORT", None);
    assert!(err.to_string().contains("not set"), "{err}");
    let err = with("FERROTRON_RANK", Some("8"));
    assert!(err.to_string().contains("world size 8"), "{err}");
    let err = with("FERROTRON_MASTER_PORT", Some("70000"));
    assert!(err.to_string().contains("not a port"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Processes: this test binary, launched as workers

/// A worker (when a launcher started this binary, see `workers_all_reduce_across_processes`;
/// otherwise it does nothing): meets the others through the store, all-reduces over a
/// `TcpGroup` and checks the sum against the rank-order reduction, bit for bit.
#[test]
fn worker_all_reduce() {
    let Some(env) = WorkerEnv::from_env().unwrap() else {
        return;
    };
    let store = env.connect_store().unwrap();
    let group = TcpGroup::connect(&store, "world", env.rank, env.world_size, env.timeout).unwrap();
    let mut x = data(11, env.rank, 783);
    group.all_reduce(env.rank, &mut x, ReduceOp::Sum).unwrap();
    let mut want = data(11, 0, 783);
    for r in 1..env.world_size {
        for (a, b) in want.iter_mut().zip(data(11, r, 783)) {
            *a += b;
        }
    }
    assert!(bits(&x) == bits(&want), "rank {}: wrong sum", env.rank);
}

#[test]
fn workers_all_reduce_across_processes() {
    use ferrotron_launch::{launch, LaunchConfig};
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "worker_all_reduce",
        "--quiet",
        "--test-threads=1",
    ];
    let mut cfg = LaunchConfig::new(exe, args.iter().map(Into::into).collect(), 3);
    cfg.timeout = LONG;
    let start = Instant::now();
    launch(&cfg).unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// A worker whose rank 1 dies while the others wait for it in an all-reduce: they fail on the
/// lost connection (and panic, so exit non-zero too), a few milliseconds later.
#[test]
fn worker_dies_mid_collective() {
    let Some(env) = WorkerEnv::from_env().unwrap() else {
        return;
    };
    let store = env.connect_store().unwrap();
    let group = TcpGroup::connect(&store, "world", env.rank, env.world_size, env.timeout).unwrap();
    if env.rank == 1 {
        thread::sleep(Duration::from_millis(300));
        std::process::exit(3);
    }
    let mut x = vec![1.0f32; 100];
    let err = group
        .all_reduce(env.rank, &mut x, ReduceOp::Sum)
        .unwrap_err();
    panic!("rank {}: {err}", env.rank);
}

#[test]
fn launcher_blames_the_rank_that_died_first() {
    use ferrotron_launch::{launch, LaunchConfig};
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "worker_dies_mid_collective",
        "--quiet",
        "--test-threads=1",
    ];
    let mut cfg = LaunchConfig::new(exe, args.iter().map(Into::into).collect(), 3);
    cfg.timeout = LONG;
    let start = Instant::now();
    let err = launch(&cfg).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(&err, LaunchError::RankFailed(f) if f.rank == Some(1) && f.why.contains("exit status: 3")),
        "{err}"
    );
}

/// Rank 0 exits at once saying only that a peer failed; rank 1 fails on its own account a
/// moment later; rank 2 would run on.
#[test]
fn worker_outlives_a_peer_failure() {
    let Some(env) = WorkerEnv::from_env().unwrap() else {
        return;
    };
    match env.rank {
        0 => std::process::exit(i32::from(ferrotron_launch::PEER_FAILED_EXIT)),
        1 => {
            thread::sleep(Duration::from_millis(300));
            std::process::exit(5);
        }
        _ => thread::sleep(Duration::from_secs(30)),
    }
}

#[test]
fn launcher_names_the_cause_not_the_rank_that_lost_a_peer() {
    use ferrotron_launch::{launch, LaunchConfig};
    let exe = std::env::current_exe().unwrap();
    let args = [
        "--exact",
        "worker_outlives_a_peer_failure",
        "--quiet",
        "--test-threads=1",
    ];
    let mut cfg = LaunchConfig::new(exe, args.iter().map(Into::into).collect(), 3);
    cfg.timeout = LONG;
    let start = Instant::now();
    let err = launch(&cfg).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(
        matches!(&err, LaunchError::RankFailed(f) if f.rank == Some(1) && f.why.contains("exit status: 5")),
        "{err}"
    );
}
