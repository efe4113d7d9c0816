//! Ranks under another launcher than ferrotron's, as threads of this test: global rank 0 hosts
//! the store and keeps it up until every rank has left (or, once the job failed, a moment
//! longer); a rank that dies without leaving, or leaves saying why it failed, fails the job for
//! the others at once; ranks that disagree on the job, a rank given twice, a taken port and an
//! absent rank 0 are clear errors.

use ferrotron_launch::{Convention, JobStore, LaunchError, RankEnv, StoreError};
use std::net::TcpListener;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// torchrun's variables for `rank` of `world` on this machine, store at `port`.
fn torchrun(rank: usize, world: usize, port: u16, timeout_s: u64) -> RankEnv {
    let vars = [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("LOCAL_WORLD_SIZE", world.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
        ("FERROTRON_TIMEOUT_SECS", timeout_s.to_string()),
    ];
    let env = RankEnv::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(env.convention, Convention::Torchrun);
    env
}

fn join(rank: usize, world: usize, port: u16) -> JobStore {
    torchrun(rank, world, port, 20).join().unwrap()
}

#[test]
fn rank_zero_keeps_the_store_until_every_rank_left() {
    let port = free_port();
    std::thread::scope(|s| {
        let host = s.spawn(move || {
            let js = join(0, 3, port);
            assert!(js.hosts_store());
            let start = Instant::now();
            js.leave(None).unwrap();
            start.elapsed()
        });
        let others: Vec<_> = (1..3)
            .map(|r| {
                s.spawn(move || {
                    let js = join(r, 3, port);
                    assert!(!js.hosts_store());
                    // Rank 0 is done; the store must still serve the others.
                    std::thread::sleep(Duration::from_millis(500));
                    js.store().set(&format!("late/{r}"), b"x").unwrap();
                    js.store()
                        .barrier("late", 2, Duration::from_secs(5))
                        .unwrap();
                    js.leave(None).unwrap();
                })
            })
            .collect();
        for o in others {
            o.join().unwrap();
        }
        let held = host.join().unwrap();
        assert!(
            held >= Duration::from_millis(400),
            "rank 0 waited: {held:?}"
        );
        assert!(held < Duration::from_secs(5), "but no longer: {held:?}");
    });
    // Gone once every rank left.
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn a_rank_that_dies_without_leaving_fails_the_job() {
    let port = free_port();
    std::thread::scope(|s| {
        let host = s.spawn(move || {
            let js = join(0, 2, port);
            let start = Instant::now();
            let err = js
                .store()
                .get("never", Duration::from_secs(10))
                .unwrap_err();
            let woke = start.elapsed();
            let start = Instant::now();
            js.leave(None).unwrap();
            (err, woke, start.elapsed())
        });
        let js = join(1, 2, port);
        std::thread::sleep(Duration::from_millis(200));
        // Its connection drops without a goodbye, as when the process dies.
        drop(js);
        let (err, woke, left) = host.join().unwrap();
        assert!(
            matches!(&err, StoreError::Failed(f) if f.why.contains("rank 1 (torchrun) lost its connection")),
            "{err}"
        );
        assert!(woke < Duration::from_secs(3), "{woke:?}");
        // Rank 1 never counts itself out: rank 0 lingers a moment, not the timeout.
        assert!(left < Duration::from_secs(5), "{left:?}");
    });
}

#[test]
fn a_failing_rank_says_why() {
    let port = free_port();
    std::thread::scope(|s| {
        let host = s.spawn(move || {
            let js = join(0, 2, port);
            let err = js
                .store()
                .get("never", Duration::from_secs(10))
                .unwrap_err();
            js.leave(None).unwrap();
            err
        });
        let js = join(1, 2, port);
        std::thread::sleep(Duration::from_millis(100));
        js.leave(Some("rank 1 failed: out of memory".into()))
            .unwrap();
        let err = host.join().unwrap();
        assert!(
            matches!(&err, StoreError::Failed(f) if f.rank == Some(1) && f.why.contains("out of memory")),
            "{err}"
        );
    });
}

#[test]
fn ranks_that_disagree_or_repeat_are_errors() {
    let port = free_port();
    std::thread::scope(|s| {
        let host = s.spawn(move || {
            let js = join(0, 2, port);
            // Rank 1 as one of 3 ranks: the shapes disagree.
            let err = torchrun(1, 3, port, 20).join().unwrap_err().to_string();
            assert!(
                err.contains("as one of 3 ranks") && err.contains("2 ranks"),
                "{err}"
            );
            // Rank 0 twice.
            let err = torchrun(0, 2, port, 20).join().unwrap_err().to_string();
            assert!(err.contains("cannot host"), "{err}");
            let err = RankEnv::from_vars(|k| match k {
                "OMPI_COMM_WORLD_RANK" => Some("1".into()),
                "OMPI_COMM_WORLD_SIZE" => Some("2".into()),
                "OMPI_COMM_WORLD_LOCAL_RANK" => Some("1".into()),
                "OMPI_COMM_WORLD_LOCAL_SIZE" => Some("2".into()),
                "MASTER_ADDR" => Some("127.0.0.1".into()),
                "MASTER_PORT" => Some(port.to_string()),
                _ => None,
            })
            .unwrap()
            .unwrap();
            // Another launcher's run id: another job at the same address.
            let e = env_err(err.join());
            assert!(e.contains("another job"), "{e}");
            let second = join(1, 2, port);
            let err = torchrun(1, 2, port, 20).join().unwrap_err().to_string();
            assert!(err.contains("rank 1 joined twice"), "{err}");
            second.leave(None).unwrap();
            js.leave(None).unwrap();
        });
        host.join().unwrap();
    });
}

fn env_err(r: Result<JobStore, LaunchError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn a_taken_port_and_an_absent_rank_zero_are_clear_errors() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = env_err(torchrun(0, 2, port, 1).join());
    assert!(
        err.contains("global rank 0 hosts the job's store under torchrun")
            && err.contains("MASTER_PORT"),
        "{err}"
    );
    drop(taken);
    let port = free_port();
    let start = Instant::now();
    let err = env_err(torchrun(1, 2, port, 1).join());
    assert!(
        err.contains("global rank 0 hosts the store on its own node") && err.contains("127.0.0.1"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}
