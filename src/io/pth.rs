//! Reader of PyTorch `torch.save` files, without Python.
//!
//! The official SwAV and DINO weights are `.pth` files, i.e. a pickle plus raw tensor storages.
//! Two containers exist:
//! - the zip container (PyTorch ≥ 1.6): `<top>/data.pkl` holds the pickle and `<top>/data/<key>`
//!   each storage's raw little-endian bytes (`<top>` is `archive` today, the file stem in
//!   older versions);
//! - the legacy stream (`_use_new_zipfile_serialization=False`, and every file older than 1.6,
//!   which is likely what `swav_800ep_pretrain.pth.tar` is): five pickles in a row (magic number,
//!   protocol, system info, the object, the storage keys), then each storage as an int64 element
//!   count followed by its bytes. The even older tar container (PyTorch < 0.4) is not read.
//!
//! The unpickler understands only what `torch.save` emits for checkpoints: containers, scalars,
//! strings, `collections.OrderedDict`, tensors through `torch._utils._rebuild_tensor_v2` and
//! friends, storages through persistent ids, and `argparse.Namespace` (DINO's `args`) as an opaque
//! object. It never runs code: any other callable is refused with an error that names it, which
//! also makes it safe on untrusted files. Every length and index read from the file is checked,
//! so a truncated or corrupt file gives an error naming the file, never a panic.

use super::{format_err, io_err};
use crate::error::Result;
use crate::tensor::Tensor;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

/// Element type of a PyTorch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PthDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl PthDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            PthDType::F64 | PthDType::I64 => 8,
            PthDType::F32 | PthDType::I32 => 4,
            PthDType::F16 | PthDType::BF16 | PthDType::I16 => 2,
            PthDType::I8 | PthDType::U8 | PthDType::Bool => 1,
        }
    }

    /// The dtype of a `torch.<Name>Storage` class, as named in persistent ids.
    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => PthDType::F64,
            "FloatStorage" => PthDType::F32,
            "HalfStorage" => PthDType::F16,
            "BFloat16Storage" => PthDType::BF16,
            "LongStorage" => PthDType::I64,
            "IntStorage" => PthDType::I32,
            "ShortStorage" => PthDType::I16,
            "CharStorage" => PthDType::I8,
            "ByteStorage" => PthDType::U8,
            "BoolStorage" => PthDType::Bool,
            _ => return None,
        })
    }

    /// Whether the dtype is a floating-point one (weights), as opposed to counters and masks.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            PthDType::F64 | PthDType::F32 | PthDType::F16 | PthDType::BF16
        )
    }
}

/// A tensor read from a checkpoint: dense, row-major, in its file dtype.
///
/// Strides and storage offsets of the file are already applied (a transposed view saved as such
/// comes back as the transposed values), so `data` is `numel × dtype.size()` little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct PthTensor {
    pub dtype: PthDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl PthTensor {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f64 (exact for every dtype but int64 beyond 2^53).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let d = &self.data;
        let n = self.dtype.size();
        d.chunks_exact(n)
            .map(|c| match self.dtype {
                PthDType::F64 => f64::from_le_bytes(arr8(c)),
                PthDType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                PthDType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
                PthDType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
                PthDType::I64 => i64::from_le_bytes(arr8(c)) as f64,
                PthDType::I32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
                PthDType::I16 => i16::from_le_bytes([c[0], c[1]]) as f64,
                PthDType::I8 => c[0] as i8 as f64,
                PthDType::U8 | PthDType::Bool => c[0] as f64,
            })
            .collect()
    }

    /// The values as an engine f32 tensor (the engine computes and stores weights in f32;
    /// int64 counters such as `num_batches_tracked` become floats).
    pub fn to_f32(&self) -> Tensor<f32> {
        let v: Vec<f32> = if self.dtype == PthDType::F32 {
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        } else {
            self.to_f64_vec().into_iter().map(|x| x as f32).collect()
        };
        // The length matches the shape by construction (checked when the tensor was built).
        Tensor::from_vec(v, &self.shape).unwrap_or_else(|_| Tensor::zeros(&self.shape))
    }
}

fn arr8(c: &[u8]) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[..8]);
    b
}

/// A value of an unpickled checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum PthValue {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond i64 (little-endian two's complement bytes, as pickle's LONG opcodes).
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<PthValue>),
    Tuple(Vec<PthValue>),
    /// A dict or OrderedDict, in file order (keys are usually strings; optimiser state uses ints).
    Dict(Vec<(PthValue, PthValue)>),
    Tensor(PthTensor),
    /// A reference to a Python name that was stored but never called (e.g. a `torch.float32`).
    Global(String),
    /// An opaque object such as `argparse.Namespace`: its class, constructor arguments and the
    /// state given to `__setstate__` (for a Namespace: a dict of its attributes).
    Object {
        class: String,
        args: Vec<PthValue>,
        state: Option<Box<PthValue>>,
    },
}

