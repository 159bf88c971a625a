//! Loading a name → tensor map (PyTorch layout) into a [`ParamStore`], and the official init
//! rules of Suave (from SwAV) and Daino (from DINO).
//!
//! PyTorch's `load_state_dict(strict=False)` silently ignores every name that does not match,
//! which hides renaming bugs: a model can "load" a checkpoint and keep its random weights. Here
//! every load returns an [`ImportReport`] of what was loaded, missing, unexpected and
//! mis-shaped, and by default any of those is an error that lists them. The official init
//! (`strict=False`) is expressed as explicit options: missing entries accepted, and the dropped
//! entries removed from the map by the rule functions ([`swav_init`], [`dino_init`]) instead of
//! being ignored by accident.

use super::pth::{find_state_dict, read_pth};
use super::{format_err, from_pytorch_layout, pytorch_shape};
use crate::error::Result;
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// How names of a source map are matched to a store, and what is tolerated.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Prefixes removed from source names, tried in order, each at most once (e.g. `module.`
    /// left by DistributedDataParallel, then `backbone.`).
    pub strip_prefixes: Vec<String>,
    /// Prefix renames `(from, to)` applied after stripping; the first rule that matches wins.
    pub renames: Vec<(String, String)>,
    /// Accept store entries that the source lacks (they keep their current values), as the
    /// official init's `strict=False` does.
    pub allow_missing: bool,
    /// Source names (after mapping) that may have no store entry: exact names or `*` globs such
    /// as `prototypes.*` or `*.num_batches_tracked`. They are listed as ignored in the report.
    pub ignore_unexpected: Vec<String>,
}

impl ImportOptions {
    /// Every store entry must be loaded and every source tensor must be used.
    pub fn strict() -> Self {
        Self::default()
    }

    /// The official init's tolerance: store entries absent from the source (a fresh head,
    /// prototypes, online classifiers) keep their random init. Unexpected names stay errors.
    pub fn official_init() -> Self {
        ImportOptions {
            allow_missing: true,
            ..Self::default()
        }
    }

    /// Adds a prefix to strip.
    pub fn strip(mut self, prefix: &str) -> Self {
        self.strip_prefixes.push(prefix.to_string());
        self
    }

    /// Adds a prefix rename.
    pub fn rename(mut self, from: &str, to: &str) -> Self {
        self.renames.push((from.to_string(), to.to_string()));
        self
    }

    /// Adds a name or `*` glob of unexpected source entries to ignore.
    pub fn ignore(mut self, pattern: &str) -> Self {
        self.ignore_unexpected.push(pattern.to_string());
        self
    }

    /// Sets whether missing store entries are accepted.
    pub fn allow_missing(mut self, yes: bool) -> Self {
        self.allow_missing = yes;
        self
    }

