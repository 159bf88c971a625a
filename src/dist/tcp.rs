//! [`TcpGroup`]: a [`Communicator`] for CPU multi-process runs over plain TCP, and the
//! rendezvous that NCCL uses to share its unique id.
//!
//! Topology: a star. Rank 0 listens on MASTER_ADDR:MASTER_PORT; every other rank connects to it
//! (retrying until the connection timeout, since ranks start in any order) and says hello with
//! its rank and WORLD_SIZE, which rank 0 checks. In a collective every rank sends a header
//! (sequence number, kind, element type, op/root, length) and its data to rank 0; rank 0 checks
//! that all headers agree, computes the result exactly as [`super::LocalGroup`] does (f64 in
//! rank order, one rounding) and sends it back. So the results are bit-identical to the
//! in-process group, and a mismatched call on one rank is reported on all of them.
//!
//! Faults never hang: every socket read and write has a timeout; a rank that dies closes its
//! socket, which rank 0 sees at once and reports to every other rank (a reply with the reason)
//! before dropping the group; a dead rank 0 is seen by every peer as a closed connection. After
//! an error the group is broken and every later call returns that error.
//!
//! The star moves `world × n` values through rank 0 per all-reduce: right for CPU ranks and the
//! rendezvous, not a replacement for NCCL's rings on GPUs.

use super::env::DistEnv;
use super::{check_gather_len, check_root, combine, from_bytes, Communicator, Elem, ReduceOp};
use crate::error::{Error, Result};
use half::bf16;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"SDNG";
const VERSION: u32 = 1;
/// Upper bound for one message, so that a corrupt header cannot make rank 0 allocate wildly.
const MAX_PAYLOAD: u64 = 1 << 40;

/// Timeouts of a [`TcpGroup`].
#[derive(Clone, Copy, Debug)]
pub struct TcpConfig {
    /// How long the rendezvous waits for every rank to join (ranks start in any order, and a
    /// cluster may take minutes to start them all).
    pub connect_timeout: Duration,
    /// How long a collective waits for the slowest rank. It must exceed the longest gap
    /// between two collectives on any rank (a step, an evaluation, a checkpoint write).
    pub op_timeout: Duration,
}

impl Default for TcpConfig {
    /// 5 minutes to rendezvous, 30 minutes per collective (NCCL's and PyTorch's default).
    fn default() -> Self {
        TcpConfig {
            connect_timeout: Duration::from_secs(300),
            op_timeout: Duration::from_secs(1800),
        }
    }
}

/// What a rank is connected to.
enum Link {
    /// Rank 0: one stream per other rank, index `r - 1`.
    Root(Vec<TcpStream>),
    /// Every other rank: the stream to rank 0.
    Peer(TcpStream),
}

struct Inner {
    link: Link,
    seq: u64,
    broken: Option<String>,
}

/// One rank of a multi-process group connected over TCP in a star around rank 0. See the
/// module documentation for the protocol and the fault behaviour.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    cfg: TcpConfig,
    inner: Mutex<Inner>,
}

/// The kinds of collective, as sent on the wire.
const K_REDUCE: u8 = 1;
const K_BROADCAST: u8 = 2;
const K_GATHER: u8 = 3;
const K_BARRIER: u8 = 4;

/// The fixed part of a collective request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    kind: u8,
    dtype: u8,
    /// ReduceOp (0 sum, 1 mean) for a reduce, the root for a broadcast.
    arg: u32,
    /// Elements per rank.
    count: u64,
}

impl Header {
    const LEN: usize = 8 + 1 + 1 + 4 + 8 + 8;