impl PthValue {
    /// The entry `key` of a dict with string keys, or the attribute `key` of an object whose
    /// state is a dict (e.g. `args.lr` of DINO's Namespace).
    pub fn get(&self, key: &str) -> Option<&PthValue> {
        match self {
            PthValue::Dict(items) => items
                .iter()
                .find(|(k, _)| matches!(k, PthValue::Str(s) if s == key))
                .map(|(_, v)| v),
            PthValue::Object {
                state: Some(state), ..
            } => state.get(key),
            _ => None,
        }
    }

    /// Follows a `/`-separated path of keys (`""` is the value itself). Slashes, not dots,
    /// because state-dict keys contain dots.
    pub fn at_path(&self, path: &str) -> Option<&PthValue> {
        let mut v = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            v = v.get(part)?;
        }
        Some(v)
    }

    /// The string keys of a dict (empty for anything else); handy for error messages.
    pub fn keys(&self) -> Vec<String> {
        match self {
            PthValue::Dict(items) => items
                .iter()
                .map(|(k, _)| match k {
                    PthValue::Str(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A short name of the value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            PthValue::None => "None",
            PthValue::Bool(_) => "bool",
            PthValue::Int(_) | PthValue::BigInt(_) => "int",
            PthValue::Float(_) => "float",
            PthValue::Str(_) => "str",
            PthValue::Bytes(_) => "bytes",
            PthValue::List(_) => "list",
            PthValue::Tuple(_) => "tuple",
            PthValue::Dict(_) => "dict",
            PthValue::Tensor(_) => "tensor",
            PthValue::Global(_) => "global",
            PthValue::Object { .. } => "object",
        }
    }

    /// The integer, if this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            PthValue::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number, if this is an int or a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            PthValue::Int(i) => Some(*i as f64),
            PthValue::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            PthValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Reads a `torch.save` file.
pub fn read_pth(path: &Path) -> Result<PthValue> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    parse_pth(&bytes, path)
}

/// Parses the bytes of a `torch.save` file; `path` only names the file in errors.
pub fn parse_pth(bytes: &[u8], path: &Path) -> Result<PthValue> {
    let r = if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        parse_zip(bytes)
    } else if bytes.first() == Some(&0x80) {
        parse_legacy(bytes)
    } else if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
        Err(
            "a tar archive: the pre-0.4 PyTorch tar format is not supported; re-save it with a \
             recent torch.save"
                .to_string(),
        )
    } else if bytes.is_empty() {
        Err("empty file, not a PyTorch checkpoint".to_string())
    } else {
        Err("not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)".to_string())
    };
    r.map_err(|d| format_err(path, d))
}

/// Reads a checkpoint and returns the state dict found at the first of `paths` that exists
/// (`/`-separated; `""` is the top level), as f32 tensors in PyTorch layout.
pub fn load_state_dict(path: &Path, paths: &[&str]) -> Result<BTreeMap<String, Tensor<f32>>> {
    let root = read_pth(path)?;
    find_state_dict(&root, paths, path)
}