    /// The store name a source name maps to.
    pub fn map_name(&self, name: &str) -> String {
        let mut n = name;
        for p in &self.strip_prefixes {
            if let Some(rest) = n.strip_prefix(p.as_str()) {
                n = rest;
            }
        }
        for (from, to) in &self.renames {
            if let Some(rest) = n.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        n.to_string()
    }

    fn is_ignored(&self, name: &str) -> bool {
        self.ignore_unexpected.iter().any(|p| glob_match(p, name))
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// A tensor whose shape differs from its store entry (both in PyTorch layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// What a load did: the user-facing account that `strict=False` never gives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    /// Store entries that received a value, in store order.
    pub loaded: Vec<String>,
    /// Store entries the source lacks, with their PyTorch shapes.
    pub missing: Vec<(String, Vec<usize>)>,
    /// Source tensors (mapped names) with no store entry, with their shapes.
    pub unexpected: Vec<(String, Vec<usize>)>,
    /// Unexpected source tensors matched by [`ImportOptions::ignore_unexpected`].
    pub ignored: Vec<String>,
    /// Names present on both sides with different shapes.
    pub mismatched: Vec<Mismatch>,
}

/// At most this many names of each kind are listed in a message.
const LIST_MAX: usize = 10;

fn list_names<T>(out: &mut String, what: &str, items: &[T], show: impl Fn(&T) -> String) {
    if items.is_empty() {
        return;
    }
    out.push_str(&format!("\n  {} {what}:", items.len()));
    for it in items.iter().take(LIST_MAX) {
        out.push_str(&format!("\n    {}", show(it)));
    }
    if items.len() > LIST_MAX {
        out.push_str(&format!("\n    ... and {} more", items.len() - LIST_MAX));
    }
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = format!(
            "{} loaded, {} missing, {} unexpected, {} ignored, {} mis-shaped",
            self.loaded.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.ignored.len(),
            self.mismatched.len()
        );
        list_names(
            &mut s,
            "mis-shaped (store vs file)",
            &self.mismatched,
            |m| format!("{} {:?} vs {:?}", m.name, m.expected, m.found),
        );
        list_names(&mut s, "missing from the file", &self.missing, |(n, sh)| {
            format!("{n} {sh:?}")
        });
        list_names(
            &mut s,
            "unexpected in the file",
            &self.unexpected,
            |(n, sh)| format!("{n} {sh:?}"),
        );
        f.write_str(&s)
    }
}

/// Applies the name mapping of `opts` to every source name; errors when two source names land
/// on the same store name (e.g. `module.x` and `x` with `module.` stripped).
pub fn map_names(
    tensors: BTreeMap<String, Tensor<f32>>,
    opts: &ImportOptions,
    source: &str,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let mut out = BTreeMap::new();
    let mut from: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in tensors {
        let m = opts.map_name(&k);
        if let Some(prev) = from.get(&m) {
            return Err(format_err(
                Path::new(source),
                format!("{prev:?} and {k:?} both map to {m:?}"),
            ));
        }
        from.insert(m.clone(), k);
        out.insert(m, v);
    }
    Ok(out)
}

/// Loads `tensors` (PyTorch layout, source names) into `store` by name.
///
/// Names are mapped by `opts`; convolution weights are converted to the store's layout. All
/// checks happen before anything is written, so on error the store is unchanged. Mis-shaped
/// tensors are always an error; missing entries unless `opts.allow_missing`; unexpected
/// tensors unless ignored by `opts.ignore_unexpected`. The error message lists them (the first
/// ten of each, with shapes); `source` names the file in it.
pub fn load_into(
    store: &mut ParamStore,
    tensors: BTreeMap<String, Tensor<f32>>,
    opts: &ImportOptions,
    source: &str,
) -> Result<ImportReport> {
    let mut src = map_names(tensors, opts, source)?;
    let mut report = ImportReport::default();
    for e in store.entries() {
        let want = pytorch_shape(e.layout, e.value.shape());
        match src.get(&e.name) {
            None => report.missing.push((e.name.clone(), want)),
            Some(t) if t.shape() != want.as_slice() => report.mismatched.push(Mismatch {
                name: e.name.clone(),
                expected: want,
                found: t.shape().to_vec(),
            }),
            Some(_) => report.loaded.push(e.name.clone()),
        }
    }
    for (name, t) in &src {
        if store.id(name).is_none() {
            if opts.is_ignored(name) {
                report.ignored.push(name.clone());
            } else {
                report.unexpected.push((name.clone(), t.shape().to_vec()));
            }
        }
    }
    let bad = !report.mismatched.is_empty()
        || !report.unexpected.is_empty()
        || (!opts.allow_missing && !report.missing.is_empty());
    if bad {
        return Err(format_err(
            Path::new(source),
            format!("weights do not match the model: {report}"),
        ));
    }
    for name in &report.loaded {
        let (Some(id), Some(t)) = (store.id(name), src.remove(name)) else {
            continue;
        };
        let layout = store.entry(id).layout;
        *store.value_mut(id) = from_pytorch_layout(layout, t)?;
    }
    Ok(report)
}

/// Suave's init from a SwAV (or Suave) state dict (`[SD] main_suave.py` L415–426):
/// `module.` is stripped, `prototypes.*` is dropped (SwAV has 3000 prototypes, Suave one per
/// class), and the projection head is dropped unless `keep_head` (`--init_proj true`).
///
/// Suave's head is a `ModuleList` (`projection_head.0.{0,1}`, `projection_head.1`), SwAV's a
/// `Sequential` (`projection_head.{0,1,3}`). With `keep_head`, SwAV names are mapped to Suave's
/// (a Suave checkpoint, as used by fine-tuning, already has Suave's names). Note: the official
/// loader does not map them; with `strict=False` it would silently leave the head random when
/// given a SwAV file. The scripts never do that (training uses `--init_proj false`).
pub fn swav_init(
    state_dict: BTreeMap<String, Tensor<f32>>,
    keep_head: bool,
) -> BTreeMap<String, Tensor<f32>> {
    let is_swav_head = state_dict.keys().any(|k| {
        let k = k.strip_prefix("module.").unwrap_or(k);
        k.starts_with("projection_head.3.")
    });
    let head_map = ImportOptions::default()
        .rename("projection_head.0.", "projection_head.0.0.")
        .rename("projection_head.1.", "projection_head.0.1.")
        .rename("projection_head.3.", "projection_head.1.");
    let mut out = BTreeMap::new();
    for (k, v) in state_dict {
        let k = k.strip_prefix("module.").unwrap_or(&k).to_string();
        if k.starts_with("prototypes.") {
            continue;
        }
        let k = if k.starts_with("projection_head.") {
            if !keep_head {
                continue;
            }
            if is_swav_head {
                head_map.map_name(&k)
            } else {
                k
            }
        } else {
            k
        };
        out.insert(k, v);
    }
    out
}

/// Daino's init from DINO's `student` state dict (`[SD] main_daino.py` L344–361): `module.` is
/// stripped, `head.last_layer.*` (`weight_g`, `weight_v`: DINO's 65536 prototypes) is dropped,
/// and the whole head is dropped unless `keep_head` (`--init_proj true`). Names keep DINO's
/// `backbone.` / `head.` prefixes (a store with bare timm names strips `backbone.` through
/// [`ImportOptions::strip`]). The teacher is then a copy of the student, not DINO's teacher.
pub fn dino_init(
    student: BTreeMap<String, Tensor<f32>>,
    keep_head: bool,
) -> BTreeMap<String, Tensor<f32>> {
    student
        .into_iter()
        .filter_map(|(k, v)| {
            let k = k.strip_prefix("module.").unwrap_or(&k).to_string();
            let drop = k.starts_with("head.last_layer.") || (!keep_head && k.starts_with("head."));
            (!drop).then_some((k, v))
        })
        .collect()
}

/// Reads `swav_800ep_pretrain.pth.tar` (or a Suave checkpoint) and applies [`swav_init`]: the
/// state dict is the `state_dict` entry when present, else the top level, as in the official
/// loader.
pub fn read_swav_init(path: &Path, keep_head: bool) -> Result<BTreeMap<String, Tensor<f32>>> {
    let root = read_pth(path)?;
    let sd = find_state_dict(&root, &["state_dict", ""], path)?;
    Ok(swav_init(sd, keep_head))
}

/// Reads `dino_deitsmall16_pretrain_full_checkpoint.pth` and applies [`dino_init`] to its
/// `student` entry.
pub fn read_dino_init(path: &Path, keep_head: bool) -> Result<BTreeMap<String, Tensor<f32>>> {
    let root = read_pth(path)?;
    let sd = find_state_dict(&root, &["student"], path)?;
    Ok(dino_init(sd, keep_head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("prototypes.*", "prototypes.weight"));
        assert!(glob_match(
            "*.num_batches_tracked",
            "bn1.num_batches_tracked"
        ));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXc"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("x", "x") && !glob_match("x", "xy"));
    }

    #[test]
    fn name_mapping_strips_then_renames() {
        let o = ImportOptions::strict()
            .strip("module.")
            .strip("backbone.")
            .rename("head.", "dino_head.");
        assert_eq!(o.map_name("module.backbone.blocks.0.x"), "blocks.0.x");
        assert_eq!(
            o.map_name("module.head.mlp.0.weight"),
            "dino_head.mlp.0.weight"
        );
        // Prefixes are tried in order, so `module.` is not stripped after `backbone.`.
        assert_eq!(o.map_name("backbone.module.x"), "module.x");
    }
}
