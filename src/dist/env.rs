//! The rank environment of a multi-process run, read the way people already launch: torchrun's
//! variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, also set by
//! `sdengine launch`), else Slurm's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the first
//! host of the job's node list), else a single rank.
//!
//! Under Slurm the rank comes from SLURM_PROCID, which `srun` sets for every task: the official
//! Suave code reads LOCAL_RANK there, which srun does not set, so it fails or gives duplicate
//! ranks on more than one node (spec §5). Errors name the variable, its value and the way out.

use crate::error::{Error, Result};

/// Default rendezvous port when neither MASTER_PORT nor a Slurm job id gives one (torchrun's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Where a [`DistEnv`] was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvSource {
    /// torchrun-style variables (also what `sdengine launch` sets).
    Torchrun,
    /// Slurm task variables (`srun`).
    Slurm,
    /// No distributed variables: one rank.
    Single,
}

/// This process's place in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank in `0..world_size`.
    pub rank: usize,
    /// Rank on this node; picks the GPU (`local_rank % device_count`).
    pub local_rank: usize,
    /// Number of ranks in the run.
    pub world_size: usize,
    /// Host of rank 0, where the rendezvous listens.
    pub master_addr: String,
    /// Port of the rendezvous on `master_addr`.
    pub master_port: u16,
    /// Which variables the values came from (reported in errors and logs).
    pub source: EnvSource,
}

impl DistEnv {
    /// One rank on this machine (no rendezvous needed).
    pub fn single() -> Self {
        DistEnv {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
            source: EnvSource::Single,
        }
    }

    /// Reads the process environment (torchrun, else Slurm, else one rank) and validates it.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`DistEnv::from_env`] over any variable source, so that tests need not touch the
    /// process environment.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let env = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let need = |k: &str| {
                get(k).ok_or_else(|| {
                    Error::invalid(
                        "DistEnv",
                        format!(
                            "{k} is not set but RANK/WORLD_SIZE are (torchrun-style launch); set \
                             RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together, \
                             or start the ranks with `sdengine launch`"
                        ),
                    )
                })
            };
            DistEnv {
                rank: parse_usize("RANK", &need("RANK")?)?,
                local_rank: parse_usize("LOCAL_RANK", &need("LOCAL_RANK")?)?,
                world_size: parse_usize("WORLD_SIZE", &need("WORLD_SIZE")?)?,
                master_addr: need("MASTER_ADDR")?.trim().to_string(),
                master_port: parse_port("MASTER_PORT", &need("MASTER_PORT")?)?,
                source: EnvSource::Torchrun,
            }
        } else if let Some(procid) = get("SLURM_PROCID") {
            let ntasks = get("SLURM_NTASKS").ok_or_else(|| {
                Error::invalid(
                    "DistEnv",
                    "SLURM_PROCID is set but SLURM_NTASKS is not; run the ranks with `srun` \
                     inside an allocation made with --ntasks-per-node",
                )
            })?;
            let local = get("SLURM_LOCALID").unwrap_or_else(|| "0".into());
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a.trim().to_string(),
                None => {
                    let (var, list) = get("SLURM_JOB_NODELIST")
                        .map(|l| ("SLURM_JOB_NODELIST", l))
                        .or_else(|| get("SLURM_NODELIST").map(|l| ("SLURM_NODELIST", l)))
                        .ok_or_else(|| {
                            Error::invalid(
                                "DistEnv",
                                "Slurm task without SLURM_JOB_NODELIST/SLURM_NODELIST: cannot \
                                 find rank 0's host; set MASTER_ADDR",
                            )
                        })?;
                    first_host(&list)
                        .map_err(|e| Error::invalid("DistEnv", format!("{var}: {e}")))?
                }
            };
            let master_port = match get("MASTER_PORT") {
                Some(p) => parse_port("MASTER_PORT", &p)?,
                None => match get("SLURM_JOB_ID") {
                    Some(id) => port_from_job_id(&id)?,
                    None => DEFAULT_MASTER_PORT,
                },
            };
            DistEnv {
                rank: parse_usize("SLURM_PROCID", &procid)?,
                local_rank: parse_usize("SLURM_LOCALID", &local)?,
                world_size: parse_usize("SLURM_NTASKS", &ntasks)?,
                master_addr,
                master_port,
                source: EnvSource::Slurm,
            }
        } else {
            DistEnv::single()
        };
        env.validate()?;
        Ok(env)
    }

    /// Checks the values against each other: a clear error now beats a rendezvous that waits
    /// for a rank that will never come.
    pub fn validate(&self) -> Result<()> {
        let (r, w, l) = match self.source {
            EnvSource::Slurm => ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            _ => ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        };
        if self.world_size == 0 {
            return Err(Error::invalid(
                "DistEnv",
                format!("{w}=0: a run needs at least one rank"),
            ));
        }
        if self.rank >= self.world_size {
            return Err(Error::invalid(
                "DistEnv",
                format!(
                    "{r}={} is not below {w}={}: ranks are 0..{w}-1; check the launch command",
                    self.rank, self.world_size
                ),
            ));
        }
        if self.local_rank >= self.world_size {
            return Err(Error::invalid(
                "DistEnv",
                format!(
                    "{l}={} is not below {w}={}: a node cannot hold more ranks than the run",
                    self.local_rank, self.world_size
                ),
            ));
        }
        if self.world_size > 1 && self.master_addr.is_empty() {
            return Err(Error::invalid(
                "DistEnv",
                "MASTER_ADDR is empty: set it to the host of rank 0",
            ));
        }
        if self.world_size > 1 && self.master_port == 0 {
            return Err(Error::invalid(
                "DistEnv",
                "MASTER_PORT=0: every rank must know the same fixed port; pick one such as 29500",
            ));
        }
        Ok(())
    }

    /// True when more than one rank takes part (a rendezvous is needed).
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }

    /// The GPU this rank should use on a node with `device_count` GPUs, or an error when there
    /// are none.
    pub fn device_index(&self, device_count: usize) -> Result<usize> {
        if device_count == 0 {
            return Err(Error::invalid(
                "DistEnv::device_index",
                format!("rank {} found no GPU on this node", self.rank),
            ));
        }
        Ok(self.local_rank % device_count)
    }
}

