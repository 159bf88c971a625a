//! `sdengine launch` and `sdengine slurm` pieces: the children get torchrun's variables, their
//! output comes back prefixed by rank, a failing rank stops the others and its exit code is
//! returned; the sbatch script for 2 nodes x 8 GPUs, 24 h, has the right header and takes its
//! ranks from Slurm's variables.

use sdengine::dist::env::{DistEnv, EnvSource};
use sdengine::dist::launch::{launch_with, LaunchArgs};
use sdengine::dist::slurm::{render_sbatch, write_sbatch, SlurmArgs};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A Write that appends to a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);
impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn args(nproc: usize, nnodes: usize, node_rank: usize, script: &str) -> LaunchArgs {
    LaunchArgs {
        nproc_per_node: nproc,
        nnodes,
        node_rank,
        master_addr: "10.1.2.3".into(),
        master_port: 29511,
        program_args: vec!["-c".into(), script.into()],
    }
}

fn sh(a: &LaunchArgs) -> (i32, String, String) {
    let (out, err) = (Buf::default(), Buf::default());
    let code = launch_with(
        a,
        Path::new("/bin/sh"),
        Box::new(out.clone()),
        Box::new(err.clone()),
    )
    .unwrap();
    (code, out.text(), err.text())
}

#[test]
fn children_get_torchrun_variables_and_prefixed_output() {
    let a = args(
        2,
        2,
        1,
        r#"echo "R=$RANK L=$LOCAL_RANK W=$WORLD_SIZE LW=$LOCAL_WORLD_SIZE G=$GROUP_RANK A=$MASTER_ADDR P=$MASTER_PORT"; printf 'a\rb\n'; echo oops >&2"#,
    );
    let (code, out, err) = sh(&a);
    assert_eq!(code, 0, "{err}");
    for (rank, local) in [(2, 0), (3, 1)] {
        let line = format!("[rank {rank}] R={rank} L={local} W=4 LW=2 G=1 A=10.1.2.3 P=29511\n");
        assert!(out.contains(&line), "missing {line:?} in {out:?}");
        // A carriage return ends a segment (progress bars), each segment prefixed.
        assert!(
            out.contains(&format!("[rank {rank}] a\r[rank {rank}] b\n")),
            "{out:?}"
        );
        assert!(err.contains(&format!("[rank {rank}] oops\n")), "{err:?}");
    }
    assert!(!out.contains("[rank 0]") && !out.contains("[rank 1]"));
}

#[test]
fn a_failing_rank_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("survived");
    // Rank 1 fails at once; rank 0 would run for 30 s and then leave a marker file.
    let script = format!(
        r#"if [ "$RANK" = 1 ]; then echo "bad input: /data/x.jpg" >&2; exit 3; fi
for i in $(seq 300); do sleep 0.1; done; touch '{}'"#,
        marker.display()
    );
    let (code, _out, err) = sh(&args(2, 1, 0, &script));
    assert_eq!(code, 3);
    assert!(err.contains("[rank 1] bad input: /data/x.jpg"), "{err}");
    assert!(err.contains("rank 1 failed with exit code 3"), "{err}");
    assert!(
        err.trim_end().ends_with("bad input: /data/x.jpg"),
        "the cause comes last: {err}"
    );
    // Rank 0's shell was killed and reaped before launch returned, so it can no longer write.
    assert!(!marker.exists());
}

#[test]
fn a_rank_killed_by_a_signal_reports_128_plus_signal() {
    let (code, _, err) = sh(&args(1, 1, 0, "kill -9 $$"));
    assert_eq!(code, 137, "{err}");
}

#[test]
fn bad_launch_arguments_are_errors() {
    let mut a = args(1, 2, 2, "true");
    let e = launch_with(
        &a,
        Path::new("/bin/sh"),
        Box::new(Buf::default()),
        Box::new(Buf::default()),
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("--node-rank 2 is not below --nnodes 2"));
    a.node_rank = 0;
    a.master_addr = "127.0.0.1".into();
    let e = launch_with(
        &a,
        Path::new("/bin/sh"),
        Box::new(Buf::default()),
        Box::new(Buf::default()),
    );
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("loopback address but --nnodes is 2"));
    a.nnodes = 1;
    let e = launch_with(
        &a,
        Path::new("/nonexistent/prog"),
        Box::new(Buf::default()),
        Box::new(Buf::default()),
    );
    assert!(e.unwrap_err().to_string().contains("/nonexistent/prog"));
}

#[test]
fn launch_args_parse_like_torchrun() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        launch: LaunchArgs,
    }
    let c = Cli::try_parse_from([
        "launch",
        "--nproc-per-node",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "node01",
        "--master-port",
        "4000",
        "--",
        "train",
        "--method",
        "suave",
    ])
    .unwrap();
    let l = c.launch;
    assert_eq!(
        (l.nproc_per_node, l.nnodes, l.node_rank, l.master_port),
        (8, 2, 1, 4000)
    );
    assert_eq!(l.master_addr, "node01");
    assert_eq!(l.program_args, ["train", "--method", "suave"]);
    assert!(Cli::try_parse_from(["launch", "--nproc-per-node", "2"]).is_err());
}

fn slurm_args(out: PathBuf) -> SlurmArgs {
    SlurmArgs {
        nodes: 2,
        gpus_per_node: 8,
        hours: 24.0,
        partition: Some("h200".into()),
        output_dir: out,
        job_name: "suave-10perc".into(),
        cpus_per_task: 12,
        master_port: None,
        train_args: [
            "train",
            "--method",
            "suave",
            "--data",
            "/data/imagenet",
            "--note",
            "a b",
        ]
        .map(String::from)
        .to_vec(),
    }
}

