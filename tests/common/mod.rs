//! Shared test helpers: seeded random data and the per-element closeness check
//! |x − ref| ≤ atol + rtol·|ref| (NaN/Inf fail; never a mean-error rule).
#![allow(dead_code)]
pub mod attn_bf16;
pub mod bf16_towers;
pub mod f64_ref;
pub mod half_ref;
pub mod oracle;
use clipforge::model::synthetic::Rng;
use clipforge::Tensor;

pub fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(randn(shape.iter().product(), seed), shape).unwrap()
}

/// Panics with the first mismatches (index, got, want) and the max error if any element fails.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut bad = vec![];
    let mut max_err = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let ok = g.is_finite() && w.is_finite() && err <= atol + rtol * w.abs();
        if !ok {
            bad.push((i, g, w));
        }
        if err.is_finite() {
            max_err = max_err.max(err);
        }
    }
    if !bad.is_empty() {
        let first: Vec<String> = bad.iter().take(5).map(|(i, g, w)| format!("[{i}] got {g} want {w}")).collect();
        panic!("{what}: {} of {} elements outside atol {atol} + rtol {rtol}; max err {max_err}; first: {}", bad.len(), got.len(), first.join(", "));
    }
}

pub fn assert_tensor_close(what: &str, got: &Tensor, want: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    assert_close(what, &got.to_vec_f32(), &want.to_vec_f32(), atol, rtol);
}

/// A path under tests/fixtures.
pub fn fixture(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A fresh, empty temporary directory named after the test and this process, removed (with what
/// the test wrote in it) when the returned guard is dropped.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("clipforge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

/// A scratch directory that is deleted on drop; derefs to its path.
pub struct TmpDir(pub std::path::PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TmpDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// |g − w| ≤ 1e-4·max(floor, max|want|) + 1e-3·|w| per element, NaN fails. `floor`: an absolute
/// scale below which differences are rounding noise (e.g. a gradient that is exactly zero in
/// theory, like an attention key bias's).
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f32], floor: f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(floor, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g - w).abs() <= 1e-4 * scale + 1e-3 * w.abs(), "{what}[{i}]: device {g}, CPU tape {w} (max|ref| {scale})");
    }
}
