//! Elementwise ops: unary activations and binary arithmetic with numpy broadcasting.
//! Reference: index arithmetic per output element. Fast: same-shape and trailing-broadcast
//! (bias-like) cases as flat vectorised loops, in parallel; the general case strided.
use super::act_simd::{act_grad_into, act_into};
use super::fastmath::{self, par_rows};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    QuickGelu,
    Gelu,
    Exp,
    Neg,
    Sqrt,
    Recip,
}

impl Unary {
    /// The precise scalar formula (libm), used by the reference.
    pub fn eval_ref(self, x: f32) -> f32 {
        let x = x as f64;
        (match self {
            Unary::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Unary::Gelu => 0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2)),
            Unary::Exp => x.exp(),
            Unary::Neg => -x,
            Unary::Sqrt => x.sqrt(),
            Unary::Recip => 1.0 / x,
        }) as f32
    }
    #[inline(always)]
    pub(crate) fn eval_fast(self, x: f32) -> f32 {
        match self {
            Unary::QuickGelu => fastmath::quick_gelu(x),
            Unary::Gelu => fastmath::gelu(x),
            Unary::Exp => fastmath::exp(x),
            Unary::Neg => -x,
            Unary::Sqrt => x.sqrt(),
            Unary::Recip => 1.0 / x,
        }
    }
    /// op′(x) with the fast scalar functions (the backward's formula; `act_simd` has the 16-lane
    /// QuickGELU and GELU forms with these bits).
    #[inline(always)]
    pub(crate) fn deriv_fast(self, v: f32) -> f32 {
        match self {
            Unary::QuickGelu => {
                let s = fastmath::sigmoid(1.702 * v);
                s * (1.0 + 1.702 * v * (1.0 - s))
            }
            Unary::Gelu => 0.5 * (1.0 + fastmath::erf(v * std::f32::consts::FRAC_1_SQRT_2)) + v * fastmath::exp(-0.5 * v * v) * 0.398_942_3,
            Unary::Exp => fastmath::exp(v),
            Unary::Neg => -1.0,
            Unary::Sqrt => 0.5 / v.sqrt(),
            Unary::Recip => -1.0 / (v * v),
        }
    }
}

/// erf in f64 (Abramowitz–Stegun 7.1.28 is too coarse; use the series/continued-fraction split).
pub fn erf64(x: f64) -> f64 {
    let z = x.abs();
    let r = if z < 2.5 {
        // Maclaurin series: converges fast for |x| < 2.5.
        let (mut term, mut sum, mut n) = (z, z, 0.0f64);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -z * z / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc.
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (z + f);
        }
        1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * (z + f))
    };
    r.copysign(x)
}

/// d op(x)/dx in f64 (the reference of [`unary_bwd`]): QuickGELU σ(1.702x)(1 + 1.702x(1 − σ)),
/// GELU Φ(x) + xφ(x), exp eˣ, neg −1, sqrt 1/(2√x), recip −1/x².
pub fn unary_deriv_ref(op: Unary, x: f64) -> f64 {
    match op {
        Unary::QuickGelu => {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            s * (1.0 + 1.702 * x * (1.0 - s))
        }
        Unary::Gelu => 0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2)) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt(),
        Unary::Exp => x.exp(),
        Unary::Neg => -1.0,
        Unary::Sqrt => 0.5 / x.sqrt(),
        Unary::Recip => -1.0 / (x * x),
    }
}

/// dx = dy ⊙ op′(x), f64 reference.
pub fn unary_bwd_reference(op: Unary, x: &[f32], dy: &[f32]) -> Vec<f64> {
    x.iter().zip(dy).map(|(&v, &d)| d as f64 * unary_deriv_ref(op, v as f64)).collect()
}