#[test]
fn sbatch_for_two_nodes_of_eight_gpus_for_24_hours() {
    let s = render_sbatch(
        &slurm_args("/runs/s1".into()),
        Path::new("/opt/sdengine/bin/sdengine"),
    )
    .unwrap();
    let want = "#!/bin/bash
# Written by `sdengine slurm`; submit with: sbatch /runs/s1/sdengine.sbatch
#SBATCH --job-name=suave-10perc
#SBATCH --partition=h200
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=/runs/s1/slurm-%j.out
#SBATCH --error=/runs/s1/slurm-%j.err

set -euo pipefail
# One task per GPU. Each rank reads SLURM_PROCID (rank), SLURM_LOCALID (GPU) and
# SLURM_NTASKS (world size); rank 0's host is the first node of SLURM_JOB_NODELIST.
# The rendezvous port is 10000 + the last four digits of SLURM_JOB_ID.
export RAYON_NUM_THREADS=\"${SLURM_CPUS_PER_TASK:-1}\"
srun --kill-on-bad-exit=1 /opt/sdengine/bin/sdengine train --method suave --data /data/imagenet --note 'a b'
";
    assert_eq!(s, want);
    // Neither official bug: no `-t <hours>` (minutes to Slurm), no LOCAL_RANK.
    assert!(!s.contains(" -t ") && !s.contains("LOCAL_RANK"));

    // What srun gives the second task of the second node, read as the engine reads it.
    let vars = [
        ("SLURM_PROCID", "9"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_JOB_NODELIST", "gpu[017-018]"),
        ("SLURM_JOB_ID", "777123"),
    ];
    let e = DistEnv::from_vars(|k| {
        vars.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
    .unwrap();
    assert_eq!((e.rank, e.local_rank, e.world_size), (9, 1, 16));
    assert_eq!(
        (e.master_addr.as_str(), e.master_port, e.source),
        ("gpu017", 17123, EnvSource::Slurm)
    );
}

#[test]
fn sbatch_is_written_and_bad_values_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = slurm_args(dir.path().join("run"));
    a.master_port = Some(12345);
    a.hours = 1.5;
    let text = write_sbatch(&a, Path::new("/x/sdengine")).unwrap();
    let on_disk = std::fs::read_to_string(dir.path().join("run/sdengine.sbatch")).unwrap();
    assert_eq!(text, on_disk);
    assert!(
        text.contains("#SBATCH --time=01:30:00\n") && text.contains("export MASTER_PORT=12345\n")
    );
    a.output_dir = "/runs/with space".into();
    assert!(render_sbatch(&a, Path::new("/x"))
        .unwrap_err()
        .to_string()
        .contains("--output-dir"));
    a.output_dir = "/runs/ok".into();
    a.hours = 0.0;
    assert!(render_sbatch(&a, Path::new("/x"))
        .unwrap_err()
        .to_string()
        .contains("--hours"));
}

/// Not a test on its own: the body of each rank when
/// `launched_ranks_all_reduce_over_tcp` re-invokes this test binary through `launch` (with
/// SDENGINE_DIST_CHILD set). In a normal test run it returns at once.
#[test]
fn child_rank_body() {
    if std::env::var_os("SDENGINE_DIST_CHILD").is_none() {
        return;
    }
    use sdengine::dist::tcp::{TcpConfig, TcpGroup};
    use sdengine::dist::Communicator;
    let env = DistEnv::from_env().unwrap();
    let cfg = TcpConfig {
        connect_timeout: std::time::Duration::from_secs(60),
        op_timeout: std::time::Duration::from_secs(60),
    };
    let g = TcpGroup::connect(&env, &cfg).unwrap();
    let mut v = vec![(env.rank + 1) as f32; 3];
    g.all_reduce_sum_f32(&mut v).unwrap();
    println!(
        "CHILD rank={} local={} world={} sum={:?}",
        env.rank, env.local_rank, env.world_size, v
    );
}

#[test]
fn launched_ranks_all_reduce_over_tcp() {
    // Real processes: launch starts 3 copies of this test binary, each runs `child_rank_body`,
    // reads its rank from the environment launch set, joins the TCP group and all-reduces.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    let a = LaunchArgs {
        nproc_per_node: 3,
        nnodes: 1,
        node_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        program_args: vec![
            "SDENGINE_DIST_CHILD=1".into(),
            exe.display().to_string(),
            "--exact".into(),
            "child_rank_body".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ],
    };
    let (out, err) = (Buf::default(), Buf::default());
    let code = launch_with(
        &a,
        Path::new("/usr/bin/env"),
        Box::new(out.clone()),
        Box::new(err.clone()),
    )
    .unwrap();
    let (out, err) = (out.text(), err.text());
    assert_eq!(code, 0, "{out}\n{err}");
    for r in 0..3 {
        // (libtest prints "test child_rank_body ... " before the body's output.)
        let want = format!("CHILD rank={r} local={r} world=3 sum=[6.0, 6.0, 6.0]");
        let line = out.lines().find(|l| l.contains(&want));
        let line = line.unwrap_or_else(|| panic!("missing {want:?} in:\n{out}\n{err}"));
        assert!(line.starts_with(&format!("[rank {r}] ")), "{line}");
    }
}
