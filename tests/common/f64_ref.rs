//! A float64 forward-only backend of `backend::Ops`, written here from the definitions (naive
//! loops, no engine kernel): the one tower code of src/model/ runs on it unchanged, so a whole
//! CLIP forward can be evaluated in f64 for finite differences of the towers' hand-written
//! backward (tests/train_model.rs, tests/smartclip.rs). Backward methods are errors.
use clipforge::backend::{Act, Ops, Seqs, Weight};
use clipforge::{DType, Error, Result, Tensor};

/// The f64 reference (buffers are `Vec<f64>`).
#[derive(Clone, Copy, Debug, Default)]
pub struct F64Ref;

fn fwd_only<T>() -> Result<T> {
    Err(Error::msg("F64Ref is forward only"))
}

fn act(a: Act, x: f64) -> f64 {
    match a {
        Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Act::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
    }
}

/// Multi-head softmax attention of rows `r0..r0 + t` (one sequence) of q, k, v [N, W] into o.
#[allow(clippy::too_many_arguments)]
fn attend(q: &[f64], k: &[f64], v: &[f64], o: &mut [f64], r0: usize, t: usize, heads: usize, w: usize, causal: bool) {
    let d = w / heads;
    let scale = 1.0 / (d as f64).sqrt();
    for h in 0..heads {
        for i in 0..t {
            let qi = &q[(r0 + i) * w + h * d..][..d];
            let last = if causal { i + 1 } else { t };
            let s: Vec<f64> = (0..last).map(|j| qi.iter().zip(&k[(r0 + j) * w + h * d..][..d]).map(|(a, b)| a * b).sum::<f64>() * scale).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..d {
                o[(r0 + i) * w + h * d + c] = (0..last).map(|j| e[j] * v[(r0 + j) * w + h * d + c]).sum::<f64>() / z;
            }
        }
    }
}

impl Ops for F64Ref {
    type Buf = Vec<f64>;
    type Half = ();

