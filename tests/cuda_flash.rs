//! The tensor-core flash attention kernels (kernels/flash_fwd.cu, kernels/flash_bwd.cu) and their
//! building blocks (kernels/mma.cuh through kernels/mma_test.cu) on the CPU emulator, in every
//! schedule: mma.sync / ldmatrix / cp.async against a CPU matmul (and a planted wrong fragment
//! layout that must fail), then the flash forward (o, lse) and backward (dq, dk, dv), batched and
//! packed variable-length, against the f64 CPU reference computed from the 16-bit-rounded inputs.
//! Per element |got - ref| <= atol + rtol·|ref|; guard canaries on every buffer; the backward must
//! be bitwise identical across schedules (no atomics).
mod emu_common;
use clipforge::cuda::attention::KernelLaunch;
use clipforge::cuda::flash::{best_launch, best_varlen_launch, flash_bwd_launch, flash_fwd_launch, flash_varlen_launch};
use clipforge::ops::attention::{attention_backward_reference, attention_reference, AttnShape};
use clipforge::{DType, Error, Result};
use emu_common::*;

// ---------------------------------------------------------------- mma / ldmatrix / cp.async

/// A [16][32] · B [32][16] in f64 from the 16-bit values; rows of A at or past m_valid are zero.
fn matmul_ref(a: &[f32], b: &[f32], m_valid: usize) -> Vec<f64> {
    let mut c = vec![0.0; 256];
    for i in 0..m_valid.min(16) {
        for j in 0..16 {
            c[i * 16 + j] = (0..32).map(|k| a[i * 32 + k] as f64 * b[k * 16 + j] as f64).sum();
        }
    }
    c
}

/// Runs an mma test kernel (mma_test_* or the planted one); returns its `variants` results.
fn run_mma(kernel: &str, f16: bool, m_valid: usize, variants: usize, seed: u64) -> Result<(Vec<f32>, Vec<f64>)> {
    use_f16(f16);
    let mut rng = Rng::new(seed);
    let a: Vec<f32> = rng.vec(16 * 32, -2.0, 2.0).into_iter().map(|x| bf16_to_f32(bf16(x))).collect();
    let b: Vec<f32> = rng.vec(32 * 16, -2.0, 2.0).into_iter().map(|x| bf16_to_f32(bf16(x))).collect();
    let (ha, hb): (Vec<u16>, Vec<u16>) = (a.iter().map(|&x| bf16(x)).collect(), b.iter().map(|&x| bf16(x)).collect());
    use_f16(false);
    let (ga, gb) = (Guarded::from_slice(&ha), Guarded::from_slice(&hb));
    let mut gc = Guarded::filled(256 * variants, f32::NAN);
    let (pa, pb, pc, mv) = (ga.cptr(), gb.cptr(), gc.ptr(), m_valid as i32);
    let mut args = LaunchArgs::new().arg(&pa).arg(&pb).arg(&pc).arg(&mv);
    launch(kernel, (1, 1, 1), (32, 1, 1), 0, args.as_params())?;
    ga.check("a")?;
    gb.check("b")?;
    gc.check("c")?;
    Ok((gc.data().to_vec(), matmul_ref(&a, &b, m_valid)))
}