/// Finds a state dict (a dict of string → tensor) in a checkpoint tree: the first of `paths`
/// present, e.g. `&["state_dict", ""]` for SwAV, `&["student"]` for DINO. Every tensor is
/// converted to f32 (PyTorch layout, names unchanged). `file` names the file in errors.
pub fn find_state_dict(
    root: &PthValue,
    paths: &[&str],
    file: &Path,
) -> Result<BTreeMap<String, Tensor<f32>>> {
    let Some((p, v)) = paths.iter().find_map(|p| root.at_path(p).map(|v| (*p, v))) else {
        return Err(format_err(
            file,
            format!(
                "no state dict at any of {paths:?}; top-level keys: {:?}",
                root.keys()
            ),
        ));
    };
    let PthValue::Dict(items) = v else {
        return Err(format_err(
            file,
            format!("{p:?} is a {}, not a state dict", v.kind()),
        ));
    };
    let mut out = BTreeMap::new();
    for (k, val) in items {
        let PthValue::Str(name) = k else {
            return Err(format_err(
                file,
                format!("{p:?} has a non-string key {k:?}; not a state dict"),
            ));
        };
        match val {
            PthValue::Tensor(t) => {
                out.insert(name.clone(), t.to_f32());
            }
            other => {
                return Err(format_err(
                    file,
                    format!(
                        "{p:?}: entry {name:?} is a {}, not a tensor; not a state dict",
                        other.kind()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------------------------

type PResult<T> = std::result::Result<T, String>;

fn parse_zip(bytes: &[u8]) -> PResult<PthValue> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| {
        format!("truncated or corrupt zip archive ({e}); not a complete torch.save file")
    })?;
    let pkl = zip
        .file_names()
        .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .map(str::to_string)
        .ok_or("zip archive without a data.pkl: not a torch.save file")?;
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
    if let Ok(bo) = read_entry(&mut zip, &format!("{prefix}byteorder")) {
        if bo.trim_ascii() != b"little" {
            return Err(format!(
                "byte order {:?}: only little-endian checkpoints are supported",
                String::from_utf8_lossy(&bo)
            ));
        }
    }
    let data = read_entry(&mut zip, &pkl)?;
    let mut source = ZipSource {
        zip,
        prefix,
        cache: HashMap::new(),
    };
    let mut u = Unpickler::new(&data, &mut source);
    let v = u.load()?;
    materialize(&v, 0)
}

fn read_entry(zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str) -> PResult<Vec<u8>> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| format!("zip entry {name}: {e}"))?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)
        .map_err(|e| format!("zip entry {name}: {e} (truncated or corrupt file)"))?;
    Ok(out)
}

/// The legacy magic number `0x1950a86a20f9469cfc6c`, little-endian, as pickle's LONG1 stores it.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

fn parse_legacy(bytes: &[u8]) -> PResult<PthValue> {
    let mut source = LegacySource {
        storages: HashMap::new(),
    };
    let mut pos = 0;
    let next = |source: &mut LegacySource, pos: &mut usize| -> PResult<Val> {
        let mut u = Unpickler::new(&bytes[*pos..], source);
        let v = u.load()?;
        *pos += u.pos;
        Ok(v)
    };
    let magic = next(&mut source, &mut pos)?;
    if !matches!(&magic, Val::BigInt(b) if b[..] == LEGACY_MAGIC[..]) {
        return Err(
            "a pickle, but not a torch.save file (the legacy magic number is missing)".into(),
        );
    }
    match next(&mut source, &mut pos)? {
        Val::Int(1001) => {}
        other => {
            return Err(format!(
                "legacy torch.save protocol {other:?} is not supported (expected 1001)"
            ))
        }
    }
    let sys_info = materialize(&next(&mut source, &mut pos)?, 0)?;
    if sys_info.get("little_endian") == Some(&PthValue::Bool(false)) {
        return Err("big-endian legacy checkpoint: only little-endian is supported".into());
    }
    let root = next(&mut source, &mut pos)?;
    let keys = materialize(&next(&mut source, &mut pos)?, 0)?;
    let PthValue::List(keys) = keys else {
        return Err("legacy checkpoint: the storage key list is missing".into());
    };
    for k in keys {
        let PthValue::Str(k) = k else {
            return Err(format!(
                "legacy checkpoint: storage key {k:?} is not a string"
            ));
        };
        let cell = source
            .storages
            .get(&k)
            .ok_or_else(|| format!("legacy checkpoint: storage {k} is listed but never used"))?;
        let n = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| format!("truncated file: storage {k} is missing"))?;
        let numel = u64::from_le_bytes(arr8(n));
        pos += 8;
        let nbytes = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(cell.dtype.size()))
            .ok_or_else(|| format!("storage {k}: implausible element count {numel}"))?;
        if numel as usize != cell.numel {
            return Err(format!(
                "storage {k}: {numel} elements in the data, {} in the pickle",
                cell.numel
            ));
        }
        let data = bytes
            .get(pos..pos.saturating_add(nbytes))
            .ok_or_else(|| format!("truncated file: storage {k} needs {nbytes} bytes"))?;
        pos += nbytes;
        *cell.data.borrow_mut() = Some(data.to_vec());
    }
    materialize(&root, 0)
}

/// Where the bytes of a storage named by a persistent id come from.
trait StorageSource {
    fn storage(&mut self, key: &str, dtype: PthDType, numel: usize) -> PResult<Rc<StorageCell>>;
}

struct ZipSource<'a> {
    zip: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    prefix: String,
    cache: HashMap<String, Rc<StorageCell>>,
}

impl StorageSource for ZipSource<'_> {
    fn storage(&mut self, key: &str, dtype: PthDType, numel: usize) -> PResult<Rc<StorageCell>> {
        if let Some(c) = self.cache.get(key) {
            return Ok(c.clone());
        }
        let data = read_entry(&mut self.zip, &format!("{}data/{key}", self.prefix))?;
        let need = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| format!("storage {key}: implausible size {numel}"))?;
        if data.len() < need {
            return Err(format!(
                "storage {key}: {} bytes, {need} needed (truncated or corrupt file)",
                data.len()
            ));
        }
        let cell = Rc::new(StorageCell {
            dtype,
            numel,
            data: RefCell::new(Some(data)),
        });
        self.cache.insert(key.to_string(), cell.clone());
        Ok(cell)
    }
}

struct LegacySource {
    storages: HashMap<String, Rc<StorageCell>>,
}

