//! The gradient all-reduce overlapped with the backward (`dist::overlap` + `GradBuckets`).
//!
//! - Bucketed, asynchronous averaging equals `average_gradients` bit for bit on random stores,
//!   for several bucket caps (down to caps smaller than any tensor), several orders in which
//!   the gradients are reported, parameters never reported (reduced from the store, as DDP's
//!   `find_unused_parameters`) and frozen ones (left alone), over two steps with one plan.
//! - The models' grad-ready hooks report every trainable parameter exactly once, and only when
//!   its gradient is final (the snapshot taken at the report equals the gradient after the whole
//!   backward), for the Suave network and the Daino student with two resolution groups.
//! - On two in-process ranks, the Suave network's overlapped backward (SyncBN through the
//!   worker) gives the same gradients, bit for bit, as the backward followed by
//!   `average_gradients`; the worker's log of collectives shows the first bucket all-reduced
//!   before any SyncBN reduction of the backbone's backward: the all-reduce really overlaps.
//! - Faults over TcpGroup: a rank that fails mid-backward makes every rank return an error (no
//!   hang: the group reports the departed rank).

use sdengine::dist::buckets::{BucketConfig, GradBuckets, GradDtype};
use sdengine::dist::overlap::{overlapped_backward, GradReady};
use sdengine::dist::tcp::{TcpConfig, TcpGroup};
use sdengine::dist::{Communicator, LocalGroup, ReduceOp, SingleProcess};
use sdengine::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use sdengine::models::resnet::ResNetConfig;
use sdengine::models::suave_head::{SuaveGrads, SuaveHeadConfig, SuaveNet};
use sdengine::models::vit::VitConfig;
use sdengine::nn::init::reference_fill;
use sdengine::nn::{ParamId, ParamStore};
use sdengine::train::run::average_gradients;
use sdengine::Tensor;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const SEED: u64 = 5;

