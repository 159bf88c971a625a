//! `sdengine slurm`: writes an sbatch script that runs the engine on a Slurm cluster, one task
//! per GPU, without the official launcher's two bugs (spec §5): the time limit is written as
//! `--time=HH:MM:SS` (the official `-t <hours>` is read by Slurm as minutes, so an "80 hour" job
//! was killed after 80 minutes), and the ranks come from SLURM_PROCID through
//! [`super::env::DistEnv`] (the official Suave code read LOCAL_RANK, which `srun` does not set).
//! Rank 0's host is the first node of SLURM_JOB_NODELIST, expanded by the engine itself, and the
//! port is 10000 + the job id's last four digits unless `--master-port` fixes it.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `sdengine slurm`.
#[derive(clap::Args, Clone, Debug)]
pub struct SlurmArgs {
    /// Nodes to allocate.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// GPUs per node; one rank (Slurm task) is started per GPU.
    #[arg(long = "gpus-per-node", default_value_t = 8)]
    pub gpus_per_node: usize,
    /// Wall-clock limit in hours (fractions allowed: 1.5 = 1 h 30 min).
    #[arg(long, default_value_t = 80.0)]
    pub hours: f64,
    /// Slurm partition; the cluster's default partition when absent.
    #[arg(long)]
    pub partition: Option<String>,
    /// Folder for the script and Slurm's log files (created if missing).
    #[arg(long = "output-dir")]
    pub output_dir: PathBuf,
    /// Job name shown by squeue.
    #[arg(long = "job-name", default_value = "sdengine")]
    pub job_name: String,
    /// CPU cores per rank (JPEG decoding and augmentation run there).
    #[arg(long = "cpus-per-task", default_value_t = 8)]
    pub cpus_per_task: usize,
    /// Fixed rendezvous port; by default 10000 + the last four digits of the job id.
    #[arg(long = "master-port")]
    pub master_port: Option<u16>,
    /// The sdengine command every rank runs, after `--` (e.g. `-- train --method suave ...`).
    #[arg(last = true, required = true, value_name = "TRAIN ARGS")]
    pub train_args: Vec<String>,
}

/// `--time` value for a limit in hours: `HH:MM:SS`, rounded to the nearest second (Slurm reads
/// a bare number as minutes).
pub fn slurm_time(hours: f64) -> Result<String> {
    if !hours.is_finite() || hours <= 0.0 || hours > 24.0 * 366.0 {
        return Err(Error::invalid(
            "slurm",
            format!("--hours {hours} must be a positive number of hours (at most a year)"),
        ));
    }
    let total = (hours * 3600.0).round() as u64;
    Ok(format!(
        "{:02}:{:02}:{:02}",
        total / 3600,
        (total / 60) % 60,
        total % 60
    ))
}

/// Quotes `s` for a POSIX shell when it holds anything but safe characters.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Where [`write_sbatch`] puts the script: `<output-dir>/sdengine.sbatch`.
pub fn sbatch_path(args: &SlurmArgs) -> PathBuf {
    args.output_dir.join("sdengine.sbatch")
}

/// The sbatch script text for `exe` (the sdengine binary every node can run).
pub fn render_sbatch(args: &SlurmArgs, exe: &Path) -> Result<String> {
    let bad = |d: String| Err(Error::invalid("slurm", d));
    if args.nodes == 0 {
        return bad("--nodes must be at least 1".into());
    }
    if args.gpus_per_node == 0 {
        return bad("--gpus-per-node must be at least 1".into());
    }
    if args.cpus_per_task == 0 {
        return bad("--cpus-per-task must be at least 1".into());
    }
    if args.train_args.is_empty() {
        return bad("nothing to run: give the sdengine command after `--`".into());
    }
    if args.master_port == Some(0) {
        return bad("--master-port 0 is not a usable port".into());
    }
    // #SBATCH lines are not parsed by a shell: a space would split the value.
    let out = args.output_dir.display().to_string();
    for (flag, v) in [
        ("--output-dir", out.as_str()),
        ("--job-name", args.job_name.as_str()),
        ("--partition", args.partition.as_deref().unwrap_or("p")),
    ] {
        if v.is_empty()
            || v.chars()
                .any(|c| c.is_whitespace() || c == '\'' || c == '"')
        {
            return bad(format!(
                "{flag} {v:?}: #SBATCH values cannot be empty or hold spaces or quotes"
            ));
        }
    }
    let time = slurm_time(args.hours)?;
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(
        s,
        "# Written by `sdengine slurm`; submit with: sbatch {}",
        shell_quote(&sbatch_path(args).display().to_string())
    );
    let _ = writeln!(s, "#SBATCH --job-name={}", args.job_name);
    if let Some(p) = &args.partition {
        let _ = writeln!(s, "#SBATCH --partition={p}");
    }
    let _ = writeln!(s, "#SBATCH --nodes={}", args.nodes);
    let _ = writeln!(s, "#SBATCH --ntasks-per-node={}", args.gpus_per_node);
    let _ = writeln!(s, "#SBATCH --gres=gpu:{}", args.gpus_per_node);
    let _ = writeln!(s, "#SBATCH --cpus-per-task={}", args.cpus_per_task);
    let _ = writeln!(s, "#SBATCH --time={time}");
    let _ = writeln!(s, "#SBATCH --output={out}/slurm-%j.out");
    let _ = writeln!(s, "#SBATCH --error={out}/slurm-%j.err");
    let _ = writeln!(s);
    let _ = writeln!(s, "set -euo pipefail");
    let _ = writeln!(
        s,
        "# One task per GPU. Each rank reads SLURM_PROCID (rank), SLURM_LOCALID (GPU) and\n\
         # SLURM_NTASKS (world size); rank 0's host is the first node of SLURM_JOB_NODELIST."
    );
    match args.master_port {
        Some(p) => {
            let _ = writeln!(s, "export MASTER_PORT={p}");
        }
        None => {
            let _ = writeln!(
                s,
                "# The rendezvous port is 10000 + the last four digits of SLURM_JOB_ID."
            );
        }
    }
    let _ = writeln!(
        s,
        "export RAYON_NUM_THREADS=\"${{SLURM_CPUS_PER_TASK:-1}}\""
    );
    let mut cmd = format!(
        "srun --kill-on-bad-exit=1 {}",
        shell_quote(&exe.display().to_string())
    );
    for a in &args.train_args {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    }
    let _ = writeln!(s, "{cmd}");
    Ok(s)
}

/// Writes the sbatch script to [`sbatch_path`] (creating the output folder) and returns its
/// text.
pub fn write_sbatch(args: &SlurmArgs, exe: &Path) -> Result<String> {
    let text = render_sbatch(args, exe)?;
    let io = |p: &Path, e: std::io::Error| Error::Io {
        path: p.display().to_string(),
        err: e,
    };
    std::fs::create_dir_all(&args.output_dir).map_err(|e| io(&args.output_dir, e))?;
    let path = sbatch_path(args);
    std::fs::write(&path, &text).map_err(|e| io(&path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io(&path, e))?;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_become_hh_mm_ss() {
        assert_eq!(slurm_time(24.0).unwrap(), "24:00:00");
        assert_eq!(slurm_time(80.0).unwrap(), "80:00:00");
        assert_eq!(slurm_time(1.5).unwrap(), "01:30:00");
        assert_eq!(slurm_time(0.25).unwrap(), "00:15:00");
        assert_eq!(slurm_time(1.0 / 3600.0).unwrap(), "00:00:01");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(slurm_time(bad).is_err());
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--lr=0.4"), "--lr=0.4");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