impl StorageSource for LegacySource {
    fn storage(&mut self, key: &str, dtype: PthDType, numel: usize) -> PResult<Rc<StorageCell>> {
        // The bytes follow the pickles; they are filled in once the key list has been read.
        let cell = self
            .storages
            .entry(key.to_string())
            .or_insert_with(|| {
                Rc::new(StorageCell {
                    dtype,
                    numel,
                    data: RefCell::new(None),
                })
            })
            .clone();
        if cell.dtype != dtype || cell.numel != numel {
            return Err(format!("storage {key} is declared twice differently"));
        }
        Ok(cell)
    }
}

/// A storage: `numel` elements of `dtype`; `data` is `None` until a legacy file's data section
/// has been read.
#[derive(Debug)]
struct StorageCell {
    dtype: PthDType,
    numel: usize,
    data: RefCell<Option<Vec<u8>>>,
}

// ---------------------------------------------------------------------------------------------
// Unpickler
// ---------------------------------------------------------------------------------------------

type Shared<T> = Rc<RefCell<T>>;

/// A value on the unpickler's stack. Containers are shared because pickle memoises them before
/// filling them; tensors are lazy because a legacy file's storages come after the pickle.
#[derive(Clone, Debug)]
enum Val {
    None,
    Bool(bool),
    Int(i64),
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Shared<Vec<Val>>),
    Tuple(Rc<Vec<Val>>),
    Dict(Shared<Vec<(Val, Val)>>),
    Global(Rc<String>),
    Object(Shared<Obj>),
    /// A storage and an element offset into it (legacy storage views).
    Storage(Rc<StorageCell>, usize),
    Tensor(Rc<LazyTensor>),
}

#[derive(Debug)]
struct Obj {
    class: String,
    args: Vec<Val>,
    state: Option<Val>,
}

#[derive(Debug)]
struct LazyTensor {
    storage: Rc<StorageCell>,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Refuses nesting deeper than this (also breaks reference cycles a malicious pickle could build).
const MAX_DEPTH: usize = 256;

/// The largest tensor whose elements may outnumber its storage's (stride-0 expansions), in
/// elements: bounds what a corrupt size tuple can make us allocate.
const MAX_EXPANDED_NUMEL: usize = 1 << 28;

fn materialize(v: &Val, depth: usize) -> PResult<PthValue> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "values nested deeper than {MAX_DEPTH} (or a cyclic structure); not a checkpoint"
        ));
    }
    let m = |x: &Val| materialize(x, depth + 1);
    Ok(match v {
        Val::None => PthValue::None,
        Val::Bool(b) => PthValue::Bool(*b),
        Val::Int(i) => PthValue::Int(*i),
        Val::BigInt(b) => PthValue::BigInt(b.clone()),
        Val::Float(f) => PthValue::Float(*f),
        Val::Str(s) => PthValue::Str(s.clone()),
        Val::Bytes(b) => PthValue::Bytes(b.clone()),
        Val::List(l) => PthValue::List(l.borrow().iter().map(m).collect::<PResult<_>>()?),
        Val::Tuple(t) => PthValue::Tuple(t.iter().map(m).collect::<PResult<_>>()?),
        Val::Dict(d) => PthValue::Dict(
            d.borrow()
                .iter()
                .map(|(k, v)| Ok((m(k)?, m(v)?)))
                .collect::<PResult<_>>()?,
        ),
        Val::Global(g) => PthValue::Global(g.to_string()),
        Val::Object(o) => {
            let o = o.borrow();
            PthValue::Object {
                class: o.class.clone(),
                args: o.args.iter().map(m).collect::<PResult<_>>()?,
                state: match &o.state {
                    Some(s) => Some(Box::new(m(s)?)),
                    None => None,
                },
            }
        }
        Val::Storage(..) => return Err("a bare storage outside a tensor is not supported".into()),
        Val::Tensor(t) => PthValue::Tensor(t.materialize()?),
    })
}