    fn encode(&self, payload_len: u64) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8] = self.kind;
        b[9] = self.dtype;
        b[10..14].copy_from_slice(&self.arg.to_le_bytes());
        b[14..22].copy_from_slice(&self.count.to_le_bytes());
        b[22..30].copy_from_slice(&payload_len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; Self::LEN]) -> (Header, u64) {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let h = Header {
            seq: u64_at(0),
            kind: b[8],
            dtype: b[9],
            arg: u32::from_le_bytes([b[10], b[11], b[12], b[13]]),
            count: u64_at(14),
        };
        (h, u64_at(22))
    }

    fn describe(&self) -> String {
        let kind = match self.kind {
            K_REDUCE => format!("all_reduce({})", if self.arg == 0 { "sum" } else { "mean" }),
            K_BROADCAST => format!("broadcast(root {})", self.arg),
            K_GATHER => "all_gather".to_string(),
            K_BARRIER => "barrier".to_string(),
            k => format!("unknown collective {k}"),
        };
        let dtype = match self.dtype {
            1 => "f32",
            2 => "f64",
            3 => "bf16",
            4 => "u8",
            _ => "-",
        };
        format!(
            "collective #{} {kind} of {} {dtype} values",
            self.seq, self.count
        )
    }

    /// Bytes of data the rank `rank` must send with this header.
    fn payload_len(&self, rank: usize) -> u64 {
        let elem = match self.dtype {
            1 => 4,
            2 => 8,
            3 => 2,
            4 => 1,
            _ => 0,
        };
        match self.kind {
            K_REDUCE | K_GATHER => self.count * elem,
            K_BROADCAST if self.arg as usize == rank => self.count * elem,
            _ => 0,
        }
    }
}

fn err(detail: impl Into<String>) -> Error {
    Error::invalid("TcpGroup", detail)
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Describes an I/O error of a socket operation on `what`, turning timeouts and closed
/// connections into words.
fn io_err(e: &std::io::Error, what: &str, timeout: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("timed out after {} waiting for {what}", secs(timeout))
        }
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => {
            format!("{what}: connection closed (that process exited or failed)")
        }
        _ => format!("{what}: {e}"),
    }
}

