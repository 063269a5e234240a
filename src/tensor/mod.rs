//! The tensor: shape, strides, offset and a reference-counted storage on a device.
//!
//! Views (reshape of contiguous data, transpose, narrow) share storage; ops read any layout and
//! write fresh contiguous f32 tensors (the compute type on the CPU). Weights may stay in their file
//! dtype (f16/bf16) or be memory-mapped straight from a safetensors file (no second copy).
pub mod dtype;
mod ops;
mod storage;

pub use dtype::{DType, Device};
pub use storage::Storage;

use crate::error::Result;
use crate::shape_err;
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.shape, self.dtype(), self.device())
    }
}

impl Tensor {
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if storage.len() != n {
            return Err(shape_err!("storage holds {} elements, shape {:?} needs {}", storage.len(), shape, n));
        }
        Ok(Tensor { storage: Arc::new(storage), shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 })
    }
    /// An f32 tensor owning `data` (row-major).
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(Storage::F32(data), shape)
    }
    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor { storage: Arc::new(Storage::F32(vec![0.0; n])), shape: shape.to_vec(), strides: contiguous_strides(shape), offset: 0 }
    }
    pub fn scalar(v: f32) -> Tensor {
        Tensor::zeros(&[]).map_f32(|_| v)
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn dim(&self, i: usize) -> usize {
        self.shape[i]
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }
    pub fn device(&self) -> Device {
        Device::Cpu
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn is_contiguous(&self) -> bool {
        self.strides == contiguous_strides(&self.shape)
    }

    /// The elements as an f32 slice: borrowed when contiguous f32 (owned or memory-mapped), converted otherwise.
    pub fn f32_data(&self) -> Cow<'_, [f32]> {
        if self.is_contiguous() {
            if let Some(s) = self.storage.as_f32() {
                return Cow::Borrowed(&s[self.offset..self.offset + self.numel()]);
            }
        }
        Cow::Owned(self.to_vec_f32())
    }

    /// The elements as a bf16 slice when contiguous owned bf16 (None otherwise).
    pub fn bf16_data(&self) -> Option<&[half::bf16]> {
        let s = self.storage.as_bf16().filter(|_| self.is_contiguous())?;
        s.get(self.offset..self.offset + self.numel())
    }

    /// Copies the elements out in row-major order as f32.
    pub fn to_vec_f32(&self) -> Vec<f32> {
        let n = self.numel();
        if self.is_contiguous() {
            return self.storage.to_f32_range(self.offset, n);
        }
        let mut out = Vec::with_capacity(n);
        let rank = self.rank();
        let mut idx = vec![0usize; rank];
        for _ in 0..n {
            let off = self.offset + idx.iter().zip(&self.strides).map(|(i, s)| i * s).sum::<usize>();
            out.push(self.storage.get_f32(off));
            for d in (0..rank).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }

    /// The elements as an owned f32 vector: the storage itself when this tensor is its only
    /// owner and covers all of it (no copy), a copy otherwise.
    pub fn into_f32_vec(self) -> Vec<f32> {
        if !(self.is_contiguous() && self.offset == 0 && self.storage.len() == self.numel()) {
            return self.to_vec_f32();
        }
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::F32(v)) => v,
            Ok(other) => other.to_f32_range(0, other.len()),
            Err(shared) => shared.to_f32_range(0, shared.len()),
        }
    }

    /// A contiguous f32 tensor with the same elements (shares storage when already so).
    pub fn contiguous(&self) -> Tensor {
        if self.is_contiguous() && self.dtype() == DType::F32 && self.offset == 0 && self.storage.len() == self.numel() {
            return self.clone();
        }
        Tensor::from_vec(self.to_vec_f32(), &self.shape).expect("numel matches")
    }

    /// Same elements, new shape (one dim may be usize::MAX to infer). Copies only if not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n = self.numel();
        let known: usize = shape.iter().filter(|&&d| d != usize::MAX).product();
        let mut shape = shape.to_vec();
        if let Some(p) = shape.iter().position(|&d| d == usize::MAX) {
            if known == 0 || !n.is_multiple_of(known) {
                return Err(shape_err!("cannot reshape {:?} into {:?}", self.shape, shape));
            }
            shape[p] = n / known;
        }
        if shape.iter().product::<usize>() != n {
            return Err(shape_err!("cannot reshape {:?} ({} elements) into {:?}", self.shape, n, shape));
        }
        let base = if self.is_contiguous() { self.clone() } else { self.contiguous() };
        Ok(Tensor { storage: base.storage, strides: contiguous_strides(&shape), shape, offset: base.offset })
    }

    /// Swaps two dims (a view).
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        if a >= self.rank() || b >= self.rank() {
            return Err(shape_err!("transpose({a},{b}) of rank-{} tensor", self.rank()));
        }
        let mut t = self.clone();
        t.shape.swap(a, b);
        t.strides.swap(a, b);
        Ok(t)
    }

    /// Elements `start..start+len` along `dim` (a view).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(shape_err!("narrow(dim {dim}, {start}..{}) of {:?}", start + len, self.shape));
        }
        let mut t = self.clone();
        t.offset += start * self.strides[dim];
        t.shape[dim] = len;
        Ok(t)
    }

    /// Index `i` along dim 0, dropping that dim (a view).
    pub fn get(&self, i: usize) -> Result<Tensor> {
        let t = self.narrow(0, i, 1)?;
        Ok(Tensor { shape: t.shape[1..].to_vec(), strides: t.strides[1..].to_vec(), ..t })
    }

    /// Concatenates along `dim`; all other dims must agree.
    pub fn cat(ts: &[&Tensor], dim: usize) -> Result<Tensor> {
        let first = ts.first().ok_or_else(|| shape_err!("cat of no tensors"))?;
        let rank = first.rank();
        if dim >= rank {
            return Err(shape_err!("cat along dim {dim} of rank-{rank} tensors"));
        }
        for t in ts {
            if t.rank() != rank || (0..rank).any(|d| d != dim && t.shape[d] != first.shape[d]) {
                return Err(shape_err!("cat along {dim}: {:?} vs {:?}", first.shape, t.shape));
            }
        }
        let outer: usize = first.shape[..dim].iter().product();
        let inner: usize = first.shape[dim + 1..].iter().product();
        let datas: Vec<Cow<[f32]>> = ts.iter().map(|t| t.f32_data()).collect();
        let total_d: usize = ts.iter().map(|t| t.shape[dim]).sum();
        let mut out = Vec::with_capacity(outer * total_d * inner);
        for o in 0..outer {
            for (t, d) in ts.iter().zip(&datas) {
                let w = t.shape[dim] * inner;
                out.extend_from_slice(&d[o * w..(o + 1) * w]);
            }
        }
        let mut shape = first.shape.clone();
        shape[dim] = total_d;
        Tensor::from_vec(out, &shape)
    }

    /// Applies `f` to every element (f32 result, contiguous).
    pub fn map_f32(&self, f: impl Fn(f32) -> f32) -> Tensor {
        let v: Vec<f32> = self.f32_data().iter().map(|&x| f(x)).collect();
        Tensor::from_vec(v, &self.shape).expect("same numel")
    }

    /// The same data converted to `dtype` storage (contiguous; rounded to nearest even, on all
    /// threads for big tensors: the CPU backend's bf16 q, k, v are converted here).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        use rayon::prelude::*;
        let v = self.f32_data();
        let storage = match dtype {
            DType::F32 => Storage::F32(v.into_owned()),
            DType::F16 => Storage::F16(v.par_iter().with_min_len(1 << 14).map(|&x| half::f16::from_f32(x)).collect()),
            DType::BF16 => Storage::BF16(v.par_iter().with_min_len(1 << 14).map(|&x| half::bf16::from_f32(x)).collect()),
        };
        Tensor::from_storage(storage, &self.shape).expect("same numel")
    }
}
