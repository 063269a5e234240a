//! CPU storage: owned vectors in f32/f16/bf16, or a window of a memory-mapped file (safetensors
//! weights are used in place; f32 windows are read as `&[f32]` without copying).
use super::DType;
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// `len` elements of `dtype` at byte `start` of a mapped file.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
        dtype: DType,
    },
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::Mapped { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::Mapped { dtype, .. } => *dtype,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, start, len, dtype } => &map[*start..*start + len * dtype.size()],
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::F16(v) => bytemuck::cast_slice(v),
            Storage::BF16(v) => bytemuck::cast_slice(v),
        }
    }
    /// A hint that a file-mapped window will not be read for a while (its values were copied,
    /// e.g. packed for a GEMM): its pages leave this process's resident memory, and are read back
    /// from the file (usually the page cache) if it is read again. Nothing for owned storage.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        if let Storage::Mapped { map, start, len, dtype } = self {
            // SAFETY: the map is a read-only shared mapping of the file: MADV_DONTNEED drops only
            // this process's pages of it, and a later read faults the file's same bytes back in
            // (the file not changing under the mapping is the premise of mapping it at all; see
            // `Weights::open`). The range (aligned down to a page by memmap2) is inside the map.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *start, len * dtype.size()) };
            // a hint: errors ignored
        }
    }
    /// The whole storage as f32 when it already is f32 (and, for a mapping, 4-byte aligned).
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Storage::F32(v) => Some(v),
            Storage::Mapped { dtype: DType::F32, .. } => bytemuck::try_cast_slice(self.bytes()).ok(),
            _ => None,
        }
    }
    /// The whole storage as bf16 when it is an owned bf16 vector (activations kept in 16 bits).
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match self {
            Storage::BF16(v) => Some(v),
            _ => None,
        }
    }
    pub fn get_f32(&self, i: usize) -> f32 {
        match self {
            Storage::F32(v) => v[i],
            Storage::F16(v) => v[i].to_f32(),
            Storage::BF16(v) => v[i].to_f32(),
            Storage::Mapped { dtype, .. } => {
                let s = dtype.size();
                let b = &self.bytes()[i * s..(i + 1) * s];
                match dtype {
                    DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                }
            }
        }
    }
    /// Elements `start..start+n` converted to f32.
    pub fn to_f32_range(&self, start: usize, n: usize) -> Vec<f32> {
        match self {
            Storage::F32(v) => v[start..start + n].to_vec(),
            Storage::F16(v) => v[start..start + n].iter().map(|x| x.to_f32()).collect(),
            Storage::BF16(v) => v[start..start + n].iter().map(|x| x.to_f32()).collect(),
            Storage::Mapped { dtype, .. } => {
                let s = dtype.size();
                let mut out = Vec::with_capacity(n);
                super::dtype::bytes_to_f32(&self.bytes()[start * s..(start + n) * s], *dtype, &mut out);
                out
            }
        }
    }
}