#[test]
fn mma_ldmatrix_cp_async_match_a_cpu_matmul() {
    let mut failures = Vec::new();
    for (kernel, f16) in [("mma_test_bf16", false), ("mma_test_f16", true)] {
        for m_valid in [16, 11, 0] {
            for s in TEST_SCHEDULES {
                set_schedule(s);
                let r = run_mma(kernel, f16, m_valid, 3, 77 + m_valid as u64)
                    .and_then(|(c, want)| (0..3).try_for_each(|v| check_close(&format!("variant {v}"), &c[256 * v..256 * (v + 1)], &want, 1e-5, 1e-5)));
                if let Err(e) = r {
                    failures.push(format!("{kernel} m_valid={m_valid} schedule={}: {e}", sched_name(s)));
                }
            }
        }
    }
    set_schedule(Schedule::Forward);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn planted_wrong_fragment_layout_is_caught() {
    for s in TEST_SCHEDULES {
        set_schedule(s);
        let (c, want) = run_mma("bug_mma_swapped_a_bf16", false, 16, 1, 5).expect("the planted kernel runs");
        let r = check_close("c", &c, &want, 1e-5, 1e-5);
        println!("[mma_bad_layout] {:<10} {}", sched_name(s), r.as_ref().err().map_or("NOT CAUGHT".into(), |e| e.to_string()));
        assert!(r.is_err(), "swapped a1/a2 registers were not caught in schedule {}", sched_name(s));
    }
    set_schedule(Schedule::Forward);
    // and the correct kernel passes on the same inputs
    let (c, want) = run_mma("mma_test_bf16", false, 16, 3, 5).unwrap();
    check_close("c", &c[..256], &want, 1e-5, 1e-5).unwrap();
}

// ---------------------------------------------------------------- flash attention

/// Tensor elements of the flash kernels: bf16 or f16 bit patterns.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Half {
    bits: u16,
}
impl Elem for Half {
    const CANARY: Half = Half { bits: 0x7fa5 }; // a NaN in both formats
    fn same_bits(self, o: Half) -> bool {
        self.bits == o.bits
    }
}
fn to_bits(dt: DType, x: f32) -> Half {
    Half { bits: if dt == DType::F16 { half::f16::from_f32(x).to_bits() } else { half::bf16::from_f32(x).to_bits() } }
}
fn from_bits(dt: DType, h: Half) -> f32 {
    if dt == DType::F16 {
        half::f16::from_bits(h.bits).to_f32()
    } else {
        half::bf16::from_bits(h.bits).to_f32()
    }
}
const POISON: Half = Half { bits: 0x7fc0 }; // NaN in bf16 and f16: what an unwritten output element holds

/// A shape: batched (`lens` empty) or packed sequences of the given lengths (`b`, `t` unused).
#[derive(Clone, Debug)]
struct Case {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    causal: bool,
    lens: &'static [usize],
}
const fn case(b: usize, t: usize, h: usize, d: usize, causal: bool) -> Case {
    Case { b, t, h, d, causal, lens: &[] }
}
const fn varlen(lens: &'static [usize], h: usize, d: usize, causal: bool) -> Case {
    Case { b: 0, t: 0, h, d, causal, lens }
}

/// Every schedule.
const SMALL: &[Case] = &[
    case(1, 1, 1, 64, false),
    case(1, 1, 2, 80, true),
    case(2, 7, 3, 64, true),
    case(2, 7, 2, 80, false),
    case(1, 77, 2, 64, true),
    case(2, 77, 1, 80, false),
    case(1, 130, 1, 80, true), // three tiles, the last with 2 rows
    varlen(&[7, 1, 77], 2, 64, true),
    varlen(&[65, 3], 1, 80, false),
];
/// The forward schedule only (emulator time).
const LARGE: &[Case] =
    &[case(1, 197, 2, 64, false), case(1, 197, 1, 80, true), case(1, 248, 1, 80, true), case(2, 257, 1, 64, false), varlen(&[248, 77, 1, 130], 1, 64, true)];
/// One long sequence (the forward schedule; the backward of it too).
const HUGE: &[Case] = &[case(1, 577, 1, 64, false)];

impl Case {
    fn varlen(&self) -> bool {
        !self.lens.is_empty()
    }
    /// The sequences as (batch, seq) groups for the reference: each packed sequence its own batch of one.
    fn groups(&self) -> Vec<(usize, usize)> {
        if self.varlen() {
            self.lens.iter().map(|&l| (1, l)).collect()
        } else {
            vec![(self.b, self.t)]
        }
    }
    fn rows(&self) -> usize {
        self.groups().iter().map(|(b, t)| b * t).sum()
    }
    fn shape(&self, b: usize, t: usize) -> AttnShape {
        AttnShape { batch: b, seq: t, heads: self.h, head_dim: self.d, causal: self.causal, scale: 1.0 / (self.d as f32).sqrt() }
    }
    fn launch(&self, dt: DType, backward: bool) -> Result<KernelLaunch> {
        if self.varlen() {
            let tmax = self.lens.iter().copied().max().unwrap_or(0);
            flash_varlen_launch(self.lens.len(), tmax, self.h, self.d, self.causal, dt, backward)
        } else if backward {
            flash_bwd_launch(&self.shape(self.b, self.t), dt)
        } else {
            flash_fwd_launch(&self.shape(self.b, self.t), dt)
        }
    }
}

struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}
/// Uniform inputs, already representable in dt.
fn inputs(c: &Case, dt: DType) -> Inputs {
    let n = c.rows() * c.h * c.d;
    let mut rng = Rng::new((c.rows() * 1009 + c.h * 101 + c.d) as u64 + c.causal as u64 + 7 * c.lens.len() as u64);
    let mut gen = |lo: f32, hi: f32| rng.vec(n, lo, hi).into_iter().map(|x| from_bits(dt, to_bits(dt, x))).collect::<Vec<f32>>();
    Inputs { q: gen(-2.0, 2.0), k: gen(-2.0, 2.0), v: gen(-1.0, 1.0), dout: gen(-1.0, 1.0) }
}

/// The f64 references (returned as f32) of every group, concatenated as the kernels lay them out:
/// rows group after group, lse blocks [b, H, t] group after group.
fn reference(c: &Case, inp: &Inputs) -> (Vec<f32>, Vec<f32>) {
    let (w, mut row, mut o, mut lse) = (c.h * c.d, 0, Vec::new(), Vec::new());
    for (b, t) in c.groups() {
        let r = row * w..(row + b * t) * w;
        let (go, gl) = attention_reference(&inp.q[r.clone()], &inp.k[r.clone()], &inp.v[r], &c.shape(b, t));
        o.extend(go);
        lse.extend(gl);
        row += b * t;
    }
    (o, lse)
}
fn reference_bwd(c: &Case, inp: &Inputs, o: &[f32], lse: &[f32]) -> [Vec<f32>; 3] {
    let (w, mut row, mut out) = (c.h * c.d, 0, [Vec::new(), Vec::new(), Vec::new()]);
    for (b, t) in c.groups() {
        let (r, l) = (row * w..(row + b * t) * w, row * c.h..(row + b * t) * c.h);
        let g = attention_backward_reference(&inp.q[r.clone()], &inp.k[r.clone()], &inp.v[r.clone()], &o[r.clone()], &lse[l], &inp.dout[r], &c.shape(b, t));
        out[0].extend(g.0);
        out[1].extend(g.1);
        out[2].extend(g.2);
        row += b * t;
    }
    out
}

fn dev(dt: DType, v: &[f32]) -> Vec<Half> {
    v.iter().map(|&x| to_bits(dt, x)).collect()
}
fn host(dt: DType, v: &[Half]) -> Vec<f32> {
    v.iter().map(|&x| from_bits(dt, x)).collect()
}
fn check_input(g: &Guarded<Half>, want: &[Half], what: &str) -> Result<()> {
    g.check(what)?;
    match g.data().iter().zip(want).position(|(a, b)| !a.same_bits(*b)) {
        Some(i) => Err(Error::msg(format!("{what}[{i}] was modified by the kernel"))),
        None => Ok(()),
    }
}

/// The shape arguments after the tensors: (B, T) or (cu_seqlens, nseq, Tmax), then H, hd, causal, scale.
struct Tail {
    cu: Guarded<i32>,
    ints: [i32; 4],
    scale: f32,
}
fn tail(c: &Case) -> Tail {
    let cu: Vec<i32> = std::iter::once(0).chain(c.lens.iter().scan(0, |o, &l| Some(std::mem::replace(o, *o + l) as i32 + l as i32))).collect();
    let tmax = c.lens.iter().copied().max().unwrap_or(0) as i32;
    let (a, b) = if c.varlen() { (c.lens.len() as i32, tmax) } else { (c.b as i32, c.t as i32) };
    Tail { cu: Guarded::from_slice(&cu), ints: [a, b, c.h as i32, c.d as i32], scale: 1.0 / (c.d as f32).sqrt() }
}
fn push_tail<'a>(mut a: LaunchArgs<'a>, c: &Case, t: &'a Tail, cu_ptr: &'a *const i32, causal: &'a i32) -> LaunchArgs<'a> {
    if c.varlen() {
        a = a.arg(cu_ptr);
    }
    a.arg(&t.ints[0]).arg(&t.ints[1]).arg(&t.ints[2]).arg(&t.ints[3]).arg(causal).arg(&t.scale)
}

