//! kernels/attention.cu on the CPU emulator against the CPU references of src/ops/attention.rs:
//! forward (o and lse) vs `attention_reference`, backward (dq, dk, dv) vs
//! `attention_backward_reference` fed the same o and lse; f32 and bf16 (inputs pre-rounded to
//! bf16, reference on the rounded values); launched through `clipforge::cuda::attention`.
//! Small shapes run in every schedule, the large ones (T >= 197) in the forward schedule only.
//! Per element |got - ref| <= atol + rtol·|ref|, NaN/Inf fail, guard canaries on every buffer,
//! inputs must come back bit-identical, and the backward must be bit-identical across schedules
//! (it has no atomics: every output element is written by one block).
mod emu_common;
use clipforge::cuda::attention::{attention_bwd_launch, attention_fwd_launch, KernelLaunch, HEAD_DIM_MAX};
use clipforge::ops::attention::{attention_backward_reference, attention_reference, AttnShape};
use clipforge::{DType, Error, Result};
use emu_common::*;

const BF16_RTOL: f64 = 1.0 / 128.0; // one bf16 ulp: the final rounding plus f32 differences
const F16_RTOL: f64 = 1.0 / 1024.0; // one f16 ulp: f16 is checked to its own precision, 8× tighter

/// A tensor element type of the kernels, with its f32 conversions.
trait DevElem: Elem {
    const DTYPE: DType;
    const POISON: Self; // a NaN: what an output element the kernel forgot to write holds
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl DevElem for f32 {
    const DTYPE: DType = DType::F32;
    const POISON: f32 = f32::NAN;
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl DevElem for u16 {
    const DTYPE: DType = DType::BF16;
    const POISON: u16 = 0x7fc0;
    fn from_f32(x: f32) -> u16 {
        bf16(x)
    }
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }
}

/// f16 elements: the same 16-bit buffers, IEEE half precision.
#[derive(Clone, Copy, Debug, PartialEq)]
struct H16(u16);
impl Elem for H16 {
    const CANARY: H16 = H16(0x7fa5); // an f16 NaN
    fn same_bits(self, o: H16) -> bool {
        self.0 == o.0
    }
}
impl DevElem for H16 {
    const DTYPE: DType = DType::F16;
    const POISON: H16 = H16(0x7e00);
    fn from_f32(x: f32) -> H16 {
        H16(half::f16::from_f32(x).to_bits())
    }
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    causal: bool,
    /// scale 1 instead of 1/sqrt(hd) and wider inputs: near one-hot rows, scores of ±50
    sharp: bool,
}
const fn case(b: usize, t: usize, h: usize, d: usize, causal: bool) -> Case {
    Case { b, t, h, d, causal, sharp: false }
}

/// Every schedule.
const SMALL: &[Case] = &[
    case(1, 1, 1, 32, false),
    case(1, 1, 1, 32, true),
    case(2, 7, 3, 59, false),
    case(2, 7, 3, 59, true),
    case(1, 5, 2, 1, false),
    case(2, 9, 3, 8, true),
    case(1, 33, 2, 3, false),
    case(1, 70, 2, 20, true), // two query tiles, three key tiles, the diagonal inside a tile
    case(1, 50, 12, 64, false),
    case(1, 77, 8, 64, true),
    Case { b: 1, t: 40, h: 2, d: 64, causal: false, sharp: true },
    Case { b: 1, t: 45, h: 1, d: 17, causal: true, sharp: true },
];
/// Forward schedule only (emulator time).
const LARGE: &[Case] = &[case(1, 197, 2, 80, false), case(1, 257, 1, 128, false), case(1, 577, 1, 64, false), case(1, 200, 1, 96, true)];

impl Case {
    fn shape(&self) -> AttnShape {
        let scale = if self.sharp { 1.0 } else { 1.0 / (self.d as f32).sqrt() };
        AttnShape { batch: self.b, seq: self.t, heads: self.h, head_dim: self.d, causal: self.causal, scale }
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}
/// Uniform inputs, already representable in E.
fn inputs<E: DevElem>(c: &Case) -> Inputs {
    let n = c.shape().numel();
    let mut rng = Rng::new((c.b * 1_000_003 + c.t * 1009 + c.h * 101 + c.d) as u64 + c.causal as u64);
    let a = if c.sharp { 3.0 } else { 2.0 };
    let mut gen = |lo: f32, hi: f32| rng.vec(n, lo, hi).into_iter().map(|x| E::from_f32(x).to_f32()).collect::<Vec<f32>>();
    Inputs { q: gen(-a, a), k: gen(-a, a), v: gen(-1.0, 1.0), dout: gen(-1.0, 1.0) }
}

fn to_dev<E: DevElem>(v: &[f32]) -> Vec<E> {
    v.iter().map(|&x| E::from_f32(x)).collect()
}
fn from_dev<E: DevElem>(v: &[E]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}
/// Guard canaries intact and (for inputs) the data unchanged.
fn check_input<E: DevElem>(g: &Guarded<E>, want: &[E], what: &str) -> Result<()> {
    g.check(what)?;
    match g.data().iter().zip(want).position(|(a, b)| !a.same_bits(*b)) {
        Some(i) => Err(Error::msg(format!("{what}[{i}] was modified by the kernel"))),
        None => Ok(()),
    }
}

fn launch_cfg(cfg: &KernelLaunch, args: &mut LaunchArgs) -> Result<()> {
    launch(&cfg.kernel, cfg.grid, cfg.block, cfg.smem_bytes, args.as_params())
}

/// Runs the forward kernel; returns (o, lse) (lse None when the kernel got a NULL lse).
fn run_fwd<E: DevElem>(s: &AttnShape, inp: &Inputs, with_lse: bool) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let cfg = attention_fwd_launch(s, E::DTYPE)?;
    let (hq, hk, hv) = (to_dev::<E>(&inp.q), to_dev::<E>(&inp.k), to_dev::<E>(&inp.v));
    let (gq, gk, gv) = (Guarded::from_slice(&hq), Guarded::from_slice(&hk), Guarded::from_slice(&hv));
    let mut go = Guarded::filled(s.numel(), E::POISON);
    let mut glse = Guarded::filled(s.batch * s.heads * s.seq, f32::NAN);
    let (pq, pk, pv, po) = (gq.cptr(), gk.cptr(), gv.cptr(), go.ptr());
    let plse: *mut f32 = if with_lse { glse.ptr() } else { std::ptr::null_mut() };
    let (b, t, h, d, causal) = (s.batch as i32, s.seq as i32, s.heads as i32, s.head_dim as i32, s.causal as i32);
    let mut a = LaunchArgs::new().arg(&pq).arg(&pk).arg(&pv).arg(&po).arg(&plse).arg(&b).arg(&t).arg(&h).arg(&d).arg(&causal).arg(&s.scale);
    launch_cfg(&cfg, &mut a)?;
    check_input(&gq, &hq, "q")?;
    check_input(&gk, &hk, "k")?;
    check_input(&gv, &hv, "v")?;
    go.check("o")?;
    glse.check("lse")?;
    if !with_lse && glse.data().iter().any(|x| !x.is_nan()) {
        return Err(Error::msg("lse was written although the kernel got NULL"));
    }
    Ok((from_dev(go.data()), with_lse.then(|| glse.data().to_vec())))
}

/// Runs the backward kernel on the given o and lse; returns (dq, dk, dv) as E bit patterns.
fn run_bwd<E: DevElem>(s: &AttnShape, inp: &Inputs, o: &[f32], lse: &[f32]) -> Result<[Vec<E>; 3]> {
    let cfg = attention_bwd_launch(s, E::DTYPE)?;
    let ins: Vec<Vec<E>> = [&inp.q, &inp.k, &inp.v, &o.to_vec(), &inp.dout].iter().map(|x| to_dev::<E>(x)).collect();
    let g: Vec<Guarded<E>> = ins.iter().map(|x| Guarded::from_slice(x)).collect();
    let gl = Guarded::from_slice(lse);
    let mut outs: Vec<Guarded<E>> = (0..3).map(|_| Guarded::filled(s.numel(), E::POISON)).collect();
    let p: Vec<*const E> = g.iter().map(|x| x.cptr()).collect();
    let pl = gl.cptr();
    let po: Vec<*mut E> = outs.iter_mut().map(|x| x.ptr()).collect();
    let (b, t, h, d, causal) = (s.batch as i32, s.seq as i32, s.heads as i32, s.head_dim as i32, s.causal as i32);
    let mut a = LaunchArgs::new().arg(&p[0]).arg(&p[1]).arg(&p[2]).arg(&p[3]).arg(&p[4]).arg(&pl);
    a = a.arg(&po[0]).arg(&po[1]).arg(&po[2]).arg(&b).arg(&t).arg(&h).arg(&d).arg(&causal).arg(&s.scale);
    launch_cfg(&cfg, &mut a)?;
    for (i, name) in ["q", "k", "v", "o", "dout"].iter().enumerate() {
        check_input(&g[i], &ins[i], name)?;
    }
    check_input(&gl, lse, "lse")?;
    for (x, name) in outs.iter().zip(["dq", "dk", "dv"]) {
        x.check(name)?;
    }
    Ok([outs[0].data().to_vec(), outs[1].data().to_vec(), outs[2].data().to_vec()])
}

struct Tol {
    o: (f64, f64),
    lse: (f64, f64),
    grad: (f64, f64),
}
/// Sharp cases (scores of ±50) lose ~1e-5 of the gradients' scale to f32 rounding of the exponent
/// S - lse (P's relative error is the exponent's absolute error): their gradient atol is 1e-4.
fn tol<E: DevElem>(c: &Case) -> Tol {
    let grad_atol = |a: f64| if c.sharp { 1e-4 } else { a };
    match E::DTYPE {
        DType::F32 => Tol { o: (1e-5, 1e-4), lse: (1e-5, 1e-5), grad: (grad_atol(2e-6), 2e-4) },
        DType::F16 => Tol { o: (1e-5, F16_RTOL), lse: (1e-5, 1e-5), grad: (grad_atol(1e-5), F16_RTOL) },
        DType::BF16 => Tol { o: (1e-5, BF16_RTOL), lse: (1e-5, 1e-5), grad: (grad_atol(1e-5), BF16_RTOL) },
    }
}

fn fwd_case<E: DevElem>(c: &Case) -> Result<()> {
    let s = c.shape();
    let inp = inputs::<E>(c);
    let (want_o, want_lse) = attention_reference(&inp.q, &inp.k, &inp.v, &s);
    let tol = tol::<E>(c);
    let (o, lse) = run_fwd::<E>(&s, &inp, true)?;
    check_close("o", &o, &to_f64(&want_o), tol.o.0, tol.o.1)?;
    check_close("lse", &lse.unwrap(), &to_f64(&want_lse), tol.lse.0, tol.lse.1)
}

/// Backward on the reference forward's o (rounded to E, as the forward kernel stores it) and lse.
fn bwd_case<E: DevElem>(c: &Case, first: &mut Option<[Vec<E>; 3]>) -> Result<()> {
    let s = c.shape();
    let inp = inputs::<E>(c);
    let (o, lse) = attention_reference(&inp.q, &inp.k, &inp.v, &s);
    let o: Vec<f32> = o.iter().map(|&x| E::from_f32(x).to_f32()).collect();
    let want = attention_backward_reference(&inp.q, &inp.k, &inp.v, &o, &lse, &inp.dout, &s);
    let got = run_bwd::<E>(&s, &inp, &o, &lse)?;
    let tol = tol::<E>(c);
    for ((g, w), name) in got.iter().zip([&want.0, &want.1, &want.2]).zip(["dq", "dk", "dv"]) {
        check_close(name, &from_dev(g), &to_f64(w), tol.grad.0, tol.grad.1)?;
    }
    match first {
        None => *first = Some(got),
        Some(f) => {
            for ((a, b), name) in f.iter().zip(&got).zip(["dq", "dk", "dv"]) {
                if let Some(i) = a.iter().zip(b).position(|(x, y)| !x.same_bits(*y)) {
                    return Err(Error::msg(format!("{name}[{i}] differs bitwise between schedules: {:?} vs {:?}", a[i], b[i])));
                }
            }
        }
    }
    Ok(())
}

/// Runs `run(case)` for the small cases in every schedule and the large ones in the forward schedule.
fn for_all_cases(name: &str, mut run: impl FnMut(&Case, bool) -> Result<()>) {
    let (mut failures, mut runs) = (Vec::new(), 0);
    for (cases, schedules) in [(SMALL, &TEST_SCHEDULES[..]), (LARGE, &TEST_SCHEDULES[..1])] {
        for c in cases {
            for (i, &sched) in schedules.iter().enumerate() {
                set_schedule(sched);
                runs += 1;
                if let Err(e) = run(c, i == 0) {
                    failures.push(format!("  {c:?} schedule={}: {e}", sched_name(sched)));
                }
            }
        }
    }
    set_schedule(Schedule::Forward);
    assert!(failures.is_empty(), "{name}: {} of {runs} runs failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn attention_fwd_f32() {
    for_all_cases("attention_fwd_f32", |c, _| fwd_case::<f32>(c));
}

#[test]
fn attention_fwd_bf16() {
    for_all_cases("attention_fwd_bf16", |c, _| fwd_case::<u16>(c));
}

#[test]
fn attention_f16_variants() {
    for_all_cases("attention_fwd_f16", |c, _| fwd_case::<H16>(c));
    let mut first = None;
    for_all_cases("attention_bwd_f16", |c, new_case| {
        if new_case {
            first = None;
        }
        bwd_case::<H16>(c, &mut first)
    });
}

#[test]
fn attention_bwd_f32() {
    let mut first = None;
    for_all_cases("attention_bwd_f32", |c, new_case| {
        if new_case {
            first = None;
        }
        bwd_case::<f32>(c, &mut first)
    });
}

#[test]
fn attention_bwd_bf16() {
    let mut first = None;
    for_all_cases("attention_bwd_bf16", |c, new_case| {
        if new_case {
            first = None;
        }
        bwd_case::<u16>(c, &mut first)
    });
}

#[test]
fn attention_fwd_without_lse() {
    let c = case(2, 7, 3, 59, true);
    let s = c.shape();
    let inp = inputs::<f32>(&c);
    let (o, lse) = run_fwd::<f32>(&s, &inp, false).unwrap();
    assert!(lse.is_none());
    check_close("o", &o, &to_f64(&attention_reference(&inp.q, &inp.k, &inp.v, &s).0), 1e-5, 1e-4).unwrap();
}

#[test]
fn attention_launcher_checks_shapes() {
    let ok = case(2, 197, 12, 64, false).shape();
    let f = attention_fwd_launch(&ok, DType::BF16).unwrap();
    assert_eq!((f.kernel.as_str(), f.grid, f.block), ("attention_fwd_bf16", (4, 12, 2), (128, 1, 1)));
    let b = attention_bwd_launch(&ok, DType::F32).unwrap();
    assert_eq!((b.kernel.as_str(), b.grid), ("attention_bwd_f32", (7 + 4, 12, 2)));
    assert!(b.needs_smem_opt_in() && !f.needs_smem_opt_in());
    for hd in 1..=HEAD_DIM_MAX {
        let s = case(1, 3, 1, hd, false).shape();
        for dt in [DType::F32, DType::BF16] {
            for cfg in [attention_fwd_launch(&s, dt).unwrap(), attention_bwd_launch(&s, dt).unwrap()] {
                assert!(cfg.smem_bytes <= clipforge::cuda::attention::SMEM_LIMIT_SM80, "{cfg:?}");
            }
        }
    }
    for bad in [case(1, 3, 1, 0, false), case(1, 3, 1, 129, false), case(1, 0, 1, 64, false), case(0, 3, 1, 64, false)] {
        assert!(attention_fwd_launch(&bad.shape(), DType::F32).is_err(), "{bad:?}");
        assert!(attention_bwd_launch(&bad.shape(), DType::BF16).is_err(), "{bad:?}");
    }
    assert_eq!(attention_fwd_launch(&ok, DType::F16).unwrap().kernel, "attention_fwd_f16");
}

#[test]
fn attention_kernels_trap_on_bad_launches() {
    let s = case(1, 7, 1, 129, false).shape(); // hd past the accumulators
    let inp = Inputs { q: vec![0.0; s.numel()], k: vec![0.0; s.numel()], v: vec![0.0; s.numel()], dout: vec![] };
    let mut cfg = attention_fwd_launch(&case(1, 7, 1, 128, false).shape(), DType::F32).unwrap();
    let (mut o, mut lse) = (vec![0f32; s.numel()], vec![0f32; 7]);
    let (pq, po, pl) = (inp.q.as_ptr(), o.as_mut_ptr(), lse.as_mut_ptr());
    let (b, t, h, causal, scale) = (1i32, 7i32, 1i32, 0i32, 0.1f32);
    for (hd, block) in [(129i32, 128u32), (0, 128), (64, 64), (64, 256)] {
        cfg.block = (block, 1, 1);
        let mut a = LaunchArgs::new().arg(&pq).arg(&pq).arg(&pq).arg(&po).arg(&pl).arg(&b).arg(&t).arg(&h).arg(&hd).arg(&causal).arg(&scale);
        let err = launch_cfg(&cfg, &mut a).expect_err("the kernel must trap").to_string();
        assert!(err.contains("__trap"), "hd {hd} block {block}: {err}");
    }
}

#[test]
fn attention_kernels_are_registered() {
    for (name, arity) in [
        ("attention_fwd_f32", 11),
        ("attention_fwd_bf16", 11),
        ("attention_fwd_f16", 11),
        ("attention_bwd_f32", 15),
        ("attention_bwd_bf16", 15),
        ("attention_bwd_f16", 15),
    ] {
        assert_eq!(emu::kernel_arity(name), Some(arity), "{name}");
        assert!(clipforge::cuda::kernels::module_of(name).is_some_and(|m| m.name == "attention"), "{name}");
    }
}
