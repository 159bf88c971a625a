//! TcpGroup faults end in a clear error on every rank within the timeout, never a hang: a
//! port in use, a rendezvous that times out (on rank 0 and on a peer), a WORLD_SIZE that
//! differs between ranks, a rank that leaves mid-run (peer or rank 0), a rank that never
//! arrives at a collective, and mismatched collective calls.

use sdengine::dist::tcp::{TcpConfig, TcpGroup};
use sdengine::dist::Communicator;
use std::time::Duration;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn cfg(connect_ms: u64, op_ms: u64) -> TcpConfig {
    TcpConfig {
        connect_timeout: Duration::from_millis(connect_ms),
        op_timeout: Duration::from_millis(op_ms),
    }
}

/// Runs `f(rank, group-or-error)` for every rank on its own thread and returns the results in
/// rank order. `worlds[r]` is the WORLD_SIZE rank r believes in.
fn run<R: Send>(
    worlds: &[usize],
    cfg: TcpConfig,
    f: impl Fn(usize, sdengine::Result<TcpGroup>) -> R + Sync,
) -> Vec<R> {
    let port = free_port();
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = worlds
            .iter()
            .enumerate()
            .map(|(r, &w)| s.spawn(move || f(r, TcpGroup::new(r, w, "127.0.0.1", port, &cfg))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn port_in_use_is_named() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = squatter.local_addr().unwrap().port();
    let e = TcpGroup::new(0, 2, "127.0.0.1", port, &cfg(2000, 2000))
        .err()
        .expect("rank 0 must not listen on a port in use")
        .to_string();
    assert!(
        e.contains("already in use") && e.contains("MASTER_PORT"),
        "{e}"
    );
    // A peer that reaches the other program (which never answers) gives up within its timeout.
    let e = TcpGroup::new(1, 2, "127.0.0.1", port, &cfg(500, 500))
        .err()
        .expect("a peer must not join a foreign server")
        .to_string();
    assert!(e.contains("rank 1") && e.contains("timed out"), "{e}");
}

#[test]
fn rendezvous_timeouts_name_the_missing_ranks() {
    // Rank 0 of 3 with only rank 2 present.
    let port = free_port();
    let out: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| TcpGroup::new(0, 3, "127.0.0.1", port, &cfg(2000, 2000)).err());
        let b = s.spawn(|| TcpGroup::new(2, 3, "127.0.0.1", port, &cfg(8000, 8000)).err());
        [a, b]
            .map(|h| {
                h.join()
                    .unwrap()
                    .expect("the rendezvous must fail")
                    .to_string()
            })
            .to_vec()
    });
    assert!(
        out[0].contains("rendezvous timed out") && out[0].contains("missing rank(s) 1"),
        "{}",
        out[0]
    );
    assert!(
        out[1].contains("rank 2") && out[1].contains("rendezvous timed out"),
        "{}",
        out[1]
    );
    // A peer with no rank 0 at all.
    let e = TcpGroup::new(1, 2, "127.0.0.1", free_port(), &cfg(300, 300))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("could not reach rank 0") && e.contains("MASTER_PORT"),
        "{e}"
    );
}

#[test]
fn world_size_mismatch_is_caught_at_the_handshake() {
    let out = run(&[2, 3], cfg(5000, 5000), |_, g| {
        g.err().map(|e| e.to_string())
    });
    let e0 = out[0].as_deref().expect("rank 0 must refuse");
    let e1 = out[1].as_deref().expect("rank 1 must be refused");
    assert!(
        e0.contains("WORLD_SIZE=3") && e0.contains("WORLD_SIZE=2"),
        "{e0}"
    );
    assert!(
        e1.contains("rejected") && e1.contains("WORLD_SIZE=3"),
        "{e1}"
    );
}

#[test]
fn duplicate_rank_is_refused() {
    let port = free_port();
    let out: Vec<Option<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = [0usize, 1, 1]
            .into_iter()
            .map(|r| {
                s.spawn(move || {
                    TcpGroup::new(r, 3, "127.0.0.1", port, &cfg(3000, 3000))
                        .err()
                        .map(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let e0 = out[0].as_deref().expect("rank 0 must refuse");
    assert!(e0.contains("two processes claim rank 1"), "{e0}");
    assert!(out[1].is_some() && out[2].is_some());
}

#[test]
fn a_peer_that_leaves_fails_every_rank() {
    // Rank 2 joins, then exits (drops its sockets) instead of entering the all-reduce.
    let out = run(&[3, 3, 3], cfg(5000, 20_000), |r, g| {
        let g = g.unwrap();
        if r == 2 {
            drop(g);
            return None;
        }
        let mut v = vec![1.0f32; 1000];
        let first = g.all_reduce_sum_f32(&mut v).err().map(|e| e.to_string());
        let later = g.barrier().err().map(|e| e.to_string());
        Some((first, later))
    });
    let (e0, l0) = out[0].clone().unwrap();
    let (e1, l1) = out[1].clone().unwrap();
    let e0 = e0.expect("rank 0 must fail");
    let e1 = e1.expect("rank 1 must fail");
    assert!(
        e0.contains("rank 2") && e0.contains("connection closed"),
        "{e0}"
    );
    assert!(
        e1.contains("rank 1") && (e1.contains("rank 2") || e1.contains("connection closed")),
        "{e1}"
    );
    // The group stays broken.
    assert!(l0.unwrap().contains("broken"));
    assert!(l1.unwrap().contains("broken"));
}

#[test]
fn rank_zero_that_leaves_fails_the_peers() {
    let out = run(&[2, 2], cfg(5000, 20_000), |r, g| {
        let g = g.unwrap();
        if r == 0 {
            return None;
        }
        Some(g.all_reduce_sum_f64(&mut [1.0]).unwrap_err().to_string())
    });
    let e = out[1].clone().unwrap();
    assert!(
        e.contains("rank 1") && e.contains("rank 0") && e.contains("connection closed"),
        "{e}"
    );
}

#[test]
fn a_rank_that_never_arrives_times_out_everywhere() {
    // Rank 1 stays connected but busy past the collective timeout.
    let out = run(&[3, 3, 3], cfg(5000, 700), |r, g| {
        let g = g.unwrap();
        if r == 1 {
            std::thread::sleep(Duration::from_millis(2500));
            return g.barrier().err().map(|e| e.to_string());
        }
        g.barrier().err().map(|e| e.to_string())
    });
    let e0 = out[0].as_deref().expect("rank 0 must time out");
    assert!(e0.contains("timed out") && e0.contains("rank 1"), "{e0}");
    let e2 = out[2].as_deref().expect("rank 2 must fail");
    assert!(e2.contains("rank 2"), "{e2}");
    assert!(out[1].is_some(), "the late rank must see the broken group");
}

#[test]
fn mismatched_calls_are_reported_on_every_rank() {
    let out = run(&[2, 2], cfg(5000, 5000), |r, g| {
        let g = g.unwrap();
        let mut v = vec![0.0f32; 4 + r];
        g.all_reduce_sum_f32(&mut v).unwrap_err().to_string()
    });
    for e in out {
        assert!(
            e.contains("collective mismatch") && e.contains("4 f32") && e.contains("5 f32"),
            "{e}"
        );
    }
}