fn run_fwd(c: &Case, dt: DType, inp: &Inputs, l: &KernelLaunch) -> Result<(Vec<f32>, Vec<f32>)> {
    let n = c.rows() * c.h * c.d;
    let (hq, hk, hv) = (dev(dt, &inp.q), dev(dt, &inp.k), dev(dt, &inp.v));
    let (gq, gk, gv) = (Guarded::from_slice(&hq), Guarded::from_slice(&hk), Guarded::from_slice(&hv));
    let (mut go, mut glse) = (Guarded::filled(n, POISON), Guarded::filled(c.rows() * c.h, f32::NAN));
    let (pq, pk, pv, po, pl) = (gq.cptr(), gk.cptr(), gv.cptr(), go.ptr(), glse.ptr());
    let t = tail(c);
    let (cu, causal) = (t.cu.cptr(), c.causal as i32);
    let a = LaunchArgs::new().arg(&pq).arg(&pk).arg(&pv).arg(&po).arg(&pl);
    let mut a = push_tail(a, c, &t, &cu, &causal);
    launch(&l.kernel, l.grid, l.block, l.smem_bytes, a.as_params())?;
    check_input(&gq, &hq, "q")?;
    check_input(&gk, &hk, "k")?;
    check_input(&gv, &hv, "v")?;
    go.check("o")?;
    glse.check("lse")?;
    t.cu.check("cu_seqlens")?;
    Ok((host(dt, go.data()), glse.data().to_vec()))
}

fn run_bwd(c: &Case, dt: DType, inp: &Inputs, o: &[f32], lse: &[f32], l: &KernelLaunch) -> Result<[Vec<Half>; 3]> {
    let n = c.rows() * c.h * c.d;
    let ins: Vec<Vec<Half>> = [&inp.q, &inp.k, &inp.v, &o.to_vec(), &inp.dout].iter().map(|x| dev(dt, x)).collect();
    let g: Vec<Guarded<Half>> = ins.iter().map(|x| Guarded::from_slice(x)).collect();
    let gl = Guarded::from_slice(lse);
    let mut outs: Vec<Guarded<Half>> = (0..3).map(|_| Guarded::filled(n, POISON)).collect();
    let p: Vec<*const Half> = g.iter().map(|x| x.cptr()).collect();
    let pl = gl.cptr();
    let po: Vec<*mut Half> = outs.iter_mut().map(|x| x.ptr()).collect();
    let t = tail(c);
    let (cu, causal) = (t.cu.cptr(), c.causal as i32);
    let a = LaunchArgs::new().arg(&p[0]).arg(&p[1]).arg(&p[2]).arg(&p[3]).arg(&p[4]).arg(&pl).arg(&po[0]).arg(&po[1]).arg(&po[2]);
    let mut a = push_tail(a, c, &t, &cu, &causal);
    launch(&l.kernel, l.grid, l.block, l.smem_bytes, a.as_params())?;
    for (i, name) in ["q", "k", "v", "o", "dout"].iter().enumerate() {
        check_input(&g[i], &ins[i], name)?;
    }
    gl.check("lse")?;
    for (x, name) in outs.iter().zip(["dq", "dk", "dv"]) {
        x.check(name)?;
    }
    Ok([outs[0].data().to_vec(), outs[1].data().to_vec(), outs[2].data().to_vec()])
}

/// u: the unit roundoff of the 16-bit format (2^-8 bf16, 2^-11 f16).
fn unit(dt: DType) -> f64 {
    if dt == DType::F16 {
        1.0 / 2048.0
    } else {
        1.0 / 256.0
    }
}
fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()))
}

