//! GGUF files (llama.cpp's format, version 3), read through mmap.
//!
//! ```text
//! "GGUF" u32 version  u64 tensor_count  u64 metadata_count
//! metadata_count × (string key, u32 value type, value)       strings: u64 length + UTF-8 bytes
//! tensor_count   × (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)
//! padding to `general.alignment` (default 32), then the tensor data; offsets count from there
//! ```
//! Dims are innermost first: a matrix `[rows, cols]` is stored as dims `[cols, rows]`.
//! Every read is checked against the file's length, so a truncated or corrupt file is an error
//! that names the file, what was being read and where, never a panic.
//!
//! [`llama`] turns the metadata into a [`Config`](super::config::Config) and the tensors into the
//! runtime's weights; [`vocab`] builds the tokenizer from the metadata.

pub mod llama;
pub mod quant;
pub mod vocab;

use anyhow::{bail, Context, Result};
use memmap2::{Mmap, MmapOptions};
use quant::GgmlType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
const SUPPORTED_VERSION: u32 = 3;
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dims.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The name of the value's type, as the GGUF spec spells it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F32(_) => "float32",
            Value::F64(_) => "float64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer, as i64 (token types are int32).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where one tensor lies in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// As stored: innermost first.
    pub dims: Vec<u64>,
    /// The ggml type id (checked when the tensor is read: a file may hold tensors kvlab never
    /// reads in types it does not know).
    pub type_id: u32,
    /// Absolute byte offset in the file.
    pub start: usize,
}

impl TensorInfo {
    /// Row-major shape, outermost first (`[rows, cols]` for a matrix).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF file: its metadata and tensor directory, the data left in the mapping.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    map: Arc<Mmap>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: read-only mapping; as for safetensors (weights.rs), a file changed on disk while
        // kvlab runs is outside what any engine defends against.
        let map = unsafe { MmapOptions::new().map(&file) }
            .with_context(|| format!("cannot mmap {}", path.display()))?;
        Self::parse(path, Arc::new(map))
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<GgufFile> {
        let mut r = Reader {
            bytes: &map,
            pos: 0,
        };
        let describe =
            |e: anyhow::Error| e.context(format!("{} is not a valid GGUF file", path.display()));
        let magic = r.take(4, "the magic").map_err(describe)?;
        if magic != MAGIC {
            bail!(
                "{} is not a GGUF file: it starts with {:?}, not \"GGUF\"",
                path.display(),
                String::from_utf8_lossy(magic)
            );
        }
        let version = r.u32("the version").map_err(describe)?;
        if version != SUPPORTED_VERSION {
            let hint = if version.swap_bytes() == SUPPORTED_VERSION {
                " (a big-endian file; kvlab reads little-endian GGUF)"
            } else {
                ""
            };
            bail!(
                "{} is GGUF version {version}{hint}; kvlab reads version {SUPPORTED_VERSION}",
                path.display()
            );
        }
        let (metadata, tensors) = Self::parse_directory(&mut r).map_err(describe)?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!(
                    "{}: general.alignment is {v:?}; it must be a power of two",
                    path.display()
                ),
            },
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = map.len() as u64;
        let tensors = tensors
            .into_iter()
            .map(|(name, dims, type_id, offset)| {
                if !offset.is_multiple_of(alignment) {
                    bail!(
                        "{}: tensor {name} starts at data offset {offset}, not a multiple of the \
                         alignment {alignment}",
                        path.display()
                    );
                }
                let start = data_start.checked_add(offset).filter(|&s| s <= file_len);
                let start = start.with_context(|| {
                    format!(
                        "{}: tensor {name} starts at byte {data_start} + {offset}, past the end of \
                         the file ({file_len} bytes): truncated?",
                        path.display()
                    )
                })?;
                Ok(TensorInfo {
                    name,
                    dims,
                    type_id,
                    start: start as usize,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            map,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse_directory(
        r: &mut Reader,
    ) -> Result<(BTreeMap<String, Value>, Vec<(String, Vec<u64>, u32, u64)>)> {
        let tensor_count = r.u64("the tensor count")?;
        let metadata_count = r.u64("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..metadata_count {
            let key = r.string(&format!("the key of metadata entry {i}"))?;
            let value_type = r.u32(&format!("the type of {key}"))?;
            let value = r.value(value_type, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                bail!("metadata key {key} appears twice");
            }
        }
        // Each tensor entry takes at least 24 bytes: bound the count before allocating.
        r.check_count(tensor_count, 24, "tensor directory")?;
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the rank of tensor {name}"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                bail!("tensor {name} has {n_dims} dims; ggml tensors have 1 to {MAX_DIMS}");
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&format!("the dims of tensor {name}")))
                .collect::<Result<Vec<_>>>()?;
            let type_id = r.u32(&format!("the type of tensor {name}"))?;
            let offset = r.u64(&format!("the offset of tensor {name}"))?;
            tensors.push((name, dims, type_id, offset));
        }
        Ok((metadata, tensors))
    }

    pub fn file_len(&self) -> usize {
        self.map.len()
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The type and bytes of tensor `t`, checked: a type kvlab reads, rows of whole blocks, and a
    /// byte range inside the file.
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        let in_file = || format!("tensor {} of {}", t.name, self.path.display());
        let ty = GgmlType::from_id(t.type_id).with_context(in_file)?;
        let cols = t.dims[0] as usize;
        let rows = t.dims[1..]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("{}: dims {:?} overflow", in_file(), t.dims))?;
        let row_bytes = ty.row_bytes(cols).with_context(in_file)? as u64;
        let len = rows.checked_mul(row_bytes);
        let end = len.and_then(|len| (t.start as u64).checked_add(len));
        match (len, end) {
            (Some(_), Some(end)) if end <= self.map.len() as u64 => {
                Ok((ty, &self.map[t.start..end as usize]))
            }
            _ => bail!(
                "{}: {} dims {:?} need {} bytes from byte {}, past the end of the file ({} \
                 bytes): truncated?",
                in_file(),
                ty.name(),
                t.dims,
                len.map_or("too many".to_string(), |l| l.to_string()),
                t.start,
                self.map.len()
            ),
        }
    }