/// Runs `f(comm)` on every rank of a fresh LocalGroup, one thread each; results in rank order.
fn on_ranks<R: Send>(world: usize, f: impl Fn(&LocalGroup) -> R + Sync) -> Vec<R> {
    let ranks = LocalGroup::new(world).unwrap();
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = ranks.iter().map(|g| s.spawn(move || f(g))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn caps(first: usize, cap: usize) -> BucketConfig {
    BucketConfig {
        first_cap_bytes: first,
        cap_bytes: cap,
        dtype: GradDtype::F32,
    }
}

/// Parameters of assorted sizes with buffers between them and one frozen parameter; every
/// gradient (the frozen one's too) random and different on every rank and every step.
fn random_store(rank: usize, step: usize) -> ParamStore {
    let shapes: [&[usize]; 9] = [
        &[7],
        &[3, 5],
        &[64],
        &[1],
        &[33, 17],
        &[2],
        &[300],
        &[4, 4, 3],
        &[129],
    ];
    let mut s = ParamStore::new();
    for (i, sh) in shapes.iter().enumerate() {
        let id = s.param(&format!("p{i}.weight"), Tensor::zeros(sh));
        if i % 3 == 1 {
            s.buffer(&format!("p{i}.running_mean"), Tensor::zeros(&[3]));
        }
        if i == 5 {
            s.set_trainable(id, false);
        }
    }
    for e in s.entries_mut() {
        if e.grad.numel() > 0 {
            e.grad = Tensor::randn_named(
                SEED,
                &format!("g.{rank}.{step}.{}", e.name),
                e.grad.shape(),
                1.0,
            );
        }
    }
    s
}

/// Reports in the order the backward would give, in the registration order (every bucket
/// completes only at the end), a shuffle, all at once, or a shuffle that leaves some out.
#[derive(Clone, Copy, Debug)]
enum Order {
    Reverse,
    Forward,
    Shuffled,
    AllAtOnce,
    SomeUnreported,
}

fn report(order: Order, ids: &[ParamId]) -> Vec<Vec<ParamId>> {
    let one = |v: Vec<ParamId>| v.into_iter().map(|i| vec![i]).collect();
    match order {
        Order::Reverse => one(ids.iter().rev().copied().collect()),
        Order::Forward => one(ids.to_vec()),
        Order::Shuffled => one((0..ids.len())
            .map(|i| ids[(i * 5 + 3) % ids.len()])
            .collect()),
        Order::AllAtOnce => vec![ids.to_vec()],
        Order::SomeUnreported => one((0..ids.len())
            .filter(|i| i % 3 != 0)
            .map(|i| ids[(i * 5 + 3) % ids.len()])
            .collect()),
    }
}

fn grads(s: &ParamStore) -> Vec<Vec<f32>> {
    s.entries().iter().map(|e| e.grad.data().to_vec()).collect()
}

#[test]
fn bucketed_overlap_equals_average_gradients_bit_for_bit() {
    let orders = [
        Order::Reverse,
        Order::Forward,
        Order::Shuffled,
        Order::AllAtOnce,
        Order::SomeUnreported,
    ];
    // Bytes: caps smaller than every tensor (each its own bucket), a few tensors a bucket,
    // one tensor cut off by the cap, DDP's defaults (one bucket for this store).
    let configs = [
        caps(4, 4),
        caps(64, 256),
        caps(300, 1300),
        BucketConfig::default(),
    ];
    for world in [2usize, 3] {
        let out = on_ranks(world, |g| {
            let mut checked = 0;
            for cfg in &configs {
                let mut plan = GradBuckets::for_store(&random_store(0, 0), cfg).unwrap();
                let n_buckets = plan.buckets().len();
                for (k, &order) in orders.iter().enumerate() {
                    // Two steps per plan: the second reuses the buffers.
                    for step in 0..2 {
                        let local = random_store(g.rank(), 10 * k + step);
                        let mut want = local.clone();
                        average_gradients(&mut want, g).unwrap();
                        let mut got = local.clone();
                        assert!(plan.matches(&got));
                        let ids = got.trainable();
                        let calls = report(order, &ids);
                        overlapped_backward(&mut got, &mut plan, g, |st, _c, ready| {
                            for ids in &calls {
                                ready.ready(st, ids)?;
                            }
                            Ok(())
                        })
                        .unwrap();
                        let what = format!("world {world}, {cfg:?}, {order:?}, step {step}");
                        assert_eq!(grads(&got), grads(&want), "{what}");
                        // The averaging did something: trainable gradients changed, the
                        // frozen one did not.
                        for (e, l) in got.entries().iter().zip(local.entries()) {
                            let trainable = e.name != "p5.weight" && e.grad.numel() > 0;
                            assert_eq!(e.grad != l.grad, trainable, "{what}: {}", e.name);
                        }
                        checked += 1;
                    }
                }
                if cfg.cap_bytes == 4 {
                    assert_eq!(n_buckets, 8, "one bucket per trainable tensor");
                }
            }
            checked
        });
        assert!(out.iter().all(|&n| n == configs.len() * orders.len() * 2));
    }
}

/// Snapshots each reported gradient and checks that nothing is reported twice.
#[derive(Default)]
struct Snapshots(HashMap<ParamId, Vec<f32>>);

impl GradReady for Snapshots {
    fn ready(&mut self, store: &ParamStore, ids: &[ParamId]) -> sdengine::Result<()> {
        for &id in ids {
            let old = self.0.insert(id, store.grad(id).data().to_vec());
            assert!(old.is_none(), "{} reported twice", store.entry(id).name);
        }
        Ok(())
    }
}

/// Every trainable parameter was reported, and its gradient at the report is the final one.
fn check_snapshots(snap: &Snapshots, store: &ParamStore) {
    for id in store.trainable() {
        let name = &store.entry(id).name;
        let at = snap
            .0
            .get(&id)
            .unwrap_or_else(|| panic!("{name} never reported"));
        assert_eq!(
            at.as_slice(),
            store.grad(id).data(),
            "{name}: changed after it was reported final"
        );
    }
    for id in snap.0.keys() {
        assert!(store.trainable().contains(id), "frozen entry reported");
    }
}

fn tiny_suave(store: &mut ParamStore) -> SuaveNet {
    let head = SuaveHeadConfig {
        in_dim: 0,
        hidden: 32,
        out_dim: 8,
        n_prototypes: 10,
        n_classes: 7,
        online_heads: true,
    };
    let net = SuaveNet::new(store, ResNetConfig::tiny(), head, 0).unwrap();
    reference_fill(store, SEED);
    net
}

/// Suave inputs of rank `r`: labelled 2 + global 3 rows at 32 px, two local views at 16 px
/// (two backbone passes).
fn suave_inputs(r: usize) -> Vec<Tensor<f32>> {
    let x = |name: &str, n: usize, px: usize| {
        Tensor::randn_named(SEED, &format!("{name}.{r}"), &[n, px, px, 3], 1.0)
    };
    vec![
        x("lab", 2, 32),
        x("g", 3, 32),
        x("l1", 2, 16),
        x("l2", 2, 16),
    ]
}

fn suave_grads(r: usize) -> (Tensor<f32>, Tensor<f32>) {
    (
        Tensor::randn_named(SEED, &format!("ds.{r}"), &[9, 10], 1.0),
        Tensor::randn_named(SEED, &format!("dl.{r}"), &[2, 7], 1.0),
    )
}

#[test]
fn suave_hooks_report_every_parameter_once_when_final() {
    let mut s = ParamStore::new();
    let net = tiny_suave(&mut s);
    let (out, cache) = net.forward(&mut s, &suave_inputs(0), true).unwrap();
    assert_eq!(cache.group_rows(), vec![5, 4]);
    assert_eq!(out.scores.shape(), &[9, 10]);
    let (ds, dl) = suave_grads(0);
    let mut snap = Snapshots::default();
    let grads = SuaveGrads {
        scores: &ds,
        embedding: None,
        online: Some([&dl, &dl, &dl]),
    };
    net.backward_hooked(&mut s, cache, grads, &SingleProcess, &mut snap)
        .unwrap();
    check_snapshots(&snap, &s);
    assert_eq!(snap.0.len(), s.trainable().len());
}

#[test]
fn daino_hooks_report_every_parameter_once_when_final() {
    let vit = VitConfig {
        patch: 4,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_ratio: 2.0,
        drop_path_rate: 0.0,
        img_size: 16,
        in_chans: 3,
        eps: 1e-6,
    };
    for norm_last_layer in [false, true] {
        let head = DinoHeadConfig {
            in_dim: 8,
            out_dim: 5,
            hidden_dim: 12,
            bottleneck_dim: 6,
            nlayers: 3,
            norm_last_layer,
        };
        let mut s = ParamStore::new();
        let m = MultiCropWrapper::new(&mut s, vit, head, 0).unwrap();
        reference_fill(&mut s, SEED);
        let crops = [
            Tensor::randn_named(SEED, "a", &[2, 16, 16, 3], 1.0),
            Tensor::randn_named(SEED, "b", &[1, 16, 16, 3], 1.0),
            Tensor::randn_named(SEED, "c", &[3, 8, 8, 3], 1.0),
        ];
        let (out, cache) = m.forward(&s, &crops, None).unwrap();
        let dl = Tensor::randn_named(SEED, "dl", out.logits.shape(), 1.0);
        let mut snap = Snapshots::default();
        m.backward_hooked(&mut s, cache, &dl, &mut snap).unwrap();
        check_snapshots(&snap, &s);
        assert_eq!(snap.0.len(), s.trainable().len(), "{norm_last_layer}");
        // weight_g is reported exactly when it is trained.
        assert_eq!(snap.0.contains_key(&m.head.weight_g), !norm_last_layer);
    }
}

/// Logs the collectives it runs (kind and length) and forwards them to the group.
struct Recorder<'a> {
    inner: &'a LocalGroup,
    log: Mutex<Vec<(&'static str, usize)>>,
}

impl Communicator for Recorder<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> sdengine::Result<()> {
        let kind = if op == ReduceOp::Mean {
            "f32 mean"
        } else {
            "f32 sum"
        };
        self.log.lock().unwrap().push((kind, buf.len()));
        self.inner.all_reduce_f32(buf, op)
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> sdengine::Result<()> {
        self.log.lock().unwrap().push(("f64", buf.len()));
        self.inner.all_reduce_f64(buf, op)
    }
    fn all_reduce_bf16(&self, buf: &mut [half::bf16], op: ReduceOp) -> sdengine::Result<()> {
        self.log.lock().unwrap().push(("bf16", buf.len()));
        self.inner.all_reduce_bf16(buf, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> sdengine::Result<()> {
        self.log.lock().unwrap().push(("broadcast", buf.len()));
        self.inner.broadcast_bytes(buf, root)
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> sdengine::Result<()> {
        self.log.lock().unwrap().push(("gather", send.len()));
        self.inner.all_gather_bytes(send, recv)
    }
    fn barrier(&self) -> sdengine::Result<()> {
        self.log.lock().unwrap().push(("barrier", 0));
        self.inner.barrier()
    }
}

#[test]
fn overlapped_suave_backward_equals_backward_then_average_and_overlaps() {
    // Small caps: many buckets (the tiny network has ~0.4 M trainable values).
    let cfg = caps(16 << 10, 256 << 10);
    let out = on_ranks(2, |g| {
        let r = g.rank();
        let mut base = ParamStore::new();
        let net = tiny_suave(&mut base);
        let (ds, dl) = suave_grads(r);
        let grads = || SuaveGrads {
            scores: &ds,
            embedding: None,
            online: Some([&dl, &dl, &dl]),
        };
        // Reference: backward to the end, then average_gradients.
        let mut want = base.clone();
        let (_, cache) = net
            .forward_with(&mut want, &suave_inputs(r), true, g)
            .unwrap();
        net.backward_with(&mut want, cache, grads(), g).unwrap();
        average_gradients(&mut want, g).unwrap();
        // Overlapped, every collective of the backward logged in the order the worker ran it.
        let mut got = base.clone();
        let (_, cache) = net
            .forward_with(&mut got, &suave_inputs(r), true, g)
            .unwrap();
        let rec = Recorder {
            inner: g,
            log: Mutex::new(Vec::new()),
        };
        let mut plan = GradBuckets::for_store(&got, &cfg).unwrap();
        overlapped_backward(&mut got, &mut plan, &rec, |st, c, ready| {
            net.backward_hooked(st, cache, grads(), c, ready)
        })
        .unwrap();
        assert_eq!(grads_of(&got), grads_of(&want), "rank {r}");
        (rec.log.into_inner().unwrap(), plan.buckets().len())
    });
    for (log, n_buckets) in out {
        assert!(n_buckets >= 4, "{n_buckets} buckets");
        let means: Vec<usize> = (0..log.len()).filter(|&i| log[i].0 == "f32 mean").collect();
        assert_eq!(means.len(), n_buckets, "one all-reduce per bucket: {log:?}");
        let syncbn = |from: usize| log[from..].iter().filter(|e| e.0 == "f64").count();
        // SyncBN reductions in the backward: the projection's BN, then per backbone pass the
        // stem's and 3 per bottleneck + 1 per downsample (4 blocks, each with a downsample).
        let per_pass = 1 + 4 * 4;
        assert_eq!(syncbn(0), 1 + 2 * per_pass, "{log:?}");
        // The first bucket (head parameters) was all-reduced before the backbone's backward
        // started: every backbone SyncBN reduction of both passes comes after it.
        assert!(syncbn(means[0]) >= 2 * per_pass, "{log:?}");
        // Every bucket but the last (which holds the stem) went before the stem's BN
        // reduction, i.e. during the backward, not after it.
        let last_bn = (0..log.len()).rev().find(|&i| log[i].0 == "f64").unwrap();
        assert!(means[n_buckets - 2] < last_bn, "{log:?}");
        assert!(means[n_buckets - 1] > last_bn, "{log:?}");
    }
}

fn grads_of(s: &ParamStore) -> Vec<(String, Vec<f32>)> {
    s.entries()
        .iter()
        .map(|e| (e.name.clone(), e.grad.data().to_vec()))
        .collect()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Fails after `after` reports (a rank whose backward breaks half-way).
struct FailAfter<'a> {
    inner: &'a mut dyn GradReady,
    after: usize,
}

impl GradReady for FailAfter<'_> {
    fn ready(&mut self, store: &ParamStore, ids: &[ParamId]) -> sdengine::Result<()> {
        if self.after == 0 {
            return Err(sdengine::Error::invalid(
                "test",
                "injected failure in the backward",
            ));
        }
        self.after -= 1;
        self.inner.ready(store, ids)
    }
}

#[test]
fn a_rank_failing_mid_backward_fails_every_rank() {
    let port = free_port();
    let cfg = TcpConfig {
        connect_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(60),
    };
    let bcfg = caps(16 << 10, 256 << 10);
    let out: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|r| {
                s.spawn(move || {
                    let g = TcpGroup::new(r, 2, "127.0.0.1", port, &cfg).unwrap();
                    let mut st = ParamStore::new();
                    let net = tiny_suave(&mut st);
                    let (ds, dl) = suave_grads(r);
                    let (_, cache) = net
                        .forward_with(&mut st, &suave_inputs(r), true, &g)
                        .unwrap();
                    let mut plan = GradBuckets::for_store(&st, &bcfg).unwrap();
                    let res = overlapped_backward(&mut st, &mut plan, &g, |st, c, ready| {
                        let grads = SuaveGrads {
                            scores: &ds,
                            embedding: None,
                            online: Some([&dl, &dl, &dl]),
                        };
                        // Rank 1 breaks after the head and a few backbone blocks.
                        let mut fail = FailAfter {
                            inner: ready,
                            after: if r == 1 { 9 } else { usize::MAX },
                        };
                        net.backward_hooked(st, cache, grads, c, &mut fail)
                    });
                    // Returning drops this rank's group, as a failed process would.
                    res.expect_err("every rank must fail").to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(out[1].contains("injected failure"), "{}", out[1]);
    assert!(
        out[0].contains("rank 1") && out[0].contains("connection closed"),
        "{}",
        out[0]
    );
}
