//! Tape rules for broadcasting arithmetic, exp/activations, reductions and views.
//! Each forward runs the engine op; each backward is the textbook derivative, with broadcast
//! inputs getting the output gradient summed over the broadcast dims ([`reduce_to`]).
use super::tape::{Tape, Var};
use super::{f32_contiguous, t};
use crate::error::Result;
use crate::ops::elementwise::{unary_bwd, Binary, Unary};
use crate::tensor::Tensor;

/// Sums `g` over the dims along which a tensor of `shape` was broadcast to `g.shape()`.
pub fn reduce_to(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let gs = g.shape();
    let n: usize = shape.iter().product();
    let data = g.f32_data();
    // Fast case: `shape` is a suffix of g's shape (after leading 1s): sum over leading rows.
    let lead = shape.iter().take_while(|&&d| d == 1).count();
    let core = &shape[lead..];
    if gs.len() >= core.len() && &gs[gs.len() - core.len()..] == core {
        let mut out = vec![0f32; n];
        for row in data.chunks(n.max(1)) {
            out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
        }
        return Tensor::from_vec(out, shape);
    }
    // General case: map every element of g to its source element.
    let off = gs.len() - shape.len();
    let src_strides = crate::tensor::contiguous_strides(shape);
    let mut out = vec![0f32; n];
    let mut idx = vec![0usize; gs.len()];
    for &v in data.iter() {
        let mut o = 0;
        for d in off..gs.len() {
            if shape[d - off] != 1 {
                o += idx[d] * src_strides[d - off];
            }
        }
        out[o] += v;
        for d in (0..gs.len()).rev() {
            idx[d] += 1;
            if idx[d] < gs[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Tensor::from_vec(out, shape)
}

fn expand(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    Tensor::zeros(shape).add(g) // broadcast
}

impl Tape {
    fn binary(&self, op: Binary, a: &Var, b: &Var) -> Result<Var> {
        let y = a.value().binary(op, b.value())?;
        let (av, bv) = (a.value().clone(), b.value().clone());
        let (na, nb) = (a.requires_grad(), b.requires_grad());
        Ok(self.custom(&[a, b], y, move |g| {
            let (ga, gb) = match op {
                Binary::Add => (na.then(|| g.clone()), nb.then(|| g.clone())),
                Binary::Sub => (na.then(|| g.clone()), nb.then(|| g.scale(-1.0))),
                Binary::Mul => (na.then(|| g.mul(&bv)).transpose()?, nb.then(|| g.mul(&av)).transpose()?),
                Binary::Div => {
                    (na.then(|| g.div(&bv)).transpose()?, nb.then(|| -> Result<Tensor> { g.mul(&av)?.div(&bv.mul(&bv)?).map(|t| t.scale(-1.0)) }).transpose()?)
                }
                _ => return Err(crate::error::Error::msg("autograd: no rule for this binary op")),
            };
            Ok(vec![ga.map(|g| reduce_to(&g, av.shape())).transpose()?, gb.map(|g| reduce_to(&g, bv.shape())).transpose()?])
        }))
    }
    /// a + b with broadcasting.
    pub fn add(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(Binary::Add, a, b)
    }
    pub fn sub(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(Binary::Sub, a, b)
    }
    pub fn mul(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(Binary::Mul, a, b)
    }
    pub fn div(&self, a: &Var, b: &Var) -> Result<Var> {
        self.binary(Binary::Div, a, b)
    }
    /// a · s for a constant s.
    pub fn scale(&self, a: &Var, s: f32) -> Var {
        self.custom(&[a], a.value().scale(s), move |g| Ok(vec![Some(g.scale(s))]))
    }

    /// Elementwise activation or exp (Unary::QuickGelu, Gelu, Exp, ...).
    pub fn unary(&self, a: &Var, op: Unary) -> Var {
        let y = a.value().unary(op);
        let x = a.value().clone();
        self.custom(&[a], y, move |g| Ok(vec![Some(t(unary_bwd(op, &x.f32_data(), &g.f32_data()), x.shape())?)]))
    }
    pub fn exp(&self, a: &Var) -> Var {
        self.unary(a, Unary::Exp)
    }

    /// Sum over `dim` (kept as size 1 when `keepdim`).
    pub fn sum(&self, a: &Var, dim: usize, keepdim: bool) -> Result<Var> {
        let y = a.value().sum(dim, keepdim)?;
        let shape = a.shape().to_vec();
        Ok(self.custom(&[a], y, move |g| {
            let mut ks = shape.clone();
            ks[dim] = 1;
            Ok(vec![Some(expand(&g.reshape(&ks)?, &shape)?)])
        }))
    }
    pub fn mean(&self, a: &Var, dim: usize, keepdim: bool) -> Result<Var> {
        let n = a.shape()[dim] as f32;
        let s = self.sum(a, dim, keepdim)?;
        Ok(self.scale(&s, 1.0 / n))
    }
    /// The sum of all elements, shape `[1]`.
    pub fn sum_all(&self, a: &Var) -> Result<Var> {
        let flat = self.reshape(a, &[a.value().numel()])?;
        self.sum(&flat, 0, true)
    }

    pub fn reshape(&self, a: &Var, shape: &[usize]) -> Result<Var> {
        let y = a.value().reshape(shape)?;
        let s = a.shape().to_vec();
        Ok(self.custom(&[a], y, move |g| Ok(vec![Some(g.reshape(&s)?)])))
    }
    /// Swaps dims `d0` and `d1` (the result is contiguous).
    pub fn transpose(&self, a: &Var, d0: usize, d1: usize) -> Result<Var> {
        let y = a.value().transpose(d0, d1)?.contiguous();
        Ok(self.custom(&[a], y, move |g| Ok(vec![Some(g.transpose(d0, d1)?.contiguous())])))
    }
    /// `len` entries of `dim` from `start`.
    pub fn narrow(&self, a: &Var, dim: usize, start: usize, len: usize) -> Result<Var> {
        let y = a.value().narrow(dim, start, len)?.contiguous();
        let shape = a.shape().to_vec();
        Ok(self.custom(&[a], y, move |g| {
            let part = |n: usize| {
                let mut s = shape.clone();
                s[dim] = n;
                Tensor::zeros(&s)
            };
            let (before, after) = (part(start), part(shape[dim] - start - len));
            let mut list: Vec<&Tensor> = vec![];
            if start > 0 {
                list.push(&before);
            }
            list.push(g);
            if shape[dim] > start + len {
                list.push(&after);
            }
            Ok(vec![Some(Tensor::cat(&list, dim)?)])
        }))
    }
    /// Concatenation along `dim`.
    pub fn cat(&self, parts: &[&Var], dim: usize) -> Result<Var> {
        let values: Vec<&Tensor> = parts.iter().map(|v| v.value()).collect();
        let y = Tensor::cat(&values, dim)?;
        let lens: Vec<usize> = parts.iter().map(|v| v.shape()[dim]).collect();
        Ok(self.custom(parts, y, move |g| {
            let mut start = 0;
            lens.iter()
                .map(|&l| {
                    let r = g.narrow(dim, start, l).map(|t| Some(t.contiguous()));
                    start += l;
                    r
                })
                .collect()
        }))
    }
    /// Rows `index[i]` of a [R, W] matrix → [len, W] (EOT / class-token pooling).
    pub fn gather_rows(&self, a: &Var, index: &[usize]) -> Result<Var> {
        let (r, w) = (a.shape()[0], a.value().numel() / a.shape()[0].max(1));
        if a.value().rank() != 2 || index.iter().any(|&i| i >= r) {
            return Err(crate::shape_err!("gather_rows: indices {index:?} into {:?}", a.shape()));
        }
        let x = a.value().f32_data();
        let y: Vec<f32> = index.iter().flat_map(|&i| x[i * w..(i + 1) * w].iter().copied()).collect();
        let index = index.to_vec();
        Ok(self.custom(&[a], t(y, &[index.len(), w])?, move |g| {
            let mut d = vec![0f32; r * w];
            let gd = g.f32_data();
            for (k, &i) in index.iter().enumerate() {
                d[i * w..(i + 1) * w].iter_mut().zip(&gd[k * w..(k + 1) * w]).for_each(|(a, b)| *a += b);
            }
            Ok(vec![Some(t(d, &[r, w])?)])
        }))
    }
    /// A copy that is always contiguous f32 (for values built outside the tape).
    pub fn detach(&self, a: &Var) -> Var {
        self.constant(f32_contiguous(a.value()))
    }
}