    fn describe(&self) -> String {
        "f64 reference".into()
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f64>> {
        Ok(data.iter().map(|&v| v as f64).collect())
    }
    fn download(&self, b: &Vec<f64>) -> Result<Vec<f32>> {
        Ok(b.iter().map(|&v| v as f32).collect())
    }
    fn zeros(&self, n: usize) -> Result<Vec<f64>> {
        Ok(vec![0.0; n])
    }
    fn upload_tensor(&self, t: &Tensor) -> Result<Vec<f64>> {
        self.upload(&t.to_vec_f32())
    }
    fn weight(&self, w: Vec<f64>, n: usize, k: usize, dtype: DType) -> Result<Weight<F64Ref>> {
        if dtype != DType::F32 {
            return Err(Error::msg("F64Ref computes in f64 only"));
        }
        Ok(Weight { w, half: None, n, k })
    }
    fn linear(&self, x: &Vec<f64>, w: &Weight<F64Ref>, bias: Option<&Vec<f64>>, m: usize) -> Result<Vec<f64>> {
        let (n, k) = (w.n, w.k);
        Ok((0..m * n)
            .map(|i| x[i / n * k..][..k].iter().zip(&w.w[i % n * k..][..k]).map(|(a, b)| a * b).sum::<f64>() + bias.map_or(0.0, |b| b[i % n]))
            .collect()) // [m, n]
    }
    fn linear_bwd(&self, _: &Vec<f64>, _: &Vec<f64>, _: &Weight<F64Ref>, _: usize, _: &mut Vec<f64>, _: bool, _: bool) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
        fwd_only()
    }
    fn layernorm(&self, x: &Vec<f64>, g: &Vec<f64>, b: &Vec<f64>, rows: usize, w: usize, eps: f32) -> Result<(Vec<f64>, Vec<f64>)> {
        let mut y = vec![0.0; rows * w]; // [rows, w]
        for r in 0..rows {
            let xr = &x[r * w..][..w];
            let mean = xr.iter().sum::<f64>() / w as f64;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / w as f64;
            let rstd = 1.0 / (var + eps as f64).sqrt();
            for c in 0..w {
                y[r * w + c] = (xr[c] - mean) * rstd * g[c] + b[c];
            }
        }
        Ok((y, vec![]))
    }
    fn add_layernorm(&self, x: &mut Vec<f64>, f: &Vec<f64>, g: &Vec<f64>, b: &Vec<f64>, rows: usize, w: usize, eps: f32) -> Result<(Vec<f64>, Vec<f64>)> {
        self.axpy(x, f, 1.0, rows * w)?;
        self.layernorm(x, g, b, rows, w, eps)
    }
    fn layernorm_bwd(&self, _: &Vec<f64>, _: &Vec<f64>, _: &Vec<f64>, _: &Vec<f64>, _: usize, _: usize, _: f32) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        fwd_only()
    }
    fn bias_act(&self, u: Vec<f64>, bias: &Vec<f64>, rows: usize, n: usize, a: Act, keep_pre: bool) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
        let pre: Vec<f64> = (0..rows * n).map(|i| u[i] + bias[i % n]).collect();
        Ok((pre.iter().map(|&x| act(a, x)).collect(), keep_pre.then_some(pre)))
    }
    fn bias_act_bwd(&self, _: &Vec<f64>, _: &Vec<f64>, _: usize, _: usize, _: Act) -> Result<(Vec<f64>, Vec<f64>)> {
        fwd_only()
    }
    fn attention(&self, q: &Vec<f64>, k: &Vec<f64>, v: &Vec<f64>, seqs: &Seqs, heads: usize, w: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let mut o = vec![0.0; seqs.rows() * w]; // [N, W]
        match seqs {
            Seqs::Batch { batch, seq, causal } => (0..*batch).for_each(|b| attend(q, k, v, &mut o, b * seq, *seq, heads, w, *causal)),
            Seqs::Packed(lens) => {
                let mut r0 = 0;
                for &l in lens {
                    attend(q, k, v, &mut o, r0, l, heads, w, true);
                    r0 += l;
                }
            }
        }
        Ok((o, vec![]))
    }
    fn attention_bwd(
        &self,
        _: &Vec<f64>,
        _: &Vec<f64>,
        _: &Vec<f64>,
        _: &Vec<f64>,
        _: &Vec<f64>,
        _: &Vec<f64>,
        _: &Seqs,
        _: usize,
        _: usize,
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        fwd_only()
    }
    fn copy(&self, x: &Vec<f64>, n: usize) -> Result<Vec<f64>> {
        Ok(x[..n].to_vec())
    }
    fn patch_embed(&self, px: &Vec<f64>, w: &Weight<F64Ref>, b: usize, c: usize, s: usize, p: usize) -> Result<Vec<f64>> {
        let (g, d) = (s / p, w.n);
        let n = g * g;
        let mut out = vec![0.0; b * n * d]; // [B·N, D]
        for (i, o) in out.iter_mut().enumerate() {
            let (bi, patch, od) = (i / (n * d), i / d % n, i % d);
            for ci in 0..c {
                for ky in 0..p {
                    for kx in 0..p {
                        *o += px[((bi * c + ci) * s + patch / g * p + ky) * s + patch % g * p + kx] * w.w[od * c * p * p + (ci * p + ky) * p + kx];
                    }
                }
            }
        }
        Ok(out)
    }
    fn vision_embed(&self, patches: &Vec<f64>, cls: &Vec<f64>, pos: &Vec<f64>, b: usize, n: usize, w: usize) -> Result<Vec<f64>> {
        let t = n + 1;
        Ok((0..b * t * w)
            .map(|i| {
                let (row, col) = (i / w, i % w);
                let (bi, ti) = (row / t, row % t);
                (if ti == 0 { cls[col] } else { patches[(bi * n + ti - 1) * w + col] }) + pos[ti * w + col]
            })
            .collect()) // [B·T, W]
    }
    fn patch_embed_bwd(&self, _: &Vec<f64>, _: &Vec<f64>, _: usize, _: usize, _: usize, _: usize, _: usize) -> Result<Vec<f64>> {
        fwd_only()
    }
    fn vision_embed_bwd(&self, _: &Vec<f64>, _: usize, _: usize, _: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        fwd_only()
    }
    fn embedding_bwd(&self, _: &Vec<f64>, _: &[usize], _: &mut Vec<f64>, _: usize) -> Result<()> {
        fwd_only()
    }
    fn axpy(&self, y: &mut Vec<f64>, x: &Vec<f64>, alpha: f32, n: usize) -> Result<()> {
        y[..n].iter_mut().zip(&x[..n]).for_each(|(a, b)| *a += alpha as f64 * b);
        Ok(())
    }
    fn gather_rows(&self, x: &Vec<f64>, rows: &[usize], w: usize) -> Result<Vec<f64>> {
        Ok(rows.iter().flat_map(|&r| x[r * w..(r + 1) * w].iter().copied()).collect())
    }
    fn scatter_rows(&self, _: &Vec<f64>, _: &[usize], _: usize, _: usize) -> Result<Vec<f64>> {
        fwd_only()
    }
}

/// The two towers of a training model on [`F64Ref`], with parameter `i` (the model's index)
/// element `e` moved by `d` in f64 when `moved` says so (a parameter of neither tower, such as
/// the logit scale or the mask network, moves nothing here).
pub fn towers_f64(model: &clipforge::train::model::TrainClip, moved: Option<(usize, usize, f64)>) -> [clipforge::model::tower::TowerParams<F64Ref>; 2] {
    use clipforge::model::block::Stored;
    use clipforge::model::tower::TowerParams;
    let value = |q: &clipforge::model::schema::Param| {
        model.index(&q.name).map(|i| model.params[i].1.clone()).ok_or_else(|| Error::msg(format!("no parameter {}", q.name)))
    };
    [clipforge::model::schema::Tower::Vision, clipforge::model::schema::Tower::Text].map(|t| {
        let mut p = TowerParams::load_with(&F64Ref, &model.schema, t, DType::F32, value).unwrap();
        if let Some((i, e, d)) = moved {
            if let Ok(l) = p.local(&model.params[i].0) {
                match p.stored_mut(l) {
                    Stored::Buf(b) => b[e] += d,
                    Stored::Linear(w) => w.w[e] += d,
                }
            }
        }
        p
    })
}