fn parse_usize(var: &str, v: &str) -> Result<usize> {
    v.trim().parse::<usize>().map_err(|_| {
        Error::invalid(
            "DistEnv",
            format!("{var}={v:?} is not a non-negative integer"),
        )
    })
}

fn parse_port(var: &str, v: &str) -> Result<u16> {
    match v.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::invalid(
            "DistEnv",
            format!("{var}={v:?} is not a TCP port (1..=65535)"),
        )),
    }
}

/// The official launcher's port rule under Slurm: 10000 + the last four digits of the job id,
/// so that two jobs sharing a node rarely collide.
fn port_from_job_id(id: &str) -> Result<u16> {
    let digits: String = id.trim().chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return Err(Error::invalid(
            "DistEnv",
            format!("SLURM_JOB_ID={id:?} has no digits; set MASTER_PORT"),
        ));
    }
    let tail = &digits[digits.len().saturating_sub(4)..];
    let n: u16 = tail.parse().unwrap_or(0);
    Ok(10000 + n)
}

/// The first host of a Slurm node list (`node[01-04,07]` gives `node01`).
pub fn first_host(list: &str) -> Result<String> {
    expand_nodelist(list)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::invalid("expand_nodelist", format!("node list {list:?} is empty")))
}

/// Expands Slurm's compressed host list: comma-separated items, each with any number of
/// bracket groups of numbers and ranges (`a[1-2,5]`, `rack[1-2]-n[01-02]`); zero padding
/// follows the width of the range's first number, as Slurm writes it.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| {
        Error::invalid(
            "expand_nodelist",
            format!("cannot read node list {list:?}: {why}"),
        )
    };
    // Split on commas outside brackets.
    let mut items = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(bad("']' without '['"));
                }
            }
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(bad("unclosed '['"));
    }
    items.push(&list[start..]);
    let mut hosts = Vec::new();
    for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
        // Cartesian product over the item's bracket groups.
        let mut partial = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    partial.iter_mut().for_each(|p| p.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let prefix = &rest[..open];
                    let close = rest[open..]
                        .find(']')
                        .map(|c| open + c)
                        .ok_or_else(|| bad("unclosed '['"))?;
                    let values = expand_ranges(&rest[open + 1..close]).map_err(|e| bad(&e))?;
                    let mut next = Vec::with_capacity(partial.len() * values.len());
                    for p in &partial {
                        for v in &values {
                            next.push(format!("{p}{prefix}{v}"));
                        }
                    }
                    partial = next;
                    rest = &rest[close + 1..];
                }
            }
        }
        hosts.extend(partial);
    }
    if hosts.is_empty() {
        return Err(bad("no hosts"));
    }
    Ok(hosts)
}

