//! A 2-rank Suave step (forward with SyncBN, backward, gradient averaging; no optimiser) with
//! the gradient all-reduce overlapped with the backward and with it after the backward, over
//! `TcpGroup` on loopback, both ranks as threads of this process. Also the all-reduce of every
//! gradient alone, the time the overlap can hide at best.
//!
//! Own harness instead of criterion: the modes are interleaved step by step (on, off, all-reduce,
//! on, ...) so that load from other processes on a shared machine hits every mode alike, and the
//! medians are printed side by side. Settings (environment): `SDENGINE_OVERLAP_ARCH`
//! (`resnet50`, the default: the full Suave network, 32.3 M trainable values, at 64/32-px
//! crops; or `resnet-tiny`), `SDENGINE_OVERLAP_STEPS` (timed steps per mode, default 10).
//!
//! Run: `cargo bench --bench overlap`.

use sdengine::dist::tcp::{TcpConfig, TcpGroup};
use sdengine::dist::Communicator;
use sdengine::models::resnet::ResNetConfig;
use sdengine::models::suave_head::{SuaveGrads, SuaveHeadConfig, SuaveNet};
use sdengine::nn::init::reference_fill;
use sdengine::nn::ParamStore;
use sdengine::train::run::{average_gradients, GradSync};
use sdengine::Tensor;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Overlap,
    AfterBackward,
    AllReduceOnly,
}

const MODES: [Mode; 3] = [Mode::Overlap, Mode::AfterBackward, Mode::AllReduceOnly];

struct Rank {
    store: ParamStore,
    net: SuaveNet,
    inputs: Vec<Tensor<f32>>,
    dscores: Tensor<f32>,
    donline: Tensor<f32>,
    sync: GradSync,
}

fn build(rank: usize, arch: &str) -> Rank {
    let (backbone, px, head) = match arch {
        "resnet-tiny" => (
            ResNetConfig::tiny(),
            32,
            SuaveHeadConfig {
                in_dim: 0,
                hidden: 256,
                out_dim: 64,
                n_prototypes: 10,
                n_classes: 10,
                online_heads: true,
            },
        ),
        _ => (ResNetConfig::resnet50(), 64, SuaveHeadConfig::default()),
    };
    let mut store = ParamStore::new();
    let net = SuaveNet::new(&mut store, backbone, head, 0).expect("network");
    reference_fill(&mut store, 1);
    let x = |name: &str, n: usize, side: usize| {
        Tensor::randn_named(rank as u64, name, &[n, side, side, 3], 1.0)
    };
    // Labelled 2 rows and two global views of 2 rows (one pass), two local views (another).
    let inputs = vec![
        x("lab", 2, px),
        x("g1", 2, px),
        x("g2", 2, px),
        x("l1", 2, px / 2),
        x("l2", 2, px / 2),
    ];
    let k = head.n_prototypes;
    Rank {
        store,
        net,
        inputs,
        dscores: Tensor::randn_named(rank as u64, "ds", &[10, k], 1e-3),
        donline: Tensor::randn_named(rank as u64, "do", &[2, head.n_classes], 1e-3),
        sync: GradSync::new(true),
    }
}

/// One step of `mode` on this rank; returns its wall time.
fn step(r: &mut Rank, mode: Mode, comm: &dyn Communicator) -> sdengine::Result<Duration> {
    let t = Instant::now();
    if mode == Mode::AllReduceOnly {
        average_gradients(&mut r.store, comm)?;
        return Ok(t.elapsed());
    }
    r.store.zero_grads();
    let (_, cache) = r.net.forward_with(&mut r.store, &r.inputs, true, comm)?;
    r.sync.overlap = mode == Mode::Overlap;
    let (net, ds, dl) = (&r.net, &r.dscores, &r.donline);
    r.sync.backward(&mut r.store, comm, |store, comm, ready| {
        let grads = SuaveGrads {
            scores: ds,
            embedding: None,
            online: Some([dl, dl, dl]),
        };
        net.backward_hooked(store, cache, grads, comm, ready)
    })?;
    Ok(t.elapsed())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn main() {
    let arch = std::env::var("SDENGINE_OVERLAP_ARCH").unwrap_or_else(|_| "resnet50".into());
    let steps: usize = std::env::var("SDENGINE_OVERLAP_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("its address").port()
    };
    let cfg = TcpConfig {
        connect_timeout: Duration::from_secs(60),
        op_timeout: Duration::from_secs(600),
    };
    let warm = 2;
    let times: Vec<Vec<(Mode, f64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|rank| {
                let arch = arch.clone();
                s.spawn(move || {
                    let g = TcpGroup::new(rank, 2, "127.0.0.1", port, &cfg).expect("rendezvous");
                    let mut r = build(rank, &arch);
                    let mut out = Vec::new();
                    for i in 0..warm + steps {
                        for mode in MODES {
                            let d = step(&mut r, mode, &g).expect("step");
                            if i >= warm {
                                out.push((mode, d.as_secs_f64()));
                            }
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let tensors: usize = build(0, &arch).store.trainable().len();
    println!(
        "2 ranks over TcpGroup (loopback), Suave {arch}, {steps} steps per mode after {warm} \
         warm-up, {} rayon threads shared by the ranks, {tensors} trainable tensors",
        rayon::current_num_threads()
    );
    println!("{:<34} {:>10} {:>10}", "mode (rank 0)", "median s", "min s");
    for mode in MODES {
        let mut v: Vec<f64> = times[0]
            .iter()
            .filter(|(m, _)| *m == mode)
            .map(|(_, t)| *t)
            .collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let name = match mode {
            Mode::Overlap => "step, all-reduce overlapped",
            Mode::AfterBackward => "step, all-reduce after backward",
            Mode::AllReduceOnly => "all-reduce of every gradient",
        };
        println!("{name:<34} {:>10.4} {:>10.4}", median(&mut v), min);
    }
}
