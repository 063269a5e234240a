//! Helpers of the bf16 attention tests (tests/attention_bf16.rs, tests/attention_bf16_bwd.rs): the
//! lock that serialises tests forcing the process-wide CPU path, uniform data, and the
//! per-element check that reports its largest error.
use clipforge::model::synthetic::Rng;
use clipforge::ops::gemm_bf16::Kernel;

/// The CPU path is global to the process and some tests force it: every test holds this lock.
static PATH: std::sync::Mutex<()> = std::sync::Mutex::new(());
pub fn path_lock() -> std::sync::MutexGuard<'static, ()> {
    PATH.lock().unwrap_or_else(|e| e.into_inner())
}

/// n values uniform in [−scale, scale).
pub fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut g = Rng::new(seed);
    (0..n).map(|_| (g.uniform() * 2.0 - 1.0) * scale).collect()
}

/// Checks |got − want| ≤ atol + rtol·|want| on every element (non-finite values fail); returns
/// the largest error.
pub fn assert_within(what: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        assert!(g.is_finite() && err <= atol + rtol * (w as f64).abs(), "{what}: element {i}: got {g}, reference {w}");
        worst = worst.max(err);
    }
    worst
}

/// Every bf16 GEMM kernel (each falls back inside where the CPU lacks it).
pub const KERNELS: [Kernel; 7] =
    [Kernel::Auto, Kernel::AmxSoft, Kernel::Amx, Kernel::Avx512Bf16, Kernel::Avx512Fma, Kernel::Portable, Kernel::PortableBaseline];
/// (batch, T, heads, head dim): T = 1, 7, 45, 50, 77, 129, 130, 248; head dims 1–65.
pub const SHAPES: [(usize, usize, usize, usize); 8] =
    [(1, 1, 1, 1), (2, 7, 3, 59), (1, 50, 2, 64), (3, 77, 5, 20), (1, 45, 1, 65), (2, 130, 2, 33), (1, 248, 2, 64), (1, 129, 1, 1)];