/// `01-04,07` → `["01", "02", "03", "04", "07"]`.
fn expand_ranges(spec: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let width = a.len();
        let lo: u64 = a
            .parse()
            .map_err(|_| format!("{a:?} in [{spec}] is not a number"))?;
        let hi: u64 = b
            .parse()
            .map_err(|_| format!("{b:?} in [{spec}] is not a number"))?;
        if hi < lo {
            return Err(format!("range {part:?} runs backwards"));
        }
        if hi - lo > 100_000 {
            return Err(format!("range {part:?} is implausibly large"));
        }
        out.extend((lo..=hi).map(|n| format!("{n:0width$}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn nodelists_expand_like_slurm() {
        assert_eq!(
            expand_nodelist("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(
            expand_nodelist("gpu-a[8-10],login1,b[2]").unwrap(),
            ["gpu-a8", "gpu-a9", "gpu-a10", "login1", "b2"]
        );
        assert_eq!(
            expand_nodelist("r[1-2]-n[09-10]").unwrap(),
            ["r1-n09", "r1-n10", "r2-n09", "r2-n10"]
        );
        assert_eq!(first_host("host7").unwrap(), "host7");
        for bad in ["node[01-", "node]", "n[4-2]", "n[a-b]", ""] {
            assert!(expand_nodelist(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn torchrun_variables_win() {
        let e = env(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29600"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 5,
                local_rank: 1,
                world_size: 8,
                master_addr: "10.0.0.1".into(),
                master_port: 29600,
                source: EnvSource::Torchrun
            }
        );
        assert_eq!(e.device_index(4).unwrap(), 1);
        assert!(e.device_index(0).is_err());
    }

    #[test]
    fn slurm_ranks_come_from_procid() {
        // Second node of a 2 x 8 job: srun sets SLURM_PROCID and SLURM_LOCALID, not LOCAL_RANK.
        let e = env(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
            ("SLURM_JOB_ID", "4312345"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.local_rank, e.world_size), (9, 1, 16));
        assert_eq!(e.master_addr, "gpu07");
        assert_eq!(e.master_port, 12345);
        assert_eq!(e.source, EnvSource::Slurm);
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "a1,a2"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("a1", 4000));
    }

    #[test]
    fn nothing_set_is_one_rank() {
        let e = env(&[]).unwrap();
        assert_eq!(e, DistEnv::single());
        assert!(!e.is_distributed());
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let full = |over: &[(&str, &str)]| {
            let mut v = vec![
                ("RANK", "0"),
                ("LOCAL_RANK", "0"),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "h"),
                ("MASTER_PORT", "29500"),
            ];
            for (k, val) in over {
                v.retain(|(kk, _)| kk != k);
                if !val.is_empty() {
                    v.push((k, val));
                }
            }
            env(&v).unwrap_err().to_string()
        };
        assert!(full(&[("RANK", "2")]).contains("RANK=2 is not below WORLD_SIZE=2"));
        assert!(full(&[("MASTER_PORT", "")]).contains("MASTER_PORT is not set"));
        assert!(full(&[("MASTER_PORT", "70000")]).contains("MASTER_PORT=\"70000\""));
        assert!(full(&[("WORLD_SIZE", "0")]).contains("WORLD_SIZE=0"));
        assert!(full(&[("RANK", "x")]).contains("RANK=\"x\" is not a non-negative integer"));
        assert!(full(&[("LOCAL_RANK", "")]).contains("LOCAL_RANK is not set"));
        let e = env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "2"),
            ("MASTER_ADDR", "h"),
        ]);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("SLURM_PROCID=3 is not below SLURM_NTASKS=2"));
        let e = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        assert!(e.unwrap_err().to_string().contains("SLURM_JOB_NODELIST"));
    }
}