/// Tolerances, per element |got - ref| <= atol + rtol·|ref|:
/// - o: rtol 2u (the store's rounding plus f32 differences); atol u·max|v|: P is rounded to the
///   16-bit type for P·V (relative error <= u per term, P >= 0 and Σ P / l = 1, so the error of o is
///   at most u·max|v|), the normaliser l sums the unrounded P (as FlashAttention-2).
/// - lse: f32 math on exact products: 1e-5 absolute and relative.
/// - dq, dk, dv: rtol 2u; atol 2.5u·max|ref| of that tensor + 1e-5: P and dS enter the mma as 16-bit
///   values (relative error u each), the sums over up to T terms of mixed sign can cancel to far
///   below the terms (a per-element bound relative to |ref| does not exist); 1e-5 for dP - D, two
///   f32 dot products of hd terms summed in different orders (at T = 1 the reference is exactly 0).
///   Measured: at most 1.4u·max (f16 and bf16 alike). Run with --nocapture for the measured max|err| / (u·max|ref|) of each case.
fn grad_atol(u: f64, want: &[f32]) -> f64 {
    2.5 * u * max_abs(want) + 1e-5
}
fn check_fwd(dt: DType, inp: &Inputs, o: &[f32], lse: &[f32], want: &(Vec<f32>, Vec<f32>)) -> Result<()> {
    let u = unit(dt);
    check_close("o", o, &to_f64(&want.0), u * max_abs(&inp.v), 2.0 * u)?;
    check_close("lse", lse, &to_f64(&want.1), 1e-5, 1e-5)
}

fn fwd_case(c: &Case, dt: DType) -> Result<()> {
    let inp = inputs(c, dt);
    let want = reference(c, &inp);
    let (o, lse) = run_fwd(c, dt, &inp, &c.launch(dt, false)?)?;
    check_fwd(dt, &inp, &o, &lse, &want)?;
    let e = o.iter().zip(&want.0).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    println!("{dt:?} {c:?}: o max|err| / (u·max|v|) {:.3}", e / (unit(dt) * max_abs(&inp.v)));
    Ok(())
}

