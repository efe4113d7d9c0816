//! The in-process communicator: every collective against a sequential computation, for groups
//! of 1, 2, 3, 4 and 8 member threads; determinism; back-to-back stress; abort, timeout and
//! mismatch (nobody hangs); and a throughput measurement (`--nocapture`).

use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use ferrotron_exec::{CommError, ReduceOp, ThreadGroup as Group};

const SIZES: [usize; 5] = [1, 2, 3, 4, 8];
const LONG: Duration = Duration::from_secs(30);

/// Runs `f(rank, group)` on one thread per member and returns the results in rank order.
fn run<T: Send>(group: &Group, f: impl Fn(usize, &Group) -> T + Sync) -> Vec<T> {
    thread::scope(|s| {
        let handles: Vec<_> = (0..group.size())
            .map(|rank| {
                let f = &f;
                s.spawn(move || f(rank, group))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Member `rank`'s data for test case `case`: the same wherever it is generated.
fn data(case: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(case.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ rank as u64);
    (0..len).map(|_| rng.f32() * 2.0 - 1.0).collect()
}

/// The elementwise reduction over `inputs`, in rank order.
fn reduce(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f32> {
    let mut acc = inputs[0].clone();
    for x in &inputs[1..] {
        for (a, b) in acc.iter_mut().zip(x) {
            *a = match op {
                ReduceOp::Sum => *a + *b,
                ReduceOp::Max => a.max(*b),
            };
        }
    }
    acc
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn lengths(size: usize) -> Vec<usize> {
    let mut v = vec![
        0,
        1,
        2,
        3,
        7,
        size - 1,
        size,
        size + 1,
        3 * size,
        100,
        1023,
        1024,
        1025,
        4099,
    ];
    v.sort_unstable();
    v.dedup();
    v
}

fn check_all_reduce(op: ReduceOp) {
    for size in SIZES {
        let group = Group::new(size, LONG);
        for (case, len) in lengths(size).into_iter().enumerate() {
            let inputs: Vec<_> = (0..size).map(|r| data(case as u64, r, len)).collect();
            let want = bits(&reduce(&inputs, op));
            let got = run(&group, |rank, g| {
                let mut buf = inputs[rank].clone();
                g.all_reduce(rank, &mut buf, op).unwrap();
                buf
            });
            for (rank, buf) in got.iter().enumerate() {
                assert_eq!(
                    bits(buf),
                    want,
                    "size {size}, len {len}, rank {rank}, {op:?}"
                );
            }
        }
    }
}

#[test]
fn all_reduce_sum_matches_sequential() {
    check_all_reduce(ReduceOp::Sum);
}

#[test]
fn all_reduce_max_matches_sequential() {
    check_all_reduce(ReduceOp::Max);
}

#[test]
fn all_gather_matches_sequential() {
    for size in SIZES {
        let group = Group::new(size, LONG);
        for (case, len) in [0, 1, 2, 5, 1000, 1500].into_iter().enumerate() {
            let inputs: Vec<_> = (0..size).map(|r| data(case as u64, r, len)).collect();
            let want = inputs.concat();
            let got = run(&group, |rank, g| {
                let mut out = vec![f32::NAN; size * len];
                g.all_gather(rank, &inputs[rank], &mut out).unwrap();
                out
            });
            for (rank, out) in got.iter().enumerate() {
                assert_eq!(
                    bits(out),
                    bits(&want),
                    "size {size}, len {len}, rank {rank}"
                );
            }
        }
    }
}

#[test]
fn reduce_scatter_matches_sequential() {
    for size in SIZES {
        let group = Group::new(size, LONG);
        for (case, per) in [0, 1, 2, 3, 700, 1025].into_iter().enumerate() {
            let len = per * size;
            let inputs: Vec<_> = (0..size).map(|r| data(case as u64, r, len)).collect();
            let sum = reduce(&inputs, ReduceOp::Sum);
            let got = run(&group, |rank, g| {
                let mut out = vec![f32::NAN; per];
                g.reduce_scatter(rank, &inputs[rank], &mut out).unwrap();
                out
            });
            for (rank, out) in got.iter().enumerate() {
                let want = &sum[rank * per..(rank + 1) * per];
                assert_eq!(bits(out), bits(want), "size {size}, per {per}, rank {rank}");
            }
        }
    }
}

/// Large magnitudes of both signs make the sum's order visible in its bits.
#[test]
fn sums_are_bit_identical_across_runs() {
    for size in [2, 3, 4, 8] {
        let group = Group::new(size, LONG);
        let len = 5000;
        let inputs: Vec<Vec<f32>> = (0..size)
            .map(|r| {
                data(77, r, len)
                    .iter()
                    .map(|x| x * 1e7 * (r as f32 + 1.0))
                    .collect()
            })
            .collect();
        let first = bits(&reduce(&inputs, ReduceOp::Sum));
        for _ in 0..20 {
            let got = run(&group, |rank, g| {
                let mut buf = inputs[rank].clone();
                g.all_reduce(rank, &mut buf, ReduceOp::Sum).unwrap();
                // Same group, interleaved with the other collectives.
                let mut rs = vec![0.0; len / size];
                g.reduce_scatter(rank, &inputs[rank][..len / size * size], &mut rs)
                    .unwrap();
                let mut gathered = vec![0.0; len / size * size];
                g.all_gather(rank, &rs, &mut gathered).unwrap();
                (buf, gathered)
            });
            let gathered0 = bits(&got[0].1);
            for (buf, gathered) in &got {
                assert_eq!(bits(buf), first);
                assert_eq!(bits(gathered), gathered0);
            }
        }
    }
}

/// Hundreds of back-to-back collectives of random kinds and sizes, every result checked.
#[test]
fn stress_back_to_back() {
    for size in SIZES {
        let group = Group::new(size, LONG);
        let rounds = if size == 8 { 200 } else { 400 };
        let results = run(&group, |rank, g| {
            // The same schedule on every member.
            let mut plan = fastrand::Rng::with_seed(size as u64);
            let mut checked = 0;
            for round in 0..rounds {
                let case = (size * 1000 + round) as u64;
                let kind = plan.usize(0..4);
                let len = match plan.usize(0..4) {
                    0 => plan.usize(0..4),
                    1 => plan.usize(0..64),
                    _ => plan.usize(0..3000),
                };
                let all: Vec<_> = (0..size).map(|r| data(case, r, len)).collect();
                match kind {
                    0 | 1 => {
                        let op = if kind == 0 {
                            ReduceOp::Sum
                        } else {
                            ReduceOp::Max
                        };
                        let mut buf = all[rank].clone();
                        g.all_reduce(rank, &mut buf, op).unwrap();
                        assert_eq!(bits(&buf), bits(&reduce(&all, op)), "round {round}");
                    }
                    2 => {
                        let mut out = vec![0.0; size * len];
                        g.all_gather(rank, &all[rank], &mut out).unwrap();
                        assert_eq!(bits(&out), bits(&all.concat()), "round {round}");
                    }
                    _ => {
                        let per = len / size;
                        let inputs: Vec<_> = all.iter().map(|x| x[..per * size].to_vec()).collect();
                        let mut out = vec![0.0; per];
                        g.reduce_scatter(rank, &inputs[rank], &mut out).unwrap();
                        let sum = reduce(&inputs, ReduceOp::Sum);
                        assert_eq!(bits(&out), bits(&sum[rank * per..(rank + 1) * per]));
                    }
                }
                checked += 1;
            }
            checked
        });
        assert!(results.iter().all(|&c| c == rounds));
    }
}

/// A group of one needs no partner and never waits, even with a zero timeout.
#[test]
fn size_one_is_trivial() {
    let group = Group::new(1, Duration::ZERO);
    let mut buf = vec![1.0, 2.0, 3.0];
    group.all_reduce(0, &mut buf, ReduceOp::Sum).unwrap();
    assert_eq!(buf, [1.0, 2.0, 3.0]);
    let mut out = vec![0.0; 3];
    group.all_gather(0, &buf, &mut out).unwrap();
    assert_eq!(out, buf);
    group.reduce_scatter(0, &buf, &mut out).unwrap();
    assert_eq!(out, buf);
    group.abort(0, "done");
    let err = group.all_reduce(0, &mut buf, ReduceOp::Max).unwrap_err();
    assert_eq!(
        err,
        CommError::PeerFailed {
            rank: 0,
            why: "done".into()
        }
    );
}

/// One member aborts while the others wait in an all-reduce: all of them return `PeerFailed`
/// promptly, and so does every later call, the aborting member's included.
#[test]
fn abort_wakes_waiting_members() {
    for size in [2, 3, 4, 8] {
        let group = Group::new(size, LONG);
        let aborter = size - 1;
        let want = CommError::PeerFailed {
            rank: aborter,
            why: "out of memory".into(),
        };
        let aborted_at = std::sync::OnceLock::new();
        let results = run(&group, |rank, g| {
            let mut buf = data(1, rank, 1000);
            if rank == aborter {
                thread::sleep(Duration::from_millis(100));
                aborted_at.set(Instant::now()).unwrap();
                g.abort(rank, "out of memory");
            }
            let first = g.all_reduce(rank, &mut buf, ReduceOp::Sum);
            let returned = Instant::now();
            let later = g.all_gather(rank, &buf, &mut vec![0.0; size * 1000]);
            (first, returned, later)
        });
        let aborted_at = *aborted_at.get().unwrap();
        for (rank, (first, returned, later)) in results.into_iter().enumerate() {
            assert_eq!(first.as_ref(), Err(&want), "size {size}, rank {rank}");
            assert_eq!(later.as_ref(), Err(&want), "size {size}, rank {rank}");
            let after = returned.saturating_duration_since(aborted_at);
            assert!(
                after < Duration::from_secs(1),
                "rank {rank} returned {after:?} after the abort"
            );
        }
    }
}

/// Aborts at random moments of large collectives: every member returns `Ok` or `PeerFailed` and
/// frees its buffer at once (exercising the rule that a failing member does not leave while a
/// peer still reads its buffer).
#[test]
fn abort_during_collectives_is_safe() {
    let mut rng = fastrand::Rng::with_seed(5);
    for trial in 0..40 {
        let size = [2, 3, 4][trial % 3];
        let group = Group::new(size, LONG);
        let delay = Duration::from_micros(rng.u64(0..3000));
        let start = Barrier::new(size + 1);
        thread::scope(|s| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let (group, start) = (&group, &start);
                    s.spawn(move || {
                        start.wait();
                        for round in 0.. {
                            let len = 50_000 + 1000 * round;
                            let result = match round % 3 {
                                0 => {
                                    let mut buf = vec![1.0; len];
                                    let r = group.all_reduce(rank, &mut buf, ReduceOp::Sum);
                                    if r.is_ok() {
                                        assert!(buf.iter().all(|&x| x == size as f32));
                                    }
                                    r
                                }
                                1 => {
                                    let local = vec![rank as f32; len];
                                    let mut out = vec![0.0; size * len];
                                    group.all_gather(rank, &local, &mut out)
                                }
                                _ => {
                                    let input = vec![2.0; len * size];
                                    let mut out = vec![0.0; len];
                                    group.reduce_scatter(rank, &input, &mut out)
                                }
                            };
                            if let Err(e) = result {
                                assert!(matches!(e, CommError::PeerFailed { rank: 0, .. }), "{e}");
                                return;
                            }
                        }
                    })
                })
                .collect();
            start.wait();
            thread::sleep(delay);
            group.abort(0, "stop");
            for h in handles {
                h.join().unwrap();
            }
        });
    }
}

/// A member that never arrives: the others time out, and the group stays failed.
#[test]
fn missing_member_times_out() {
    let timeout = Duration::from_millis(200);
    let group = Group::new(3, timeout);
    let results = run(&group, |rank, g| {
        if rank == 2 {
            thread::sleep(Duration::from_millis(600));
            return (
                g.all_reduce(rank, &mut [1.0], ReduceOp::Sum),
                Duration::ZERO,
            );
        }
        let t = Instant::now();
        let r = g.all_reduce(rank, &mut [1.0], ReduceOp::Sum);
        (r, t.elapsed())
    });
    for (rank, (result, took)) in results.iter().enumerate() {
        match result {
            Err(CommError::Timeout {
                op,
                waited,
                missing,
            }) => {
                assert_eq!(*op, "all_reduce");
                assert!(*waited >= timeout, "waited {waited:?}");
                // The late member learns the error of the first to time out: it names itself.
                assert_eq!(missing, &[2], "rank {rank}");
            }
            other => panic!("rank {rank}: {other:?}"),
        }
        // The first to time out waited the timeout; it woke the other at once.
        assert!(*took < Duration::from_secs(2), "took {took:?}");
    }
    assert!(results[0].1.max(results[1].1) >= timeout);
}

fn assert_all_mismatch<T: std::fmt::Debug>(results: &[Result<T, CommError>], context: &str) {
    for (rank, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Err(CommError::Mismatch { .. })),
            "{context}: rank {rank} got {r:?}"
        );
    }
}

/// Members that disagree on the collective get `Mismatch`, all of them, well before the timeout.
#[test]
fn mismatches_fail_everyone_without_hanging() {
    let t = Instant::now();
    for size in [2, 4, 8] {
        // Different lengths: the odd one arrives first, last, or in between.
        for odd in [0, size / 2, size - 1] {
            let group = Group::new(size, LONG);
            let results = run(&group, |rank, g| {
                let mut buf = vec![1.0; if rank == odd { 9 } else { 8 }];
                g.all_reduce(rank, &mut buf, ReduceOp::Sum)
            });
            assert_all_mismatch(&results, &format!("lengths, size {size}, odd {odd}"));
            // The group stays failed.
            assert!(matches!(
                group.all_reduce(0, &mut [0.0; 8], ReduceOp::Sum),
                Err(CommError::Mismatch { .. })
            ));
        }
        // Different reductions.
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            let op = if rank == 1 {
                ReduceOp::Max
            } else {
                ReduceOp::Sum
            };
            g.all_reduce(rank, &mut [1.0; 8], op)
        });
        assert_all_mismatch(&results, "reductions");
        // Different collectives.
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            if rank == 0 {
                g.all_gather(rank, &[1.0; 8], &mut vec![0.0; 8 * size])
            } else {
                g.all_reduce(rank, &mut [1.0; 8], ReduceOp::Sum)
            }
        });
        assert_all_mismatch(&results, "collectives");
        // One member's arguments disagree with themselves.
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            let out_len = if rank == 1 { 3 } else { 8 / size };
            g.reduce_scatter(rank, &[1.0; 8], &mut vec![0.0; out_len])
        });
        assert_all_mismatch(&results, "reduce_scatter output");
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            let out_len = if rank == 0 { 7 } else { 8 * size };
            g.all_gather(rank, &[1.0; 8], &mut vec![0.0; out_len])
        });
        assert_all_mismatch(&results, "all_gather output");
        // A rank used twice (and so one missing), and a rank out of range.
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            g.all_reduce(rank.max(1), &mut [1.0; 4], ReduceOp::Sum)
        });
        assert_all_mismatch(&results, "duplicate rank");
        let group = Group::new(size, LONG);
        let results = run(&group, |rank, g| {
            g.all_reduce(
                if rank == 0 { size } else { rank },
                &mut [1.0; 4],
                ReduceOp::Sum,
            )
        });
        assert_all_mismatch(&results, "rank out of range");
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// The all-reduce's bandwidth: 16 M floats over 2 members (printed, not asserted).
#[test]
fn all_reduce_throughput() {
    const N: usize = 16 << 20;
    let iters = if cfg!(debug_assertions) { 3 } else { 10 };
    let group = Group::new(2, LONG);
    let times = run(&group, |rank, g| {
        let mut buf = vec![1.0f32; N];
        g.all_reduce(rank, &mut buf, ReduceOp::Sum).unwrap(); // warm up (page faults)
        let t = Instant::now();
        for _ in 0..iters {
            g.all_reduce(rank, &mut buf, ReduceOp::Sum).unwrap();
        }
        let took = t.elapsed();
        assert_eq!(buf[N - 1], 2f32.powi(iters + 1));
        took
    });
    let secs = times.iter().max().unwrap().as_secs_f64() / iters as f64;
    let bytes = (N * std::mem::size_of::<f32>()) as f64;
    println!(
        "all_reduce of {N} f32 over 2 members ({} build): {:.2} ms each, {:.2} GB/s (buffer bytes / time)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        secs * 1e3,
        bytes / secs / 1e9,
    );
}
