//! The bf16 CPU towers against the bf16-rounding reference (`half_ref`), f32, and issue 14's
//! accuracy criterion: shared by tests/bf16_model.rs and tests/attention_bf16.rs.
use super::half_ref::{assert_half_close_within, assert_not_f32, scaled_err, HalfRef};
use clipforge::model::schema::{Schema, Tower};
use clipforge::model::tower::{Mode, TowerParams};
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers, Weights};
use clipforge::{DType, Tensor};

/// `units`: the per-element bound in units of u·max|ref| + u·|ref| (1 for the 2-layer
/// fixtures, 2 for the 12-layer ViT-B/32: see `assert_half_close_within`).
///
/// Where the bf16 GEMM runs on AVX512-FP16 (Intel without AMX: f16 partial sums of 128 products,
/// `gemm_bf16_fp16.rs`), its ≈ 10⁻³ relative sum error moves more values across bf16 rounding
/// boundaries than f32 sums do, and the bound is 2.5 times as wide (measured 1.89u on the tiny
/// fixture's texts, whose f32 embeddings are themselves 1.47u away); the cosine criterion is
/// unchanged. CI runs this test once more with `CLIPFORGE_CPU_GEMM=avx512` (f32 sums, `units`).
pub fn check(w: &Weights, cfg: &ClipConfig, b: usize, what: &str, units: f64) {
    use clipforge::ops::gemm_bf16::{resolve, Kernel};
    let units = if resolve(Kernel::Auto) == Kernel::Avx512Fp16 { 2.5 * units } else { units };
    let f32m = ClipParts::load(w, cfg, Towers::Both, &LoadOptions { dtype: DType::F32 }).unwrap();
    let bf = ClipParts::load(w, cfg, Towers::Both, &LoadOptions { dtype: DType::BF16 }).unwrap();
    let schema = Schema::clip(cfg);
    let (rv, rt) = (
        TowerParams::load(&HalfRef::CPU, &schema, Tower::Vision, w, DType::BF16).unwrap(),
        TowerParams::load(&HalfRef::CPU, &schema, Tower::Text, w, DType::BF16).unwrap(),
    );
    let s = cfg.vision.image_size;
    let px = super::rand_tensor(&[b, 3, s, s], 3);
    let (a, c) = (f32m.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap(), bf.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap());
    let r = rv.vision(&HalfRef::CPU, &cfg.vision, px.contiguous(), b, Mode::Infer, &mut None).unwrap().0;
    compare(&format!("{what} images"), &c, &a, &r, units);
    let ids: Vec<Vec<u32>> =
        (0..b).map(|i| (0..20 + 5 * i as u32).map(|j| if j == 0 { 49406 } else { 400 + 37 * j + i as u32 }).chain([49407]).collect()).collect();
    let (a, c) = (f32m.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap(), bf.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap());
    let r = rt.text(&HalfRef::CPU, &cfg.text, &ids, None, Mode::Infer, &mut None).unwrap().0;
    compare(&format!("{what} texts"), &c, &a, &r, units);
}

/// bf16 against the rounding reference per element, and measurably not f32.
fn compare(what: &str, bf16: &Tensor, f32: &Tensor, reference: &Tensor, units: f64) {
    let (h, f, r) = (bf16.to_vec_f32(), f32.to_vec_f32(), reference.to_vec_f32());
    eprintln!("{what}: max|err|/max|ref| to the bf16-rounding reference: bf16 {:.3}u, f32 {:.3}u", scaled_err(&h, &r) * 256.0, scaled_err(&f, &r) * 256.0);
    assert_half_close_within(&format!("{what}: CPU bf16 towers"), &h, &r, DType::BF16, units);
    assert_not_f32(what, &h, &f, &r, DType::BF16);
    assert_cosine(what, &h, &f, *bf16.shape().last().unwrap());
}

/// Issue 14's accuracy criterion: every bf16 embedding (row of width `d`) has cosine ≥ 0.999 to
/// its f32 embedding.
fn assert_cosine(what: &str, bf16: &[f32], f32: &[f32], d: usize) {
    assert_eq!(bf16.len() % d, 0, "{what}: rows of {d}");
    for (i, (h, f)) in bf16.chunks_exact(d).zip(f32.chunks_exact(d)).enumerate() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
        let cos = dot(h, f) / (dot(h, h).sqrt() * dot(f, f).sqrt());
        eprintln!("{what}: embedding {i}: cosine bf16 to f32 {cos:.6}");
        assert!(cos >= 0.999, "{what}: embedding {i}: cosine bf16 to f32 {cos} < 0.999");
    }
}