    /// The metadata value `key`, or an error naming the key and the file.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .with_context(|| format!("{} lacks the metadata key {key}", self.path.display()))
    }

    /// A non-negative integer metadata value that fits a usize.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .with_context(|| {
                format!(
                    "{}: {key} is {v:?}; expected a non-negative integer",
                    self.path.display()
                )
            })
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().with_context(|| {
            format!(
                "{}: {key} is a {}; expected a string",
                self.path.display(),
                v.type_name()
            )
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64().with_context(|| {
            format!(
                "{}: {key} is a {}; expected a number",
                self.path.display(),
                v.type_name()
            )
        })
    }

    /// An array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(items) => Ok(items),
            v => bail!(
                "{}: {key} is a {}; expected an array",
                self.path.display(),
                v.type_name()
            ),
        }
    }

    /// The value of `key` when present, converted by `get`.
    pub fn optional<'s, T>(
        &'s self,
        key: &str,
        get: impl FnOnce(&'s Self, &str) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.metadata.contains_key(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Little-endian reads from the file's bytes, each checked against the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!(
                "truncated: {what} needs {n} bytes at byte {}, and the file has {}",
                self.pos,
                self.bytes.len()
            );
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails when `count` items of at least `min_bytes` each cannot fit in the rest of the file
    /// (so that a corrupt count never allocates).
    fn check_count(&self, count: u64, min_bytes: u64, what: &str) -> Result<()> {
        let left = (self.bytes.len() - self.pos) as u64;
        if count.saturating_mul(min_bytes) > left {
            bail!(
                "truncated: {what} claims {count} entries at byte {}, more than the {left} bytes \
                 left hold",
                self.pos
            );
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        self.check_count(len, 1, what)?;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }

    /// A value of GGUF type `value_type` (`gguf_type`: 0 uint8 ... 12 float64).
    fn value(&mut self, value_type: u32, key: &str) -> Result<Value> {
        Ok(match value_type {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{key}: bool byte {b} is neither 0 nor 1"),
            },
            8 => Value::String(self.string(key)?),
            9 => {
                let item_type = self.u32(key)?;
                if item_type == 9 {
                    // Nested arrays exist in the spec; no llama key uses them.
                    bail!("{key}: arrays of arrays are not supported");
                }
                let len = self.u64(key)?;
                self.check_count(len, 1, key)?;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(item_type, key)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => bail!("{key}: unknown metadata value type {other}"),
        })
    }
}
