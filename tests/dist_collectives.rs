//! Collectives on every host group give the same bits: LocalGroup (threads) and TcpGroup
//! (loopback sockets, one thread per rank here, one process per rank in real runs), with 2 and
//! 3 ranks, for sums, means, broadcasts, gathers and barriers in f32, f64 and bf16. The NCCL
//! group is checked the same way where a GPU and NCCL are present (else SKIP).

use half::bf16;
use sdengine::dist::env::DistEnv;
use sdengine::dist::nccl::NcclGroup;
use sdengine::dist::tcp::{TcpConfig, TcpGroup};
use sdengine::dist::{Communicator, LocalGroup, SingleProcess};
use std::time::Duration;

/// A port that was free a moment ago (bound to 0, read back, released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn cfg() -> TcpConfig {
    TcpConfig {
        connect_timeout: Duration::from_secs(30),
        op_timeout: Duration::from_secs(60),
    }
}

/// Values that make the summation order visible in the last bits: mixed magnitudes and signs
/// from a small generator keyed by rank.
fn values(rank: usize, n: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9u32.wrapping_mul(rank as u32 + 1);
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let m = (s % 2001) as f32 / 1000.0 - 1.0;
            m * 10f32.powi((i % 7) as i32 - 3)
        })
        .collect()
}

/// Everything one rank computes; compared bit for bit between groups.
#[derive(Debug, PartialEq)]
struct Results {
    sum32: Vec<u32>,
    mean32: Vec<u32>,
    sum64: Vec<u64>,
    mean64: Vec<u64>,
    sum16: Vec<u16>,
    mean16: Vec<u16>,
    bcast32: Vec<u32>,
    bcast16: Vec<u16>,
    bytes: Vec<u8>,
    gather32: Vec<u32>,
    gather16: Vec<u16>,
}

fn exercise(c: &dyn Communicator) -> Results {
    let r = c.rank();
    let w = c.world_size();
    let v = values(r, 257);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut sum32 = v.clone();
    c.all_reduce_sum_f32(&mut sum32).unwrap();
    let mut mean32 = v.clone();
    c.all_reduce_mean_f32(&mut mean32).unwrap();
    let mut sum64: Vec<f64> = v.iter().map(|&x| x as f64 * 1.000_000_1).collect();
    let mut mean64 = sum64.clone();
    c.all_reduce_sum_f64(&mut sum64).unwrap();
    c.all_reduce_mean_f64(&mut mean64).unwrap();
    let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut sum16 = h.clone();
    c.all_reduce_sum_bf16(&mut sum16).unwrap();
    let mut mean16 = h.clone();
    c.all_reduce_mean_bf16(&mut mean16).unwrap();
    c.barrier().unwrap();
    let mut bcast32 = v.clone();
    c.broadcast_f32(&mut bcast32, w - 1).unwrap();
    let mut bcast16 = h[..10].to_vec();
    c.broadcast_bf16(&mut bcast16, 0).unwrap();
    let mut bytes = vec![r as u8; 5];
    c.broadcast_bytes(&mut bytes, w / 2).unwrap();
    let mut gather32 = vec![0.0f32; 3 * w];
    c.all_gather_f32(&v[..3], &mut gather32).unwrap();
    let mut gather16 = vec![bf16::ZERO; 2 * w];
    c.all_gather_bf16(&h[..2], &mut gather16).unwrap();
    let hb = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Results {
        sum32: bits(&sum32),
        mean32: bits(&mean32),
        sum64: sum64.iter().map(|x| x.to_bits()).collect(),
        mean64: mean64.iter().map(|x| x.to_bits()).collect(),
        sum16: hb(&sum16),
        mean16: hb(&mean16),
        bcast32: bits(&bcast32),
        bcast16: hb(&bcast16),
        bytes,
        gather32: bits(&gather32),
        gather16: hb(&gather16),
    }
}

