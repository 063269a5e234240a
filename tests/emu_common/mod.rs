//! Helpers for the kernel tests: deterministic random inputs, buffers with guard canaries,
//! bf16 conversions, per-element tolerance checks, and a driver that runs a case in every
//! emulator schedule and reports all failures at once.
#![allow(dead_code)]
#[allow(unused_imports)]
pub use clipforge::cuda::emu::{self, launch, set_schedule, LaunchArgs, Schedule, TEST_SCHEDULES};
use clipforge::{Error, Result};

pub const ROWS: [usize; 3] = [1, 7, 45];
pub const COLS: [usize; 5] = [1, 59, 65, 768, 1000];

/// The project's seeded generator (model::synthetic::Rng) with a range helper for kernel inputs.
pub struct Rng(clipforge::model::synthetic::Rng);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(clipforge::model::synthetic::Rng::new(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.0.uniform()
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

thread_local! {
    static HALF_IS_F16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Switches this test thread's 16-bit format from bf16 to IEEE f16 (or back): the `_f16` kernel
/// variants run through the same test cases as the `_bf16` ones, with [`bf16`], [`bf16_to_f32`],
/// [`round_bf16`] and [`half_suffix`] following the switch.
pub fn use_f16(on: bool) {
    HALF_IS_F16.with(|h| h.set(on));
}
/// "bf16" or "f16": the kernel-name suffix of the current 16-bit format.
pub fn half_suffix() -> &'static str {
    if HALF_IS_F16.with(|h| h.get()) {
        "f16"
    } else {
        "bf16"
    }
}
/// The 16-bit pattern of x (bf16, or f16 after [`use_f16`]), round to nearest even.
pub fn bf16(x: f32) -> u16 {
    if HALF_IS_F16.with(|h| h.get()) {
        return half::f16::from_f32(x).to_bits();
    }
    half::bf16::from_f32(x).to_bits()
}
pub fn bf16_to_f32(b: u16) -> f32 {
    if HALF_IS_F16.with(|h| h.get()) {
        return half::f16::from_bits(b).to_f32();
    }
    half::bf16::from_bits(b).to_f32()
}
/// One ulp of the current 16-bit format relative to a value in [1, 2): 2^-7 for bf16 (8
/// significant bits), 2^-10 for f16 (11 bits, after [`use_f16`]) — the final rounding plus a
/// possible flip from f32 arithmetic. f16 is checked to its own precision, 8× tighter than bf16.
pub fn half_rtol() -> f64 {
    if HALF_IS_F16.with(|h| h.get()) {
        1.0 / 1024.0
    } else {
        1.0 / 128.0
    }
}
/// Rounds through bf16 (what a bf16 tensor can hold).
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16_to_f32(bf16(x))).collect()
}

/// Element types of guarded buffers: a canary bit pattern and bitwise comparison.
pub trait Elem: Copy + std::fmt::Debug {
    const CANARY: Self;
    fn same_bits(self, other: Self) -> bool;
}
impl Elem for f32 {
    const CANARY: f32 = f32::from_bits(0x7fa5_a5a5); // a signalling NaN no kernel produces
    fn same_bits(self, o: f32) -> bool {
        self.to_bits() == o.to_bits()
    }
}
impl Elem for u16 {
    const CANARY: u16 = 0x7fa5; // a NaN pattern in bf16 and in f16
    fn same_bits(self, o: u16) -> bool {
        self == o
    }
}
impl Elem for u32 {
    const CANARY: u32 = 0xa5a5_a5a5;
    fn same_bits(self, o: u32) -> bool {
        self == o
    }
}
impl Elem for i32 {
    const CANARY: i32 = 0x5a5a_5a5a;
    fn same_bits(self, o: i32) -> bool {
        self == o
    }
}

pub const GUARD: usize = 64;