/// Backward on the reference forward's o (rounded to dt) and lse; also bitwise equal across schedules.
fn bwd_case(c: &Case, dt: DType, first: &mut Option<[Vec<Half>; 3]>) -> Result<()> {
    let inp = inputs(c, dt);
    let (o, lse) = reference(c, &inp);
    let o: Vec<f32> = o.iter().map(|&x| from_bits(dt, to_bits(dt, x))).collect();
    let want = reference_bwd(c, &inp, &o, &lse);
    let got = run_bwd(c, dt, &inp, &o, &lse, &c.launch(dt, true)?)?;
    let u = unit(dt);
    let mut worst = Vec::new();
    for ((g, w), name) in got.iter().zip(&want).zip(["dq", "dk", "dv"]) {
        let g = host(dt, g);
        check_close(name, &g, &to_f64(w), grad_atol(u, w), 2.0 * u)?;
        let e = g.iter().zip(w.iter()).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        worst.push(format!("{name} {:.3}", e / (u * max_abs(w)).max(1e-30)));
    }
    if first.is_none() {
        println!("{dt:?} {c:?}: max|err| / (u·max|ref|): {}", worst.join(", "));
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

/// Runs `run(case, first schedule of the case)` for SMALL in every schedule, LARGE and HUGE in the forward one.
fn for_all_cases(name: &str, with_huge: bool, mut run: impl FnMut(&Case, bool) -> Result<()>) {
    let (mut failures, mut runs) = (Vec::new(), 0);
    let huge: &[Case] = if with_huge { HUGE } else { &[] };
    for (cases, schedules) in [(SMALL, &TEST_SCHEDULES[..]), (LARGE, &TEST_SCHEDULES[..1]), (huge, &TEST_SCHEDULES[..1])] {
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
fn flash_fwd_bf16() {
    for_all_cases("flash_fwd_bf16", true, |c, _| fwd_case(c, DType::BF16));
}

#[test]
fn flash_fwd_f16() {
    for_all_cases("flash_fwd_f16", false, |c, _| fwd_case(c, DType::F16));
}

#[test]
fn flash_bwd_bf16() {
    let mut first = None;
    for_all_cases("flash_bwd_bf16", true, |c, new_case| {
        if new_case {
            first = None;
        }
        bwd_case(c, DType::BF16, &mut first)
    });
}

#[test]
fn flash_bwd_f16() {
    let mut first = None;
    for_all_cases("flash_bwd_f16", false, |c, new_case| {
        if new_case {
            first = None;
        }
        bwd_case(c, DType::F16, &mut first)
    });
}

/// Head dims without a flash instance go to kernels/attention.cu (same arguments), and that kernel
/// passes the same forward check; f32 never goes to the flash kernels.
#[test]
fn other_head_dims_fall_back_to_the_cuda_core_kernels() {
    let c = case(2, 7, 3, 59, true);
    let s = c.shape(2, 7);
    for (dt, fwd, bwd) in [(DType::BF16, "attention_fwd_bf16", "attention_bwd_bf16"), (DType::F16, "attention_fwd_f16", "attention_bwd_f16")] {
        assert_eq!(best_launch(&s, dt, false).unwrap().kernel, fwd);
        assert_eq!(best_launch(&s, dt, true).unwrap().kernel, bwd);
        let inp = inputs(&c, dt);
        let (o, lse) = run_fwd(&c, dt, &inp, &best_launch(&s, dt, false).unwrap()).unwrap();
        check_fwd(dt, &inp, &o, &lse, &reference(&c, &inp)).unwrap();
    }
    assert_eq!(best_varlen_launch(3, 7, 3, 59, DType::BF16, false).unwrap().kernel, "attention_varlen_fwd_f32");
    for d in [64, 80] {
        let s = case(2, 197, 12, d, false).shape(2, 197);
        assert_eq!(best_launch(&s, DType::F32, false).unwrap().kernel, "attention_fwd_f32");
        let f = best_launch(&s, DType::BF16, false).unwrap();
        let fwd = if d == 64 { "flash_fwd64_bf16" } else { "flash_fwd_bf16" }; // hd 64: the 5-blocks-per-SM build
        assert_eq!((f.kernel.as_str(), f.grid, f.block), (fwd, (4, 12, 2), (128, 1, 1)));
        let b = best_launch(&s, DType::F16, true).unwrap();
        assert_eq!((b.kernel.as_str(), b.grid), ("flash_bwd_f16", (8, 12, 2)));
        assert!(b.smem_bytes <= clipforge::cuda::attention::SMEM_LIMIT_SM80);
        let want = if d == 64 { "flash_varlen_bwd64_bf16" } else { "flash_varlen_bwd_bf16" };
        assert_eq!(best_varlen_launch(3, 248, 12, d, DType::BF16, true).unwrap().kernel, want);
    }
    assert!(flash_fwd_launch(&s, DType::F32).is_err() && flash_fwd_launch(&s, DType::BF16).is_err());
}

#[test]
fn flash_kernels_trap_on_unsupported_launches() {
    let c = case(1, 7, 1, 64, false);
    let inp = inputs(&c, DType::BF16);
    let mut l = c.launch(DType::BF16, false).unwrap();
    l.block = (64, 1, 1);
    let err = run_fwd(&c, DType::BF16, &inp, &l).expect_err("block 64 must trap").to_string();
    assert!(err.contains("__trap"), "{err}");
    let c48 = case(1, 7, 1, 48, false); // no instance for hd 48
    let mut l = c.launch(DType::BF16, true).unwrap();
    l.smem_bytes = clipforge::cuda::flash::bwd_smem_bytes(48) as u32;
    let inp = inputs(&c48, DType::BF16);
    let err = run_bwd(&c48, DType::BF16, &inp, &inp.v, &[0.0; 7], &l).expect_err("hd 48 must trap").to_string();
    assert!(err.contains("__trap"), "{err}");
    // the hd-64-only varlen backward refuses hd 80
    let c80 = varlen(&[7, 3], 1, 80, true);
    let mut l = c80.launch(DType::BF16, true).unwrap();
    assert_eq!(l.kernel, "flash_varlen_bwd_bf16");
    l.kernel = "flash_varlen_bwd64_bf16".into();
    let inp = inputs(&c80, DType::BF16);
    let err = run_bwd(&c80, DType::BF16, &inp, &inp.v, &[0.0; 10], &l).expect_err("hd 80 must trap in bwd64").to_string();
    assert!(err.contains("__trap"), "{err}");
    // and the hd-64-only batched forward too
    let c80 = case(1, 7, 1, 80, false);
    let mut l = c80.launch(DType::BF16, false).unwrap();
    assert_eq!(l.kernel, "flash_fwd_bf16");
    l.kernel = "flash_fwd64_bf16".into();
    let inp = inputs(&c80, DType::BF16);
    let err = run_fwd(&c80, DType::BF16, &inp, &l).expect_err("hd 80 must trap in fwd64").to_string();
    assert!(err.contains("__trap"), "{err}");
}

#[test]
fn flash_kernels_are_registered() {
    for (name, arity) in [
        ("flash_fwd_bf16", 11),
        ("flash_fwd_f16", 11),
        ("flash_fwd64_bf16", 11),
        ("flash_fwd64_f16", 11),
        ("flash_varlen_fwd_bf16", 12),
        ("flash_varlen_fwd_f16", 12),
        ("flash_bwd_bf16", 15),
        ("flash_bwd_f16", 15),
        ("flash_varlen_bwd_bf16", 16),
        ("flash_varlen_bwd_f16", 16),
        ("flash_varlen_bwd64_bf16", 16),
        ("flash_varlen_bwd64_f16", 16),
        ("mma_test_bf16", 4),
        ("bf16_to_f32", 3),
    ] {
        assert_eq!(emu::kernel_arity(name), Some(arity), "{name}");
    }
}

/// The device backend (`Device`, emulated) runs the flash kernels for bf16/f16 towers at head dims
/// 64/80 (batched and packed), converting its f32 activations; f32 keeps the CUDA-core kernels.
#[test]
fn device_attention_of_half_towers_runs_the_flash_kernels() {
    device_attention(Box::new(clipforge::cuda::EmuOps));
}

/// The same on a real GPU (skipped without one): the PTX mma/ldmatrix/cp.async against the reference.
#[test]
fn a_real_gpu_runs_the_flash_kernels() {
    match clipforge::cuda::GpuOps::open() {
        Ok(g) => device_attention(Box::new(g)),
        Err(why) => eprintln!("skipped: no CUDA device ({why})"),
    }
}

fn device_attention(ops: Box<dyn clipforge::cuda::DeviceOps>) {
    use clipforge::backend::{device::Device, Ops, Seqs};
    let dev = Device::new(ops);
    let cases = [
        (DType::BF16, case(2, 77, 2, 64, true), Seqs::Batch { batch: 2, seq: 77, causal: true }),
        (DType::F16, case(1, 70, 1, 80, false), Seqs::Batch { batch: 1, seq: 70, causal: false }),
        (DType::BF16, varlen(&[7, 1, 77], 2, 80, true), Seqs::Packed(vec![7, 1, 77])),
        (DType::F32, case(1, 70, 1, 64, true), Seqs::Batch { batch: 1, seq: 70, causal: true }),
    ];
    for (dt, c, seqs) in cases {
        dev.set_attention_dtype(dt);
        let inp = inputs(&c, if dt == DType::F32 { DType::BF16 } else { dt });
        let w = c.h * c.d;
        let up = |x: &[f32]| dev.upload(x).unwrap();
        let (q, k, v, d_o) = (up(&inp.q), up(&inp.k), up(&inp.v), up(&inp.dout));
        let (ob, lb) = dev.attention(&q, &k, &v, &seqs, c.h, w).unwrap();
        let (o, lse) = (dev.download(&ob).unwrap(), dev.download(&lb).unwrap());
        let representable = o.iter().all(|&x| from_bits(DType::BF16, to_bits(DType::BF16, x)) == x && from_bits(DType::F16, to_bits(DType::F16, x)) == x);
        let want = reference(&c, &inp);
        if dt == DType::F32 {
            assert!(!representable, "f32 attention produced 16-bit values: the flash kernels ran");
            check_close("o", &o, &to_f64(&want.0), 1e-5, 1e-4).unwrap();
            continue;
        }
        assert!(o.iter().all(|&x| from_bits(dt, to_bits(dt, x)) == x), "{dt:?} {c:?}: o is not {dt:?}-valued: the flash kernels did not run");
        check_fwd(dt, &inp, &o, &lse, &want).unwrap_or_else(|e| panic!("{dt:?} {c:?}: {e}"));
        let want = reference_bwd(&c, &inp, &o, &lse);
        let (dq, dk, dv) = dev.attention_bwd(&q, &k, &v, &ob, &lb, &d_o, &seqs, c.h, w).unwrap();
        for ((g, w), name) in [dq, dk, dv].iter().zip(&want).zip(["dq", "dk", "dv"]) {
            let g = dev.download(g).unwrap();
            check_close(name, &g, &to_f64(w), grad_atol(unit(dt), w), 2.0 * unit(dt)).unwrap_or_else(|e| panic!("{dt:?} {c:?}: {e}"));
        }
    }
}