fn local(world: usize) -> Vec<Results> {
    let ranks = LocalGroup::new(world).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks.iter().map(|g| s.spawn(|| exercise(g))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tcp(world: usize) -> Vec<Results> {
    let port = free_port();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..world)
            .map(|r| {
                s.spawn(move || {
                    let g = TcpGroup::new(r, world, "127.0.0.1", port, &cfg()).unwrap();
                    exercise(&g)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tcp_matches_local_group_bit_for_bit() {
    for world in [2, 3] {
        let l = local(world);
        let t = tcp(world);
        // Every rank got the same result, and TCP equals the in-process group.
        for r in 1..world {
            assert_eq!(l[r].sum32, l[0].sum32);
            assert_eq!(l[r].gather16, l[0].gather16);
        }
        assert_eq!(t, l, "world {world}");
    }
}

#[test]
#[allow(clippy::needless_range_loop)] // i indexes three ranks' vectors in parallel
fn results_are_the_documented_reductions() {
    let l = local(3);
    let v: Vec<Vec<f32>> = (0..3).map(|r| values(r, 257)).collect();
    for i in 0..257 {
        let exact = 0.0f64 + v[0][i] as f64 + v[1][i] as f64 + v[2][i] as f64;
        assert_eq!(l[1].sum32[i], (exact as f32).to_bits());
        assert_eq!(l[1].mean32[i], ((exact / 3.0) as f32).to_bits());
        let hsum: f64 = (0..3)
            .map(|r| bf16::from_f32(v[r][i]).to_f64())
            .fold(0.0, |a, b| a + b);
        assert_eq!(l[2].sum16[i], bf16::from_f64(hsum).to_bits());
    }
    assert_eq!(
        l[0].bcast32,
        v[2].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(l[2].bytes, vec![1u8; 5]);
    let want: Vec<u32> = (0..3)
        .flat_map(|r| v[r][..3].to_vec())
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(l[0].gather32, want);
}

#[test]
fn one_rank_groups_are_the_identity() {
    let single = exercise(&SingleProcess);
    let tcp1 = TcpGroup::new(0, 1, "127.0.0.1", free_port(), &cfg()).unwrap();
    assert_eq!(exercise(&tcp1), single);
    assert_eq!(local(1).pop().unwrap(), single);
}

#[test]
fn tcp_group_from_dist_env() {
    let port = free_port();
    let out: Vec<Vec<f32>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                s.spawn(move || {
                    let env = DistEnv {
                        rank: r,
                        local_rank: r,
                        world_size: 2,
                        master_addr: "localhost".into(),
                        master_port: port,
                        source: sdengine::dist::env::EnvSource::Torchrun,
                    };
                    let g = TcpGroup::connect(&env, &cfg()).unwrap();
                    let mut v = vec![r as f32 + 1.0; 4];
                    g.all_reduce_sum_f32(&mut v).unwrap();
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out, vec![vec![3.0; 4], vec![3.0; 4]]);
}

#[test]
fn nccl_single_rank_or_skip() {
    if let Err(why) = NcclGroup::probe() {
        println!("SKIP: NCCL group not tested: {why}");
        return;
    }
    // One GPU here at most: a one-rank NCCL communicator, set up through the TCP rendezvous.
    let env = DistEnv::single();
    let rdv = TcpGroup::connect(&env, &cfg()).unwrap();
    let g = NcclGroup::new(&env, &rdv).unwrap();
    let mut v = values(0, 100);
    let want = v.clone();
    g.all_reduce_sum_f32(&mut v).unwrap();
    assert_eq!(v, want);
    let mut h: Vec<bf16> = want.iter().map(|&x| bf16::from_f32(x)).collect();
    let hw = h.clone();
    g.all_reduce_mean_bf16(&mut h).unwrap();
    assert_eq!(h, hw);
    let mut out = vec![0.0f32; 100];
    g.all_gather_f32(&want, &mut out).unwrap();
    assert_eq!(out, want);
    let mut b = vec![7u8; 3];
    g.broadcast_bytes(&mut b, 0).unwrap();
    assert_eq!(b, vec![7u8; 3]);
    g.barrier().unwrap();
    println!("NCCL one-rank group: all-reduce, gather, broadcast and barrier ran on the GPU");
}