/// dx = dy ⊙ op′(x) (fast, in parallel, each output value written once): QuickGELU and GELU
/// through `act_simd::act_grad_into` (16 lanes with AVX-512F, the scalar bits), the other ops
/// through a scalar loop of their own (the op a constant in each, so the compiler vectorises it).
pub fn unary_bwd(op: Unary, x: &[f32], dy: &[f32]) -> Vec<f32> {
    fn run(x: &[f32], dy: &[f32], f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync + Send) -> Vec<f32> {
        const CHUNK: usize = 4096;
        let n = x.len().min(dy.len());
        let fill = |out: &mut [f32]| {
            par_rows(out, CHUNK.min(n.max(1)), |i, o| {
                let base = i * CHUNK.min(n.max(1));
                f(&x[base..base + o.len()], &dy[base..base + o.len()], o);
            })
        };
        // SAFETY: par_rows hands every row of the n values to `f`, which writes each of them
        // (o, xs and ds have one length) and reads none.
        unsafe { fastmath::written(n, fill) }
    }
    fn each(xs: &[f32], ds: &[f32], o: &mut [f32], f: impl Fn(f32) -> f32) {
        for ((o, &v), &d) in o.iter_mut().zip(xs).zip(ds) {
            *o = d * f(v);
        }
    }
    match op {
        Unary::QuickGelu | Unary::Gelu => run(x, dy, |xs, ds, o| act_grad_into(op, xs, ds, o)),
        Unary::Exp => run(x, dy, |xs, ds, o| each(xs, ds, o, |v| Unary::Exp.deriv_fast(v))),
        Unary::Neg => run(x, dy, |xs, ds, o| each(xs, ds, o, |v| Unary::Neg.deriv_fast(v))),
        Unary::Sqrt => run(x, dy, |xs, ds, o| each(xs, ds, o, |v| Unary::Sqrt.deriv_fast(v))),
        Unary::Recip => run(x, dy, |xs, ds, o| each(xs, ds, o, |v| Unary::Recip.deriv_fast(v))),
    }
}

pub fn unary_reference(op: Unary, x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| op.eval_ref(v)).collect()
}

pub fn unary(op: Unary, x: &[f32]) -> Vec<f32> {
    let mut out = super::fastmath::zeros(x.len());
    let chunk = 4096.min(x.len().max(1));
    par_rows(&mut out, chunk, |i, o| act_into(op, &x[i * chunk..], o)); // activations 16 lanes at a time, the same bits
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
}

impl Binary {
    #[inline(always)]
    pub fn eval(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Max => a.max(b),
            Binary::Min => a.min(b),
        }
    }
}

/// Numpy broadcast of two shapes; None if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
        let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Strides of `shape` (with `strides`) seen through broadcasting to `out` (0 on broadcast dims).
pub fn broadcast_strides(shape: &[usize], strides: &[usize], out: &[usize]) -> Vec<usize> {
    let pad = out.len() - shape.len();
    (0..out.len()).map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { strides[i - pad] }).collect()
}

/// A strided operand: data, offset, strides already broadcast to the output shape.
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub strides: Vec<usize>,
}

pub fn binary_reference(op: Binary, a: &Operand, b: &Operand, out_shape: &[usize]) -> Vec<f32> {
    let n: usize = out_shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..n {
        let oa = a.offset + idx.iter().zip(&a.strides).map(|(i, s)| i * s).sum::<usize>();
        let ob = b.offset + idx.iter().zip(&b.strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(op.eval(a.data[oa], b.data[ob]));
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

pub fn binary(op: Binary, a: &Operand, b: &Operand, out_shape: &[usize]) -> Vec<f32> {
    let n: usize = out_shape.iter().product();
    let rank = out_shape.len();
    if rank == 0 || n == 0 {
        return binary_reference(op, a, b, out_shape);
    }
    let inner = out_shape[rank - 1];
    let mut out = super::fastmath::zeros(n);
    // Row `r` of the output is indexed by the outer dims; each operand's inner stride is 0 or 1 in
    // the fast cases, anything in the general one.
    let outer_shape = &out_shape[..rank - 1];
    let row_offset = |o: &Operand, mut r: usize| -> usize {
        let mut off = o.offset;
        for d in (0..outer_shape.len()).rev() {
            off += (r % outer_shape[d]) * o.strides[d];
            r /= outer_shape[d];
        }
        off
    };
    let (sa, sb) = (a.strides[rank - 1], b.strides[rank - 1]);
    par_rows(&mut out, inner, |r, row| {
        let (oa, ob) = (row_offset(a, r), row_offset(b, r));
        match (sa, sb) {
            (1, 1) => {
                let (xa, xb) = (&a.data[oa..oa + inner], &b.data[ob..ob + inner]);
                for ((o, x), y) in row.iter_mut().zip(xa).zip(xb) {
                    *o = op.eval(*x, *y);
                }
            }
            (1, 0) => {
                let (xa, y) = (&a.data[oa..oa + inner], b.data[ob]);
                for (o, x) in row.iter_mut().zip(xa) {
                    *o = op.eval(*x, y);
                }
            }
            (0, 1) => {
                let (x, xb) = (a.data[oa], &b.data[ob..ob + inner]);
                for (o, y) in row.iter_mut().zip(xb) {
                    *o = op.eval(x, *y);
                }
            }
            _ => {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = op.eval(a.data[oa + j * sa], b.data[ob + j * sb]);
                }
            }
        }
    });
    out
}