impl LazyTensor {
    fn materialize(&self) -> PResult<PthTensor> {
        let s = &self.storage;
        let data = s.data.borrow();
        let data = data
            .as_ref()
            .ok_or("a tensor's storage is missing from the file (truncated?)")?;
        let es = s.dtype.size();
        let numel = self
            .size
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or("tensor size overflows")?;
        let mut out = Vec::new();
        if numel > 0 {
            // Highest element index touched; every stride is non-negative in PyTorch.
            let mut last = self.offset;
            for (&n, &st) in self.size.iter().zip(&self.stride) {
                last = (n - 1)
                    .checked_mul(st)
                    .and_then(|x| x.checked_add(last))
                    .ok_or("tensor strides overflow")?;
            }
            if last >= s.numel || last.saturating_add(1).saturating_mul(es) > data.len() {
                return Err(format!(
                    "tensor of size {:?}, stride {:?}, offset {} reaches past its storage of {} \
                     elements (corrupt file)",
                    self.size, self.stride, self.offset, s.numel
                ));
            }
            if numel > s.numel && numel > MAX_EXPANDED_NUMEL {
                return Err(format!(
                    "tensor of size {:?} is implausibly large for its storage",
                    self.size
                ));
            }
            out.reserve(numel * es);
            if is_contiguous(&self.size, &self.stride) {
                out.extend_from_slice(&data[self.offset * es..(self.offset + numel) * es]);
            } else {
                let rank = self.size.len();
                let mut idx = vec![0usize; rank];
                for _ in 0..numel {
                    let e: usize = self.offset
                        + idx
                            .iter()
                            .zip(&self.stride)
                            .map(|(i, s)| i * s)
                            .sum::<usize>();
                    out.extend_from_slice(&data[e * es..(e + 1) * es]);
                    for d in (0..rank).rev() {
                        idx[d] += 1;
                        if idx[d] < self.size[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
            }
        }
        Ok(PthTensor {
            dtype: s.dtype,
            shape: self.size.clone(),
            data: out,
        })
    }
}

fn is_contiguous(size: &[usize], stride: &[usize]) -> bool {
    let mut expect = 1usize;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expect {
            return false;
        }
        expect = expect.saturating_mul(n);
    }
    true
}

struct Unpickler<'a, 'b> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    marks: Vec<usize>,
    memo: HashMap<u64, Val>,
    source: &'b mut dyn StorageSource,
}

fn opname(op: u8) -> String {
    if op.is_ascii_graphic() {
        format!("0x{op:02x} ('{}')", op as char)
    } else {
        format!("0x{op:02x}")
    }
}

impl<'a, 'b> Unpickler<'a, 'b> {
    fn new(data: &'a [u8], source: &'b mut dyn StorageSource) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            source,
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(e) => {
                let s = &self.data[self.pos..e];
                self.pos = e;
                Ok(s)
            }
            None => Err(format!(
                "truncated pickle: {n} bytes wanted at byte {} of {}",
                self.pos,
                self.data.len()
            )),
        }
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        Ok(u64::from_le_bytes(arr8(self.take(8)?)))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated pickle: unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("non-UTF-8 text at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }
    fn len_bytes(&mut self, n: u64) -> PResult<&'a [u8]> {
        let n = usize::try_from(n).map_err(|_| "length overflows".to_string())?;
        self.take(n)
    }
    fn string(&mut self, n: u64) -> PResult<Val> {
        let b = self.len_bytes(n)?;
        Ok(Val::Str(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            // Python 2 `str` (BINSTRING) is bytes; read it as latin-1 as torch.load does.
            Err(_) => b.iter().map(|&c| c as char).collect(),
        }))
    }

    fn pop(&mut self) -> PResult<Val> {
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))
    }
    fn top(&mut self) -> PResult<&mut Val> {
        let p = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("pickle stack underflow at byte {p}"))
    }
    fn pop_mark(&mut self) -> PResult<Vec<Val>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle MARK missing at byte {}", self.pos))?;
        if m > self.stack.len() {
            return Err(format!("corrupt pickle stack at byte {}", self.pos));
        }
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&self, k: u64) -> PResult<Val> {
        self.memo
            .get(&k)
            .cloned()
            .ok_or_else(|| format!("pickle memo key {k} missing at byte {}", self.pos))
    }
    fn memo_put(&mut self, k: u64) -> PResult<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))?;
        self.memo.insert(k, v);
        Ok(())
    }

    /// Runs the pickle to its STOP opcode and returns the value.
    fn load(&mut self) -> PResult<Val> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            self.step(op)
                .map_err(|e| format!("{e} (pickle opcode {} at byte {at})", opname(op)))?;
            if op == b'.' {
                return self.pop();
            }
        }
    }

    fn step(&mut self, op: u8) -> PResult<()> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p} is not supported"));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint only
            }
            b'.' => {}
            b'(' => self.marks.push(self.stack.len()),
            b')' => self.stack.push(Val::Tuple(Rc::new(Vec::new()))),
            b']' => self.stack.push(Val::List(Rc::default())),
            b'}' => self.stack.push(Val::Dict(Rc::default())),
            0x8f => self.stack.push(Val::List(Rc::default())), // EMPTY_SET, read as a list
            b't' => {
                let items = self.pop_mark()?;
                self.stack.push(Val::Tuple(Rc::new(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err("pickle stack underflow".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Val::Tuple(Rc::new(items)));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.stack.push(Val::List(Rc::new(RefCell::new(items))));
            }
            0x91 => {
                let items = self.pop_mark()?; // FROZENSET, read as a tuple
                self.stack.push(Val::Tuple(Rc::new(items)));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.stack.push(Val::Dict(Rc::new(RefCell::new(d))));
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.set_items(d)?;
            }
            b'N' => self.stack.push(Val::None),
            0x88 => self.stack.push(Val::Bool(true)),
            0x89 => self.stack.push(Val::Bool(false)),
            b'J' => {
                let v = self.u32()? as i32;
                self.stack.push(Val::Int(v as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Val::Int(v as i64));
            }
            b'M' => {
                let v = self.u16()?;
                self.stack.push(Val::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as u64
                } else {
                    self.u32()? as u64
                };
                let b = self.len_bytes(n)?;
                self.stack.push(long_from_bytes(b));
            }
            b'I' => {
                let l = self.line()?;
                let v = match l {
                    "00" => Val::Bool(false),
                    "01" => Val::Bool(true),
                    _ => Val::Int(l.parse().map_err(|_| format!("bad INT {l:?}"))?),
                };
                self.stack.push(v);
            }
            b'L' => {
                let l = self.line()?;
                let v: i64 = l
                    .trim_end_matches('L')
                    .parse()
                    .map_err(|_| format!("bad LONG {l:?}"))?;
                self.stack.push(Val::Int(v));
            }
            b'G' => {
                let b = self.take(8)?;
                self.stack.push(Val::Float(f64::from_be_bytes(arr8(b))));
            }
            b'F' => {
                let l = self.line()?;
                let v: f64 = l.parse().map_err(|_| format!("bad FLOAT {l:?}"))?;
                self.stack.push(Val::Float(v));
            }
            b'X' => {
                let n = self.u32()? as u64;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8c | b'U' => {
                let n = self.u8()? as u64;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = self.u64()?;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            b'T' => {
                let n = self.u32()? as u64;
                let v = self.string(n)?;
                self.stack.push(v);
            }
            b'V' => {
                let l = self.line()?;
                self.stack.push(Val::Str(l.to_string()));
            }
            b'B' | b'C' | 0x8e => {
                let n = match op {
                    b'B' => self.u32()? as u64,
                    b'C' => self.u8()? as u64,
                    _ => self.u64()?,
                };
                let b = self.len_bytes(n)?;
                self.stack.push(Val::Bytes(b.to_vec()));
            }
            b'q' => {
                let k = self.u8()? as u64;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.u32()? as u64;
                self.memo_put(k)?;
            }
            b'p' => {
                let l = self.line()?;
                let k = l.parse().map_err(|_| format!("bad PUT {l:?}"))?;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u64;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.u8()? as u64;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'j' => {
                let k = self.u32()? as u64;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'g' => {
                let l = self.line()?;
                let k = l.parse().map_err(|_| format!("bad GET {l:?}"))?;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack
                    .push(Val::Global(Rc::new(format!("{module}.{name}"))));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Val::Str(m), Val::Str(n)) => {
                        self.stack.push(Val::Global(Rc::new(format!("{m}.{n}"))))
                    }
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.stack.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(cls, args)?;
                self.stack.push(v);
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let v = self.new_obj(cls, args)?;
                self.stack.push(v);
            }
            b'b' => {
                let state = self.pop()?;
                let target = self.top()?.clone();
                match target {
                    Val::Object(o) => o.borrow_mut().state = Some(state),
                    // The attributes of an OrderedDict (a state dict's `_metadata`) and of a
                    // tensor (a Parameter's flags) carry no weights: dropped.
                    Val::Dict(_) | Val::Tensor(_) => {}
                    other => {
                        return Err(format!("BUILD on a {} is not supported", val_kind(&other)))
                    }
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.stack.push(v);
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.stack.push(v);
            }
            _ => return Err("unsupported pickle opcode (not emitted by torch.save)".into()),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Val>) -> PResult<()> {
        match self.top()? {
            Val::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("APPEND to a {}", val_kind(other))),
        }
    }

    fn set_items(&mut self, items: Vec<(Val, Val)>) -> PResult<()> {
        match self.top()? {
            Val::Dict(d) => {
                d.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!("SETITEM on a {}", val_kind(other))),
        }
    }

    fn persistent_load(&mut self, pid: Val) -> PResult<Val> {
        let Val::Tuple(t) = pid else {
            return Err("persistent id is not a tuple".into());
        };
        let bad = || "persistent id is not ('storage', type, key, location, numel[, view])";
        match t.first() {
            Some(Val::Str(s)) if s == "storage" => {}
            Some(Val::Str(s)) => {
                return Err(format!(
                    "persistent id of kind {s:?} (only storages are supported)"
                ))
            }
            _ => return Err(bad().into()),
        }
        if t.len() < 5 {
            return Err(bad().into());
        }
        let dtype = match &t[1] {
            Val::Global(g) => g
                .strip_prefix("torch.")
                .and_then(PthDType::from_storage_class)
                .ok_or_else(|| format!("unsupported storage type {g}"))?,
            _ => return Err(bad().into()),
        };
        let key = match &t[2] {
            Val::Str(k) => k.clone(),
            _ => return Err(bad().into()),
        };
        let numel = match &t[4] {
            Val::Int(n) if *n >= 0 => *n as usize,
            _ => return Err(bad().into()),
        };
        match t.get(5) {
            // Legacy storage views: (view_key, element offset, view size) into the root storage.
            Some(Val::Tuple(view)) => {
                let root = self.source.storage(&key, dtype, numel)?;
                match view.get(1) {
                    Some(Val::Int(off)) if *off >= 0 && (*off as usize) <= numel => {
                        Ok(Val::Storage(root, *off as usize))
                    }
                    _ => Err("bad storage view in persistent id".into()),
                }
            }
            None | Some(Val::None) => Ok(Val::Storage(self.source.storage(&key, dtype, numel)?, 0)),
            _ => Err(bad().into()),
        }
    }

    fn reduce(&mut self, func: Val, args: Val) -> PResult<Val> {
        let Val::Global(name) = &func else {
            return Err(format!("REDUCE on a {}", val_kind(&func)));
        };
        let Val::Tuple(args) = args else {
            return Err(format!("{name}: arguments are not a tuple"));
        };
        match name.as_str() {
            "torch._utils._rebuild_tensor_v2"
            | "torch._utils._rebuild_tensor"
            | "torch._utils._rebuild_tensor_v3" => rebuild_tensor(name, &args),
            "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
                match args.first() {
                    Some(t @ Val::Tensor(_)) => Ok(t.clone()),
                    _ => Err(format!("{name}: first argument is not a tensor")),
                }
            }
            "torch._tensor._rebuild_from_type_v2" => {
                // (func, type, args, state): a Tensor or Parameter rebuilt by `func(*args)`.
                match (args.first(), args.get(2)) {
                    (Some(f), Some(a)) => self.reduce(f.clone(), a.clone()),
                    _ => Err(format!("{name}: expected (func, type, args, state)")),
                }
            }
            "collections.OrderedDict" | "builtins.dict" | "__builtin__.dict" => {
                let mut d = Vec::new();
                if let Some(Val::List(items)) = args.first() {
                    for it in items.borrow().iter() {
                        match it {
                            Val::Tuple(p) if p.len() == 2 => d.push((p[0].clone(), p[1].clone())),
                            _ => return Err(format!("{name}: items are not pairs")),
                        }
                    }
                }
                Ok(Val::Dict(Rc::new(RefCell::new(d))))
            }
            "torch.Size" => match args.first() {
                Some(t @ Val::Tuple(_)) => Ok(t.clone()),
                _ => Err("torch.Size: argument is not a tuple".into()),
            },
            "_codecs.encode" => match args.first() {
                // How protocol 2 stores Python 3 bytes: encode(str, 'latin1').
                Some(Val::Str(s)) => Ok(Val::Bytes(s.chars().map(|c| c as u32 as u8).collect())),
                _ => Err("_codecs.encode: argument is not a string".into()),
            },
            _ => Err(format!(
                "the pickle calls {name}, which a PyTorch checkpoint reader does not run \
                 (only tensors, containers and argparse.Namespace are supported)"
            )),
        }
    }

    fn new_obj(&mut self, cls: Val, args: Val) -> PResult<Val> {
        let Val::Global(name) = &cls else {
            return Err(format!("NEWOBJ on a {}", val_kind(&cls)));
        };
        let args = match args {
            Val::Tuple(t) => t.as_ref().clone(),
            _ => return Err(format!("{name}: arguments are not a tuple")),
        };
        match name.as_str() {
            "argparse.Namespace" => Ok(Val::Object(Rc::new(RefCell::new(Obj {
                class: name.to_string(),
                args,
                state: None,
            })))),
            "collections.OrderedDict" => Ok(Val::Dict(Rc::default())),
            _ => Err(format!(
                "the pickle builds an object of class {name}, which is not supported \
                 (only tensors, containers and argparse.Namespace are)"
            )),
        }
    }
}

fn val_kind(v: &Val) -> &'static str {
    match v {
        Val::None => "None",
        Val::Bool(_) => "bool",
        Val::Int(_) | Val::BigInt(_) => "int",
        Val::Float(_) => "float",
        Val::Str(_) => "str",
        Val::Bytes(_) => "bytes",
        Val::List(_) => "list",
        Val::Tuple(_) => "tuple",
        Val::Dict(_) => "dict",
        Val::Global(_) => "global",
        Val::Object(_) => "object",
        Val::Storage(..) => "storage",
        Val::Tensor(_) => "tensor",
    }
}

fn pairs(items: Vec<Val>) -> PResult<Vec<(Val, Val)>> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// Pickle's LONG1/LONG4: little-endian two's complement of any length.
fn long_from_bytes(b: &[u8]) -> Val {
    if b.is_empty() {
        return Val::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut x = [if neg { 0xff } else { 0 }; 8];
        x[..b.len()].copy_from_slice(b);
        return Val::Int(i64::from_le_bytes(x));
    }
    Val::BigInt(b.to_vec())
}

fn int_list(name: &str, what: &str, v: Option<&Val>) -> PResult<Vec<usize>> {
    match v {
        Some(Val::Tuple(t)) => t
            .iter()
            .map(|x| match x {
                Val::Int(i) if *i >= 0 => Ok(*i as usize),
                _ => Err(format!(
                    "{name}: {what} holds {x:?}, not a non-negative int"
                )),
            })
            .collect(),
        _ => Err(format!("{name}: {what} is not a tuple")),
    }
}

fn rebuild_tensor(name: &str, args: &[Val]) -> PResult<Val> {
    let (storage, base) = match args.first() {
        Some(Val::Storage(s, off)) => (s.clone(), *off),
        _ => return Err(format!("{name}: first argument is not a storage")),
    };
    let offset = match args.get(1) {
        Some(Val::Int(o)) if *o >= 0 => *o as usize,
        _ => return Err(format!("{name}: storage offset is not a non-negative int")),
    };
    let size = int_list(name, "size", args.get(2))?;
    let stride = int_list(name, "stride", args.get(3))?;
    if size.len() != stride.len() {
        return Err(format!(
            "{name}: size {size:?} and stride {stride:?} differ in rank"
        ));
    }
    Ok(Val::Tensor(Rc::new(LazyTensor {
        storage,
        offset: offset
            .checked_add(base)
            .ok_or_else(|| format!("{name}: offset overflows"))?,
        size,
        stride,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: &[u8]) -> std::result::Result<PthValue, String> {
        parse_pth(b, Path::new("mem.pth")).map_err(|e| e.to_string())
    }

    #[test]
    fn long_bytes() {
        assert!(matches!(long_from_bytes(&[0xff]), Val::Int(-1)));
        assert!(matches!(long_from_bytes(&[0x00, 0x01]), Val::Int(256)));
        assert!(matches!(long_from_bytes(&[0; 9]), Val::BigInt(_)));
    }

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_contiguous(&[1, 3], &[7, 1]));
        assert!(is_contiguous(&[], &[]));
    }

    #[test]
    fn rejects_non_checkpoints_with_named_errors() {
        let e = parse(b"hello").unwrap_err();
        assert!(
            e.contains("mem.pth") && e.contains("not a PyTorch checkpoint"),
            "{e}"
        );
        let e = parse(b"").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        // A plain pickle of an int (protocol 2) lacks the legacy magic number.
        let e = parse(b"\x80\x02K\x05.").unwrap_err();
        assert!(e.contains("magic"), "{e}");
        // A legacy-looking stream that calls os.system is refused by name.
        let mut b = b"\x80\x02\x8a\x0a".to_vec();
        b.extend_from_slice(&LEGACY_MAGIC);
        b.extend_from_slice(
            b".\x80\x02M\xe9\x03.\x80\x02}.\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.",
        );
        let e = parse(&b).unwrap_err();
        assert!(e.contains("os.system") && e.contains("opcode 0x52"), "{e}");
    }

    #[test]
    fn unpickles_scalars_containers_and_memo() {
        // {'a': [1, -2, 3.5, None, True], 'b': 'x', 'c': ('x' via memo)} as protocol 2 would write.
        let pkl: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03X\x01\x00\x00\x00xq\x04X\x01\x00\x00\x00ch\x04\x85u.";
        let mut src = LegacySource {
            storages: HashMap::new(),
        };
        let v = Unpickler::new(pkl, &mut src).load().unwrap();
        let v = materialize(&v, 0).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&PthValue::List(vec![
                PthValue::Int(1),
                PthValue::Int(-2),
                PthValue::Float(3.5),
                PthValue::None,
                PthValue::Bool(true)
            ]))
        );
        assert_eq!(v.get("b").and_then(|x| x.as_str()), Some("x"));
        assert_eq!(
            v.get("c"),
            Some(&PthValue::Tuple(vec![PthValue::Str("x".into())]))
        );
        // Every truncation is an error, never a panic.
        for n in 0..pkl.len() {
            let mut src = LegacySource {
                storages: HashMap::new(),
            };
            assert!(Unpickler::new(&pkl[..n], &mut src).load().is_err());
        }
    }

    #[test]
    fn cyclic_list_is_an_error() {
        // l = []; l.append(l)
        let pkl: &[u8] = b"\x80\x02]q\x00h\x00a.";
        let mut src = LegacySource {
            storages: HashMap::new(),
        };
        let v = Unpickler::new(pkl, &mut src).load().unwrap();
        let e = materialize(&v, 0).unwrap_err();
        assert!(e.contains("cyclic"), "{e}");
    }
}