/// A device-buffer stand-in (emulated device memory, [`emu::DeviceMem`]): GUARD canary
/// elements before the data, canaries in the padding up to the next 16 bytes after it, and
/// then a guard page. Out-of-bounds writes into the canaries show up in [`Guarded::check`];
/// reads and writes beyond the padding fault on the guard page and fail the launch with a
/// message naming the access (underflowing reads of the front canaries read NaN patterns).
pub struct Guarded<T: Elem> {
    mem: emu::DeviceMem,
    n: usize,
    _t: std::marker::PhantomData<T>,
}
impl<T: Elem> Guarded<T> {
    pub fn from_slice(data: &[T]) -> Self {
        let sz = std::mem::size_of::<T>();
        let mem = emu::DeviceMem::with_front(GUARD * sz, std::mem::size_of_val(data)).expect("emulated device memory");
        let g = Guarded { mem, n: data.len(), _t: std::marker::PhantomData };
        // SAFETY: the span is mapped, 16-byte aligned and a whole number of T (2- or 4-byte plain values)
        let buf = unsafe { std::slice::from_raw_parts_mut(g.mem.base() as *mut T, g.mem.span() / sz) };
        buf.fill(T::CANARY);
        buf[GUARD..GUARD + data.len()].copy_from_slice(data);
        g
    }
    pub fn filled(n: usize, v: T) -> Self {
        Self::from_slice(&vec![v; n])
    }
    pub fn ptr(&mut self) -> *mut T {
        self.mem.ptr() as *mut T
    }
    pub fn cptr(&self) -> *const T {
        self.mem.ptr() as *const T
    }
    fn buf(&self) -> &[T] {
        // SAFETY: as in from_slice; every element was initialised there
        unsafe { std::slice::from_raw_parts(self.mem.base() as *const T, self.mem.span() / std::mem::size_of::<T>()) }
    }
    pub fn data(&self) -> &[T] {
        &self.buf()[GUARD..GUARD + self.n]
    }
    /// Err if a canary before or after the data was modified.
    pub fn check(&self, what: &str) -> Result<()> {
        for (i, v) in self.buf().iter().enumerate() {
            if (i < GUARD || i >= GUARD + self.n) && !v.same_bits(T::CANARY) {
                let off = i as isize - GUARD as isize;
                return Err(Error::msg(format!("{what}: out-of-bounds write at element {off} (buffer has {} elements): {v:?}", self.n)));
            }
        }
        Ok(())
    }
}

/// Per element: |got - want| <= atol + rtol * |want|; NaN/Inf anywhere fail.
pub fn check_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Result<()> {
    if got.len() != want.len() {
        return Err(Error::msg(format!("{what}: {} values, want {}", got.len(), want.len())));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = g as f64;
        if !g.is_finite() || !w.is_finite() {
            return Err(Error::msg(format!("{what}[{i}] = {g} (reference {w}): not finite")));
        }
        let tol = atol + rtol * w.abs();
        if (g - w).abs() > tol {
            return Err(Error::msg(format!("{what}[{i}] = {g:.9e}, reference {w:.9e}, |diff| {:.3e} > tol {tol:.3e}", (g - w).abs())));
        }
    }
    Ok(())
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn sched_name(s: Schedule) -> String {
    match s {
        Schedule::Forward => "fwd".into(),
        Schedule::Reverse => "rev".into(),
        Schedule::Random(seed) => format!("random({seed})"),
    }
}

/// Runs `case(rows, cols)` for every shape in every test schedule; panics listing all failures.
pub fn for_all_shapes(name: &str, mut case: impl FnMut(usize, usize) -> Result<()>) {
    let mut failures = Vec::new();
    let mut runs = 0;
    for &rows in &ROWS {
        for &cols in &COLS {
            for s in TEST_SCHEDULES {
                set_schedule(s);
                runs += 1;
                if let Err(e) = case(rows, cols) {
                    failures.push(format!("  rows={rows} cols={cols} schedule={}: {e}", sched_name(s)));
                }
            }
        }
    }
    set_schedule(Schedule::Forward);
    assert!(failures.is_empty(), "{name}: {} of {runs} runs failed:\n{}", failures.len(), failures.join("\n"));
}

pub const EPS: f32 = 1e-5;

/// (y, mean, rstd) in f64.
pub fn layernorm_ref(x: &[f64], rows: usize, cols: usize, g: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
    for r in 0..rows {
        let xr = &x[r * cols..(r + 1) * cols];
        let m = xr.iter().sum::<f64>() / cols as f64;
        let var = xr.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (var + EPS as f64).sqrt();
        for c in 0..cols {
            y[r * cols + c] = (xr[c] - m) * rs * g[c] as f64 + b[c] as f64;
        }
        (mean[r], rstd[r]) = (m, rs);
    }
    (y, mean, rstd)
}

pub fn ceil_div(a: usize, b: usize) -> u32 {
    a.div_ceil(b) as u32
}

/// Runs `run(case)` for every case in every test schedule; panics listing all failures.
pub fn for_all_cases<C: std::fmt::Debug>(name: &str, cases: &[C], mut run: impl FnMut(&C) -> Result<()>) {
    let mut failures = Vec::new();
    let mut runs = 0;
    for c in cases {
        for s in TEST_SCHEDULES {
            set_schedule(s);
            runs += 1;
            if let Err(e) = run(c) {
                failures.push(format!("  {c:?} schedule={}: {e}", sched_name(s)));
            }
        }
    }
    set_schedule(Schedule::Forward);
    assert!(failures.is_empty(), "{name}: {} of {runs} runs failed:\n{}", failures.len(), failures.join("\n"));
}

/// Max |a − b| over two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}
