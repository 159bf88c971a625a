//! `sdengine launch`: starts one process per rank on this node, as torchrun does, so that a
//! multi-GPU (or multi-process CPU) run needs no Python.
//!
//! Each child gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
//! MASTER_PORT (read back by [`super::env::DistEnv::from_env`]). Its stdout and stderr lines are
//! prefixed with `[rank R]`, so that interleaved output stays readable. When a child fails,
//! the others are killed (a rank blocked in a collective with a dead peer would otherwise wait
//! for its timeout) and the launcher returns that child's exit code after repeating the end of
//! its stderr, so the cause is the last thing on the screen.

use crate::error::{Error, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Arguments of `sdengine launch` (torchrun's names, with dashes).
#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this node, usually one per GPU.
    #[arg(long = "nproc-per-node", default_value_t = 1)]
    pub nproc_per_node: usize,
    /// Number of nodes in the run; start `sdengine launch` once on each.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index in 0..nnodes (node 0 hosts rank 0).
    #[arg(long = "node-rank", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, reachable from every node.
    #[arg(long = "master-addr", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Free TCP port on node 0 for the rendezvous.
    #[arg(long = "master-port", default_value_t = 29500)]
    pub master_port: u16,
    /// The command every rank runs, after `--` (e.g. `-- train --method suave ...`).
    #[arg(last = true, required = true, value_name = "PROGRAM ARGS")]
    pub program_args: Vec<String>,
}

/// How many of a failed rank's last stderr lines the launcher repeats at the end.
const TAIL_LINES: usize = 20;

/// Starts the ranks of this node running `program` (normally `std::env::current_exe()`) with
/// `args.program_args`, forwards their output to this process's stdout/stderr with rank
/// prefixes, and returns 0 when all succeed, else the exit code of the first rank that failed
/// (128 + signal for a rank killed by a signal).
pub fn launch(args: &LaunchArgs, program: &Path) -> Result<i32> {
    launch_with(
        args,
        program,
        Box::new(std::io::stdout()),
        Box::new(std::io::stderr()),
    )
}

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// [`launch`] writing the children's prefixed output to the given sinks (tests capture them).
pub fn launch_with(
    args: &LaunchArgs,
    program: &Path,
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
) -> Result<i32> {
    validate(args)?;
    let out: Sink = Arc::new(Mutex::new(out));
    let err: Sink = Arc::new(Mutex::new(err));
    let world = args.nnodes * args.nproc_per_node;
    // Share the cores between the ranks unless the user chose (torchrun does the same with
    // OMP_NUM_THREADS); CPU ranks would otherwise each start one rayon thread per core.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .div_ceil(args.nproc_per_node)
        .max(1);
    let mut children: Vec<(usize, Child)> = Vec::new();
    let mut readers = Vec::new();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let tails: Vec<Arc<Mutex<VecDeque<String>>>> = (0..args.nproc_per_node)
        .map(|_| Arc::new(Mutex::new(VecDeque::new())))
        .collect();
    for (local, tail) in tails.iter().enumerate() {
        let rank = args.node_rank * args.nproc_per_node + local;
        let mut cmd = Command::new(program);
        cmd.args(&args.program_args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", threads.to_string());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(Error::Io {
                    path: program.display().to_string(),
                    err: std::io::Error::new(e.kind(), format!("cannot start rank {rank}: {e}")),
                });
            }
        };
        if let Some(s) = child.stdout.take() {
            readers.push(forward(s, rank, out.clone(), None, done_tx.clone()));
        }
        if let Some(s) = child.stderr.take() {
            let tail = Some(tail.clone());
            readers.push(forward(s, rank, err.clone(), tail, done_tx.clone()));
        }
        children.push((rank, child));
    }
    drop(done_tx);

    // Poll the children: the first failure stops the others.
    let mut failed: Option<(usize, i32)> = None;
    let mut running: Vec<(usize, Child)> = children;
    while !running.is_empty() {
        let mut still = Vec::with_capacity(running.len());
        for (rank, mut child) in running {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let code = exit_code(status);
                    if code != 0 && failed.is_none() {
                        failed = Some((rank, code));
                    }
                }
                Ok(None) => still.push((rank, child)),
                Err(e) => {
                    if failed.is_none() {
                        let _ = writeln!(
                            lock(&err),
                            "sdengine launch: cannot wait for rank {rank}: {e}"
                        );
                        failed = Some((rank, 1));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        running = still;
        if failed.is_some() && !running.is_empty() {
            kill_all(&mut running);
            running.clear();
        }
        if !running.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Let the readers drain what the children wrote; a grandchild that inherited a pipe could
    // keep it open, so do not wait for ever.
    for _ in 0..readers.len() {
        if done_rx.recv_timeout(Duration::from_secs(2)).is_err() {
            break;
        }
    }
    let Some((rank, code)) = failed else {
        return Ok(0);
    };
    let mut e = lock(&err);
    let local = rank - args.node_rank * args.nproc_per_node;
    let tail: Vec<String> = tails[local]
        .lock()
        .map(|t| t.iter().cloned().collect())
        .unwrap_or_default();
    let _ = writeln!(
        e,
        "sdengine launch: rank {rank} failed with exit code {code}; stopped the other {} rank(s) \
         on this node",
        args.nproc_per_node - 1
    );
    if !tail.is_empty() {
        let _ = writeln!(e, "sdengine launch: last stderr lines of rank {rank}:");
        for l in tail {
            let _ = writeln!(e, "  {l}");
        }
    }
    let _ = e.flush();
    Ok(code)
}

fn validate(args: &LaunchArgs) -> Result<()> {
    let bad = |d: String| Err(Error::invalid("launch", d));
    if args.nproc_per_node == 0 {
        return bad("--nproc-per-node must be at least 1".into());
    }
    if args.nnodes == 0 {
        return bad("--nnodes must be at least 1".into());
    }
    if args.node_rank >= args.nnodes {
        return bad(format!(
            "--node-rank {} is not below --nnodes {} (nodes are numbered 0..{})",
            args.node_rank, args.nnodes, args.nnodes
        ));
    }
    if args.master_port == 0 {
        return bad("--master-port 0: every node must know the same fixed port".into());
    }
    let loopback = args.master_addr == "localhost"
        || args
            .master_addr
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if args.nnodes > 1 && loopback {
        return bad(format!(
            "--master-addr {} is a loopback address but --nnodes is {}: give node 0's address, \
             reachable from every node",
            args.master_addr, args.nnodes
        ));
    }
    if args.program_args.is_empty() {
        return bad("nothing to run: give the rank command after `--`".into());
    }
    Ok(())
}

fn lock(s: &Sink) -> std::sync::MutexGuard<'_, Box<dyn Write + Send>> {
    // A poisoned sink only means another reader panicked mid-write; keep writing.
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies `src` to `sink` line by line with a rank prefix (a `\r` also ends a segment, so
/// progress bars keep redrawing in place), keeping the last lines in `tail`.
fn forward(
    src: impl Read + Send + 'static,
    rank: usize,
    sink: Sink,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    done: mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut seg = Vec::new();
        loop {
            seg.clear();
            // Read up to the next '\n' or '\r'.
            let n = read_segment(&mut r, &mut seg);
            if n == 0 {
                break;
            }
            {
                let mut w = lock(&sink);
                let _ = write!(w, "[rank {rank}] ");
                let _ = w.write_all(&seg);
                if !matches!(seg.last(), Some(b'\n') | Some(b'\r')) {
                    let _ = w.write_all(b"\n");
                }
                let _ = w.flush();
            }
            if let Some(t) = &tail {
                let line = String::from_utf8_lossy(&seg).trim_end().to_string();
                if !line.is_empty() {
                    if let Ok(mut t) = t.lock() {
                        if t.len() == TAIL_LINES {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            }
        }
        let _ = done.send(());
    })
}

fn read_segment(r: &mut impl BufRead, seg: &mut Vec<u8>) -> usize {
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return seg.len(),
        };
        if buf.is_empty() {
            return seg.len();
        }
        match buf.iter().position(|&c| c == b'\n' || c == b'\r') {
            Some(i) => {
                seg.extend_from_slice(&buf[..=i]);
                r.consume(i + 1);
                return seg.len();
            }
            None => {
                let n = buf.len();
                seg.extend_from_slice(buf);
                r.consume(n);
            }
        }
    }
}

fn kill_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
    }
    for (_, c) in children.iter_mut() {
        let _ = c.wait();
    }
}

/// The exit code a shell would report: the code, or 128 + the signal number.
fn exit_code(s: ExitStatus) -> i32 {
    #[cfg(unix)]
    let signal = {
        use std::os::unix::process::ExitStatusExt;
        s.signal()
    };
    #[cfg(not(unix))]
    let signal: Option<i32> = None;
    match (s.code(), signal) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}