/// Sends a length-prefixed string.
fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_str(s: &mut TcpStream) -> std::io::Result<String> {
    let mut n = [0u8; 4];
    s.read_exact(&mut n)?;
    let n = u32::from_le_bytes(n).min(1 << 20) as usize;
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// A reply from rank 0: status 0 and the data, or status 1 and the reason.
fn reply_ok(data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(9 + data.len());
    m.push(0);
    m.extend_from_slice(&(data.len() as u64).to_le_bytes());
    m.extend_from_slice(data);
    m
}

fn reply_err(reason: &str) -> Vec<u8> {
    let mut m = vec![1u8];
    put_str(&mut m, reason);
    m
}

/// Resolves `addr:port`, naming MASTER_ADDR when it fails.
fn resolve(addr: &str, port: u16) -> Result<SocketAddr> {
    (addr, port)
        .to_socket_addrs()
        .map_err(|e| err(format!("cannot resolve MASTER_ADDR={addr:?}: {e}")))?
        .next()
        .ok_or_else(|| err(format!("MASTER_ADDR={addr:?} resolves to no address")))
}

impl TcpGroup {
    /// Joins the group described by `env` (rank 0 listens, the others connect).
    pub fn connect(env: &DistEnv, cfg: &TcpConfig) -> Result<Self> {
        Self::new(
            env.rank,
            env.world_size,
            &env.master_addr,
            env.master_port,
            cfg,
        )
    }

    /// Joins a group of `world` ranks as `rank`, with rank 0 at `master_addr:master_port`.
    /// Returns once every rank has joined, or an error naming what went wrong (port in use,
    /// timeout with the missing ranks, a WORLD_SIZE that differs between ranks, ...).
    pub fn new(
        rank: usize,
        world: usize,
        master_addr: &str,
        master_port: u16,
        cfg: &TcpConfig,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(err(format!(
                "rank {rank} is not in a group of {world} ranks"
            )));
        }
        if world > u32::MAX as usize {
            return Err(err(format!("world size {world} is too large")));
        }
        let link = if world == 1 {
            Link::Root(Vec::new())
        } else {
            let addr = resolve(master_addr, master_port)?;
            if rank == 0 {
                Link::Root(Self::accept_all(world, addr, cfg)?)
            } else {
                Link::Peer(Self::join(rank, world, addr, cfg)?)
            }
        };
        Ok(TcpGroup {
            rank,
            world,
            cfg: *cfg,
            inner: Mutex::new(Inner {
                link,
                seq: 0,
                broken: None,
            }),
        })
    }

    /// Rank 0's half of the rendezvous.
    fn accept_all(world: usize, addr: SocketAddr, cfg: &TcpConfig) -> Result<Vec<TcpStream>> {
        // Listen on the loopback address itself when MASTER_ADDR is local-only, else on every
        // interface (MASTER_ADDR may name this host by an address it does not own directly,
        // e.g. behind NAT or a hosts-file alias).
        let bind = if addr.ip().is_loopback() {
            addr
        } else if addr.is_ipv4() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port())
        } else {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), addr.port())
        };
        let listener = TcpListener::bind(bind).map_err(|e| {
            if e.kind() == ErrorKind::AddrInUse {
                err(format!(
                    "rank 0 cannot listen on {bind}: port {} is already in use (another run, or \
                     a process still holding it); choose a free port with --master-port / \
                     MASTER_PORT",
                    addr.port()
                ))
            } else {
                err(format!("rank 0 cannot listen on {bind}: {e}"))
            }
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("listener on {bind}: {e}")))?;
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut peers: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
        let mut strangers = 0usize;
        let abort = |peers: &mut Vec<Option<TcpStream>>, reason: &str| {
            for s in peers.iter_mut().flatten() {
                let mut m = MAGIC.to_vec();
                m.extend_from_slice(&reply_err(reason));
                let _ = s.write_all(&m);
            }
            err(reason.to_string())
        };
        while peers.iter().any(Option::is_none) {
            let (mut s, from) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = peers
                            .iter()
                            .enumerate()
                            .filter(|(_, p)| p.is_none())
                            .map(|(i, _)| (i + 1).to_string())
                            .collect();
                        let reason = format!(
                            "rendezvous timed out after {} on {bind}: {} of {world} ranks joined, \
                             missing rank(s) {}{}; check that every rank was started with the \
                             same MASTER_ADDR/MASTER_PORT/WORLD_SIZE and can reach this host",
                            secs(cfg.connect_timeout),
                            world - missing.len(),
                            missing.join(", "),
                            if strangers > 0 {
                                format!(" ({strangers} connection(s) that were not sdengine ranks were ignored)")
                            } else {
                                String::new()
                            }
                        );
                        return Err(abort(&mut peers, &reason));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(abort(&mut peers, &format!("accept on {bind}: {e}"))),
            };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let hello = s
                .set_nonblocking(false)
                .and_then(|_| s.set_read_timeout(Some(left)))
                .and_then(|_| s.set_write_timeout(Some(cfg.op_timeout)))
                .and_then(|_| s.set_nodelay(true))
                .and_then(|_| {
                    let mut h = [0u8; 16];
                    s.read_exact(&mut h).map(|_| h)
                });
            let h = match hello {
                Ok(h) if &h[..4] == MAGIC => h,
                // Not one of ours (a port scanner, a health check): ignore it.
                _ => {
                    strangers += 1;
                    continue;
                }
            };
            let field = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let (version, r, w) = (field(4), field(8) as usize, field(12) as usize);
            let problem = if version != VERSION {
                Some(format!(
                    "rank {r} at {from} speaks protocol version {version}, rank 0 speaks \
                     {VERSION}: run the same sdengine binary on every rank"
                ))
            } else if w != world {
                Some(format!(
                    "rank {r} at {from} was started with WORLD_SIZE={w} but rank 0 has \
                     WORLD_SIZE={world}: every rank must be started with the same WORLD_SIZE"
                ))
            } else if r == 0 || r >= world {
                Some(format!(
                    "a process at {from} claims rank {r}, which is not a peer rank of a group of \
                     {world} (1..{world}): check RANK on that process"
                ))
            } else if peers[r - 1].is_some() {
                Some(format!(
                    "two processes claim rank {r} (the second from {from}): check RANK / \
                     SLURM_PROCID on each process"
                ))
            } else {
                None
            };
            if let Some(reason) = problem {
                let mut m = MAGIC.to_vec();
                m.extend_from_slice(&reply_err(&reason));
                let _ = s.write_all(&m);
                return Err(abort(&mut peers, &reason));
            }
            peers[r - 1] = Some(s);
        }
        let mut out = Vec::with_capacity(world - 1);
        for (i, s) in peers.into_iter().enumerate() {
            let mut s = s.ok_or_else(|| err("internal: a peer slot is empty"))?;
            let mut m = MAGIC.to_vec();
            m.extend_from_slice(&reply_ok(&[]));
            s.write_all(&m)
                .and_then(|_| s.set_read_timeout(Some(cfg.op_timeout)))
                .map_err(|e| {
                    err(io_err(
                        &e,
                        &format!("welcoming rank {}", i + 1),
                        cfg.op_timeout,
                    ))
                })?;
            out.push(s);
        }
        Ok(out)
    }

    /// A peer's half of the rendezvous.
    fn join(rank: usize, world: usize, addr: SocketAddr, cfg: &TcpConfig) -> Result<TcpStream> {
        let start = Instant::now();
        let deadline = start + cfg.connect_timeout;
        let mut s = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = Duration::from_secs(2)
                .min(left)
                .max(Duration::from_millis(10));
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(s) => break s,
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(err(format!(
                            "rank {rank} could not reach rank 0 at {addr} within {} (last \
                             error: {e}); is rank 0 running, with the same MASTER_ADDR and \
                             MASTER_PORT, and is the port open between the hosts?",
                            secs(cfg.connect_timeout)
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let mut hello = MAGIC.to_vec();
        for v in [VERSION, rank as u32, world as u32] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        let what = format!("rank 0 at {addr} to complete the rendezvous");
        s.set_nodelay(true)
            .and_then(|_| s.set_read_timeout(Some(left)))
            .and_then(|_| s.set_write_timeout(Some(cfg.op_timeout)))
            .and_then(|_| s.write_all(&hello))
            .map_err(|e| err(format!("rank {rank}: {}", io_err(&e, &what, left))))?;
        let mut head = [0u8; 5];
        s.read_exact(&mut head).map_err(|e| {
            let why = if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                " (not every rank joined in time; rank 0's error lists the missing ones)"
            } else {
                ""
            };
            err(format!("rank {rank}: {}{why}", io_err(&e, &what, left)))
        })?;
        if &head[..4] != MAGIC {
            return Err(err(format!(
                "rank {rank}: the server at {addr} is not an sdengine rank 0 (another program \
                 holds MASTER_PORT?); choose a free port"
            )));
        }
        if head[4] != 0 {
            let reason = read_str(&mut s).unwrap_or_else(|e| e.to_string());
            return Err(err(format!(
                "rank {rank}: rank 0 rejected the rendezvous: {reason}"
            )));
        }
        let mut len = [0u8; 8];
        s.read_exact(&mut len)
            .and_then(|_| s.set_read_timeout(Some(cfg.op_timeout)))
            .map_err(|e| err(format!("rank {rank}: {}", io_err(&e, &what, left))))?;
        Ok(s)
    }

    /// Runs one collective: `payload` is this rank's data (empty where the kind sends none);
    /// the result is what rank 0 computed for everyone.
    fn run(&self, kind: u8, dtype: u8, arg: u32, count: usize, payload: &[u8]) -> Result<Vec<u8>> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| err("a thread panicked inside a collective"))?;
        if let Some(b) = &inner.broken {
            return Err(err(format!(
                "rank {}: the group is broken by an earlier error: {b}",
                self.rank
            )));
        }
        inner.seq += 1;
        let h = Header {
            seq: inner.seq,
            kind,
            dtype,
            arg,
            count: count as u64,
        };
        let out = match &mut inner.link {
            Link::Root(peers) => self.root_run(peers, h, payload),
            Link::Peer(s) => self.peer_run(s, h, payload),
        };
        if let Err(e) = &out {
            inner.broken = Some(match e {
                Error::Invalid { detail, .. } => detail.clone(),
                other => other.to_string(),
            });
            // Close the sockets so that every other rank notices at once.
            match &inner.link {
                Link::Root(peers) => peers.iter().for_each(|s| {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }),
                Link::Peer(s) => {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
            }
        }
        out
    }

    fn root_run(&self, peers: &mut [TcpStream], h: Header, payload: &[u8]) -> Result<Vec<u8>> {
        let t = self.cfg.op_timeout;
        let abort = |peers: &mut [TcpStream], skip: Option<usize>, reason: String| {
            let m = reply_err(&reason);
            for (i, s) in peers.iter_mut().enumerate() {
                if Some(i + 1) != skip {
                    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = s.write_all(&m);
                }
            }
            err(format!("rank 0: {reason}"))
        };
        let mut parts: Vec<Vec<u8>> = Vec::with_capacity(self.world);
        parts.push(payload.to_vec());
        for r in 1..self.world {
            let s = &mut peers[r - 1];
            let what = format!("rank {r} in {}", h.describe());
            let mut hb = [0u8; Header::LEN];
            if let Err(e) = s.read_exact(&mut hb) {
                return Err(abort(peers, Some(r), io_err(&e, &what, t)));
            }
            let (ph, plen) = Header::decode(&hb);
            if ph != h || plen != h.payload_len(r) || plen > MAX_PAYLOAD {
                let reason = format!(
                    "collective mismatch: rank 0 called {} but rank {r} called {} (with {plen} \
                     bytes); every rank must make the same collective calls in the same order",
                    h.describe(),
                    ph.describe()
                );
                return Err(abort(peers, None, reason));
            }
            let mut data = vec![0u8; plen as usize];
            if let Err(e) = peers[r - 1].read_exact(&mut data) {
                return Err(abort(peers, Some(r), io_err(&e, &what, t)));
            }
            parts.push(data);
        }
        let result = match h.kind {
            K_REDUCE => {
                let op = if h.arg == 0 {
                    ReduceOp::Sum
                } else {
                    ReduceOp::Mean
                };
                match h.dtype {
                    1 => reduce_bytes::<f32>(&parts, op),
                    2 => reduce_bytes::<f64>(&parts, op),
                    3 => reduce_bytes::<bf16>(&parts, op),
                    _ => reduce_bytes::<u8>(&parts, op),
                }
            }
            K_BROADCAST => parts.swap_remove(h.arg as usize),
            K_GATHER => parts.concat(),
            _ => Vec::new(),
        };
        let m = reply_ok(&result);
        for r in 1..self.world {
            if let Err(e) = peers[r - 1].write_all(&m) {
                let what = format!("rank {r} in {}", h.describe());
                return Err(abort(peers, Some(r), io_err(&e, &what, t)));
            }
        }
        Ok(result)
    }

    fn peer_run(&self, s: &mut TcpStream, h: Header, payload: &[u8]) -> Result<Vec<u8>> {
        let t = self.cfg.op_timeout;
        let rank = self.rank;
        let what = format!("rank 0 in {}", h.describe());
        let fail = |e: std::io::Error| err(format!("rank {rank}: {}", io_err(&e, &what, t)));
        let mut msg = h.encode(payload.len() as u64).to_vec();
        msg.extend_from_slice(payload);
        s.write_all(&msg).map_err(fail)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(fail)?;
        if status[0] != 0 {
            let reason = read_str(s).map_err(fail)?;
            return Err(err(format!(
                "rank {rank}: {} failed on rank 0: {reason}",
                h.describe()
            )));
        }
        let mut len = [0u8; 8];
        s.read_exact(&mut len).map_err(fail)?;
        let len = u64::from_le_bytes(len);
        if len > MAX_PAYLOAD {
            return Err(err(format!(
                "rank {rank}: rank 0 announced an implausible reply of {len} bytes"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(fail)?;
        Ok(data)
    }

    fn reduce<T: Elem>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let arg = u32::from(op == ReduceOp::Mean);
        let out = self.run(K_REDUCE, T::DTYPE, arg, buf.len(), &super::to_bytes(buf))?;
        if out.len() != buf.len() * T::BYTES {
            return Err(err("rank 0 replied with a result of the wrong length"));
        }
        from_bytes(&out, buf);
        Ok(())
    }
}

/// Rank 0's reduction of the ranks' raw bytes, through the same [`combine`] as LocalGroup.
fn reduce_bytes<T: Elem>(parts: &[Vec<u8>], op: ReduceOp) -> Vec<u8> {
    let n = parts[0].len() / T::BYTES;
    let wide: Vec<Vec<f64>> = parts
        .iter()
        .map(|p| {
            p.chunks_exact(T::BYTES)
                .map(|c| T::get(c).to_f64())
                .collect()
        })
        .collect();
    let mut out = vec![T::from_f64(0.0); n];
    combine(&wide, op, &mut out);
    super::to_bytes(&out)
}

impl Communicator for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn all_reduce_f64(&self, buf: &mut [f64], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.reduce(buf, op)
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root("TcpGroup::broadcast", root, self.world)?;
        let payload: &[u8] = if root == self.rank { buf } else { &[] };
        let out = self.run(K_BROADCAST, u8::DTYPE, root as u32, buf.len(), payload)?;
        if out.len() != buf.len() {
            return Err(err("rank 0 replied with a broadcast of the wrong length"));
        }
        buf.copy_from_slice(&out);
        Ok(())
    }
    fn all_gather_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        check_gather_len("TcpGroup::all_gather", self.world, send.len(), recv.len())?;
        let out = self.run(K_GATHER, u8::DTYPE, 0, send.len(), send)?;
        if out.len() != recv.len() {
            return Err(err("rank 0 replied with a gather of the wrong length"));
        }
        recv.copy_from_slice(&out);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.run(K_BARRIER, 0, 0, 0, &[]).map(|_| ())
    }
}
