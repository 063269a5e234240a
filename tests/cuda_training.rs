//! The training kernels (kernels/pos_gather.cu, cross_entropy.cu, adamw.cu, pca.cu) on the CPU
//! emulator against the CPU references: odd shapes, every schedule (fwd, rev, random ×2),
//! per-element |got − ref| ≤ atol + rtol·|ref|, NaN/Inf fail, guard canaries on every buffer.
mod emu_common;
mod training_common;
use clipforge::ops::adamw::{adamw_reference, AdamW};
use clipforge::ops::cross_entropy::{cross_entropy_bwd_reference, cross_entropy_reference};
use clipforge::ops::pca::{orthonormalize, pca_reference, start_basis};
use clipforge::ops::pos_gather::{pos_gather_bwd_reference, pos_gather_reference, stretch_reference, Stretch};
use clipforge::{Error, Result};
use emu_common::*;
use half::f16;
use training_common::*;

fn to_bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| bf16(x)).collect()
}
fn from_bf16_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&h| bf16_to_f32(h)).collect()
}

// ---------------------------------------------------------------- pos_gather

const POS_BLOCK: u32 = 128;

fn pos_smem(s: Stretch) -> u32 {
    ((s.len * POS_BLOCK as usize + 4 * s.new_len()) * 4) as u32
}

/// pos_gather_bwd_<dtype> over `parts` row chunks (+ the reduce when parts > 1); returns dP.
fn run_pos_bwd(dout: &[f32], pos: &[u32], s: Stretch, w: usize, parts: usize, bf16_io: bool) -> Result<Vec<f32>> {
    let rows = pos.len();
    let (rows_i, l_i, w_i, keep_i, ratio_i) = (rows as i32, s.len as i32, w as i32, s.keep as i32, s.ratio as i32);
    let mut gpos = Guarded::from_slice(pos);
    let mut partial = Guarded::filled(parts * s.len * w, f32::NAN);
    let (ppos, ppart) = (gpos.ptr() as *const u32, partial.ptr());
    let grid = (ceil_div(w, POS_BLOCK as usize), parts as u32, 1);
    if bf16_io {
        let mut d = Guarded::from_slice(&to_bf16_bits(dout));
        let pd = d.ptr() as *const u16;
        let mut a = LaunchArgs::new().arg(&pd).arg(&ppos).arg(&ppart).arg(&rows_i).arg(&l_i).arg(&w_i).arg(&keep_i).arg(&ratio_i);
        launch(&format!("pos_gather_bwd_{}", half_suffix()), grid, (POS_BLOCK, 1, 1), pos_smem(s), a.as_params())?;
        d.check("dout")?;
    } else {
        let mut d = Guarded::from_slice(dout);
        let pd = d.ptr() as *const f32;
        let mut a = LaunchArgs::new().arg(&pd).arg(&ppos).arg(&ppart).arg(&rows_i).arg(&l_i).arg(&w_i).arg(&keep_i).arg(&ratio_i);
        launch("pos_gather_bwd_f32", grid, (POS_BLOCK, 1, 1), pos_smem(s), a.as_params())?;
        d.check("dout")?;
    }
    gpos.check("pos")?;
    partial.check("dP_partial")?;
    if parts == 1 {
        return Ok(partial.data().to_vec());
    }
    let mut dp = Guarded::filled(s.len * w, f32::NAN);
    let (pp, pdp, parts_i, n_i) = (partial.ptr() as *const f32, dp.ptr(), parts as i32, (s.len * w) as i32);
    launch(
        "pos_gather_bwd_reduce_f32",
        (ceil_div(s.len * w, 256), 1, 1),
        (256, 1, 1),
        0,
        LaunchArgs::new().arg(&pp).arg(&pdp).arg(&parts_i).arg(&n_i).as_params(),
    )?;
    dp.check("dP")?;
    Ok(dp.data().to_vec())
}

fn pos_case(s: Stretch, rows: usize, w: usize) -> Result<()> {
    let mut rng = Rng::new((rows * 131 + w * 7 + s.len) as u64);
    let p = rng.vec(s.len * w, -1.0, 1.0);
    let pos = positions(rows, s, rows as u64 + 1);
    let (rows_i, l_i, w_i, keep_i, ratio_i) = (rows as i32, s.len as i32, w as i32, s.keep as i32, s.ratio as i32);
    let want = pos_gather_reference(&p, w, s, &pos)?;
    let mut gp = Guarded::from_slice(&p);
    let mut gpos = Guarded::from_slice(&pos);
    let (pp, ppos) = (gp.ptr() as *const f32, gpos.ptr() as *const u32);
    let grid = (ceil_div(rows, 4), 1, 1);
    // forward f32 and bf16
    let mut out = Guarded::filled(rows * w, f32::NAN);
    let po = out.ptr();
    launch(
        "pos_gather_fwd_f32",
        grid,
        (128, 1, 1),
        0,
        LaunchArgs::new().arg(&pp).arg(&ppos).arg(&po).arg(&rows_i).arg(&l_i).arg(&w_i).arg(&keep_i).arg(&ratio_i).as_params(),
    )?;
    out.check("out f32")?;
    check_close("fwd f32", out.data(), &want, 1e-7, 1e-6)?;
    let mut outb = Guarded::filled(rows * w, 0x7fc0u16);
    let pob = outb.ptr();
    launch(
        &format!("pos_gather_fwd_{}", half_suffix()),
        grid,
        (128, 1, 1),
        0,
        LaunchArgs::new().arg(&pp).arg(&ppos).arg(&pob).arg(&rows_i).arg(&l_i).arg(&w_i).arg(&keep_i).arg(&ratio_i).as_params(),
    )?;
    outb.check("out bf16")?;
    check_close("fwd bf16", &from_bf16_bits(outb.data()), &want, 1e-7, half_rtol())?;
    // the whole table
    let ln = s.new_len();
    let mut table = Guarded::filled(ln * w, f32::NAN);
    let pt = table.ptr();
    launch(
        "pos_stretch_f32",
        (ceil_div(ln, 4), 1, 1),
        (128, 1, 1),
        0,
        LaunchArgs::new().arg(&pp).arg(&pt).arg(&l_i).arg(&w_i).arg(&keep_i).arg(&ratio_i).as_params(),
    )?;
    table.check("stretched table")?;
    check_close("stretch", table.data(), &stretch_reference(&p, w, s), 1e-7, 1e-6)?;
    gp.check("P")?;
    gpos.check("pos")?;
    // backward: f32 in one and three parts, bf16 in two
    let dout = round_bf16(&rng.vec(rows * w, -1.0, 1.0));
    let want_dp = pos_gather_bwd_reference(&dout, w, s, &pos)?;
    let atol = 1e-6 * (rows as f64).sqrt().max(1.0);
    for (parts, bf16_io) in [(1, false), (3, false), (2, true)] {
        let dp = run_pos_bwd(&dout, &pos, s, w, parts, bf16_io)?;
        check_close(&format!("dP ({parts} parts, bf16 {bf16_io})"), &dp, &want_dp, atol, 1e-5)?;
    }
    Ok(())
}

#[test]
fn pos_gather_kernels() {
    let mut cases = Vec::new();
    for s in stretches() {
        for &(rows, w) in &[(1, 1), (7, 59), (45, 65), (65, 768)] {
            cases.push((s, rows, w));
        }
    }
    for_all_cases("pos_gather", &cases, |&(s, rows, w)| pos_case(s, rows, w));
}

#[test]
fn pos_gather_bwd_kernel_is_bitwise_deterministic() {
    let s = Stretch::LONG_CLIP;
    let pos = positions(3 * 248 + 5, s, 9);
    let dout = Rng::new(10).vec(pos.len() * 70, -1.0, 1.0);
    let mut first: Option<Vec<f32>> = None;
    for sched in TEST_SCHEDULES {
        set_schedule(sched);
        let dp = run_pos_bwd(&dout, &pos, s, 70, 4, false).unwrap();
        match &first {
            None => first = Some(dp),
            Some(f) => assert!(f.iter().zip(&dp).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", sched_name(sched)),
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn pos_gather_traps_on_out_of_range_positions() {
    let s = Stretch::new(7, 2, 3).unwrap();
    let (p, pos) = (vec![0f32; 7 * 3], vec![0u32, s.new_len() as u32]);
    let (mut out, mut gp, mut gpos) = (Guarded::filled(2 * 3, 0f32), Guarded::from_slice(&p), Guarded::from_slice(&pos));
    let (pp, ppos, po) = (gp.ptr() as *const f32, gpos.ptr() as *const u32, out.ptr());
    let (rows, l, w, keep, ratio) = (2i32, 7i32, 3i32, 2i32, 3i32);
    let err = launch(
        "pos_gather_fwd_f32",
        (1, 1, 1),
        (64, 1, 1),
        0,
        LaunchArgs::new().arg(&pp).arg(&ppos).arg(&po).arg(&rows).arg(&l).arg(&w).arg(&keep).arg(&ratio).as_params(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("__trap"), "{err}");
    let mut part = Guarded::filled(7 * 3, 0f32);
    let ppart = part.ptr();
    let err = launch(
        "pos_gather_bwd_f32",
        (1, 1, 1),
        (128, 1, 1),
        pos_smem(s),
        LaunchArgs::new().arg(&pp).arg(&ppos).arg(&ppart).arg(&rows).arg(&l).arg(&w).arg(&keep).arg(&ratio).as_params(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("__trap"), "{err}");
}

// ---------------------------------------------------------------- cross-entropy

#[derive(Debug, Clone, Copy)]
struct CeCase {
    rows: usize,
    classes: usize,
    eps: f32,
    bf16: bool,
    in_place: bool,
}

fn ce_case(c: &CeCase) -> Result<()> {
    let CeCase { rows, classes, eps, bf16: bf16_io, in_place } = *c;
    let spread = 30.0;
    let mut x = logits(rows, classes, spread, (rows * 1000 + classes) as u64);
    if bf16_io {
        x = round_bf16(&x);
    }
    let t = targets(rows, classes, rows as u64 + 3);
    let dloss = 0.75f32;
    let x64 = to_f64(&x);
    let want = cross_entropy_reference(&x64, classes, &t, eps as f64)?;
    let want_d = cross_entropy_bwd_reference(&x64, classes, &t, eps as f64, dloss as f64)?;
    let (rows_i, c_i) = (rows as i32, classes as i32);
    let mut gt = Guarded::from_slice(&t);
    let (mut loss, mut lse, mut mean) = (Guarded::filled(rows, f32::NAN), Guarded::filled(rows, f32::NAN), Guarded::filled(1, f32::NAN));
    let (pt, pl, plse, pm) = (gt.ptr() as *const u32, loss.ptr(), lse.ptr(), mean.ptr());
    let grid = (ceil_div(rows, 4), 1, 1);
    let suffix = if bf16_io { "bf16" } else { "f32" };
    let dl: Vec<f32> = if bf16_io {
        let mut gx = Guarded::from_slice(&to_bf16_bits(&x));
        let px = gx.ptr();
        let pxc = px as *const u16;
        launch(
            &format!("cross_entropy_fwd_{}", half_suffix()),
            grid,
            (128, 1, 1),
            0,
            LaunchArgs::new().arg(&pxc).arg(&pt).arg(&pl).arg(&plse).arg(&rows_i).arg(&c_i).arg(&eps).as_params(),
        )?;
        let mut gd = Guarded::filled(rows * classes, 0x7fc0u16);
        let pd = if in_place { px } else { gd.ptr() };
        let plsec = plse as *const f32;
        launch(
            &format!("cross_entropy_bwd_{}", half_suffix()),
            grid,
            (128, 1, 1),
            0,
            LaunchArgs::new().arg(&pxc).arg(&pt).arg(&plsec).arg(&pd).arg(&rows_i).arg(&c_i).arg(&eps).arg(&dloss).as_params(),
        )?;
        gx.check("logits")?;
        gd.check("dlogits")?;
        from_bf16_bits(if in_place { gx.data() } else { gd.data() })
    } else {
        let mut gx = Guarded::from_slice(&x);
        let px = gx.ptr();
        let pxc = px as *const f32;
        launch(
            "cross_entropy_fwd_f32",
            grid,
            (128, 1, 1),
            0,
            LaunchArgs::new().arg(&pxc).arg(&pt).arg(&pl).arg(&plse).arg(&rows_i).arg(&c_i).arg(&eps).as_params(),
        )?;
        let mut gd = Guarded::filled(rows * classes, f32::NAN);
        let pd = if in_place { px } else { gd.ptr() };
        let plsec = plse as *const f32;
        launch(
            "cross_entropy_bwd_f32",
            grid,
            (128, 1, 1),
            0,
            LaunchArgs::new().arg(&pxc).arg(&pt).arg(&plsec).arg(&pd).arg(&rows_i).arg(&c_i).arg(&eps).arg(&dloss).as_params(),
        )?;
        gx.check("logits")?;
        gd.check("dlogits")?;
        if in_place {
            gx.data().to_vec()
        } else {
            gd.data().to_vec()
        }
    };
    let plc = pl as *const f32;
    launch("cross_entropy_mean_f32", (1, 1, 1), (256, 1, 1), 0, LaunchArgs::new().arg(&plc).arg(&pm).arg(&rows_i).as_params())?;
    for (b, n) in [(&loss, "loss"), (&lse, "lse"), (&mean, "mean")] {
        b.check(n)?;
    }
    gt.check("targets")?;
    let atol = 2e-5 * spread as f64;
    check_close(&format!("loss {suffix}"), loss.data(), &want.loss, atol, 1e-5)?;
    check_close(&format!("lse {suffix}"), lse.data(), &want.lse, atol, 1e-6)?;
    check_close("mean", mean.data(), &[want.mean], atol, 1e-5)?;
    let (datol, drtol) = if bf16_io { (1e-6, half_rtol()) } else { (1e-6 * spread as f64 / rows as f64, 1e-4) };
    check_close(&format!("dlogits {suffix}"), &dl, &want_d, datol, drtol)
}

#[test]
fn cross_entropy_kernels() {
    let mut cases = Vec::new();
    for &(rows, classes) in &[(1, 1), (7, 59), (45, 65), (7, 768), (3, 2048)] {
        for &eps in &[0.0, 0.1] {
            for bf16 in [false, true] {
                cases.push(CeCase { rows, classes, eps, bf16, in_place: rows == 7 });
            }
        }
    }
    for_all_cases("cross_entropy", &cases, ce_case);
}

/// The f16 variants through the bf16 cases (tests/emu_common `use_f16`).
#[test]
fn f16_variants_of_pos_gather_cross_entropy_adamw() {
    use_f16(true);
    let mut pos = Vec::new();
    for s in stretches() {
        for &(rows, w) in &[(1, 1), (7, 59), (45, 65)] {
            pos.push((s, rows, w));
        }
    }
    for_all_cases("pos_gather f16", &pos, |&(s, rows, w)| pos_case(s, rows, w));
    let mut ce = Vec::new();
    for &(rows, classes) in &[(1, 1), (7, 59), (3, 2048)] {
        for &eps in &[0.0, 0.1] {
            ce.push(CeCase { rows, classes, eps, bf16: true, in_place: rows == 7 });
        }
    }
    for_all_cases("cross_entropy f16", &ce, ce_case);
    let adam: Vec<AdamCase> =
        [1usize, 45, 4099].iter().map(|&n| AdamCase { n, bf16_grad: true, copies: true, step: 10, blocks: (n.div_ceil(256) as u32).min(3) }).collect();
    for_all_cases("adamw f16 grads", &adam, adamw_case);
}

#[test]
fn cross_entropy_mean_over_many_rows() {
    // more rows than threads: the strided accumulation and the block reduction
    let loss = Rng::new(3).vec(2047, 0.0, 8.0);
    let want = loss.iter().map(|&v| v as f64).sum::<f64>() / 2047.0;
    let mut gl = Guarded::from_slice(&loss);
    let mut gm = Guarded::filled(1, f32::NAN);
    let (pl, pm, n) = (gl.ptr() as *const f32, gm.ptr(), 2047i32);
    for_all_cases("cross_entropy_mean_f32", &[1024u32, 32], |&block| {
        launch("cross_entropy_mean_f32", (1, 1, 1), (block, 1, 1), 0, LaunchArgs::new().arg(&pl).arg(&pm).arg(&n).as_params())?;
        check_close("mean", gm.data(), &[want], 1e-5, 1e-6)
    });
    gl.check("loss").unwrap();
    gm.check("mean").unwrap();
}

#[test]
fn cross_entropy_traps_on_out_of_range_targets() {
    let (x, t) = (vec![0f32; 2 * 5], vec![1u32, 5]);
    let (mut gx, mut gt, mut loss, mut lse) = (Guarded::from_slice(&x), Guarded::from_slice(&t), Guarded::filled(2, 0f32), Guarded::filled(2, 0f32));
    let (px, pt, pl, plse, rows, c, eps) = (gx.ptr() as *const f32, gt.ptr() as *const u32, loss.ptr(), lse.ptr(), 2i32, 5i32, 0.1f32);
    let err = launch(
        "cross_entropy_fwd_f32",
        (1, 1, 1),
        (64, 1, 1),
        0,
        LaunchArgs::new().arg(&px).arg(&pt).arg(&pl).arg(&plse).arg(&rows).arg(&c).arg(&eps).as_params(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("__trap"), "{err}");
}

// ---------------------------------------------------------------- AdamW

#[derive(Debug, Clone, Copy)]
struct AdamCase {
    n: usize,
    bf16_grad: bool,
    copies: bool,
    step: u32,
    blocks: u32,
}

fn adamw_case(c: &AdamCase) -> Result<()> {
    let AdamCase { n, bf16_grad, copies, step, blocks } = *c;
    let opt = AdamW { lr: 2e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let mut rng = Rng::new(n as u64 * 3 + step as u64);
    let p0 = rng.vec(n, -1.0, 1.0);
    let mut g = rng.vec(n, -1e-2, 1e-2);
    if bf16_grad {
        g = round_bf16(&g);
    }
    let m0 = rng.vec(n, -1e-3, 1e-3);
    let v0 = rng.vec(n, 0.0, 1e-5);
    let (mut pr, mut mr, mut vr) = (p0.clone(), m0.clone(), v0.clone());
    adamw_reference(&mut pr, &g, &mut mr, &mut vr, &opt, step)?;
    let (mut gp, mut gm, mut gv) = (Guarded::from_slice(&p0), Guarded::from_slice(&m0), Guarded::from_slice(&v0));
    let (mut gb, mut gh) = (Guarded::filled(n, 0x7fc0u16), Guarded::filled(n, 0x7e00u16));
    let (pp, pm, pv) = (gp.ptr(), gm.ptr(), gv.ptr());
    let (pb, ph) = if copies { (gb.ptr(), gh.ptr()) } else { (std::ptr::null_mut(), std::ptr::null_mut()) };
    let (n_i, step_i) = (n as i64, step as i32);
    let (mut gg32, mut gg16) = (Guarded::from_slice(&g), Guarded::from_slice(&to_bf16_bits(&g)));
    let kernel = if bf16_grad { format!("adamw_{}", half_suffix()) } else { "adamw_f32".to_string() };
    let pg: *const std::ffi::c_void = if bf16_grad { gg16.ptr() as *const _ } else { gg32.ptr() as *const _ };
    let (lr, b1, b2, eps, wd) = (opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay);
    let mut a = LaunchArgs::new().arg(&pp).arg(&pg).arg(&pm).arg(&pv).arg(&pb).arg(&ph).arg(&n_i).arg(&lr).arg(&b1).arg(&b2).arg(&eps).arg(&wd).arg(&step_i);
    launch(&kernel, (blocks, 1, 1), (256, 1, 1), 0, a.as_params())?;
    for (b, name) in [(&gp, "p"), (&gm, "m"), (&gv, "v"), (&gg32, "g")] {
        b.check(name)?;
    }
    gb.check("p_bf16")?;
    gh.check("p_f16")?;
    gg16.check("g bf16")?;
    check_close("p", gp.data(), &to_f64(&pr), 1e-7, 1e-6)?;
    check_close("m", gm.data(), &to_f64(&mr), 1e-10, 1e-6)?;
    check_close("v", gv.data(), &to_f64(&vr), 1e-13, 1e-6)?;
    if copies {
        let pk = gp.data();
        if (0..n).any(|i| gb.data()[i] != half::bf16::from_f32(pk[i]).to_bits() || gh.data()[i] != f16::from_f32(pk[i]).to_bits()) {
            return Err(Error::msg("bf16/f16 copies are not the rounded updated weights"));
        }
    } else if gb.data().iter().any(|&b| b != 0x7fc0) || gh.data().iter().any(|&h| h != 0x7e00) {
        return Err(Error::msg("copies written although their pointers were NULL"));
    }
    Ok(())
}

#[test]
fn adamw_kernels() {
    let mut cases = Vec::new();
    for &n in &[1usize, 7, 45, 65, 1000, 4099] {
        for (bf16_grad, copies) in [(false, true), (true, false), (true, true)] {
            for step in [1u32, 10] {
                let blocks = (n.div_ceil(256) as u32).min(3); // fewer blocks than tiles: grid-stride
                cases.push(AdamCase { n, bf16_grad, copies, step, blocks });
            }
        }
    }
    for_all_cases("adamw", &cases, adamw_case);
}

// ---------------------------------------------------------------- PCA

#[allow(clippy::too_many_arguments)]
fn gemm_launch(a: *const f32, b: *const f32, bias: *const f32, c: *mut f32, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Result<()> {
    let (m_i, n_i, k_i, ta_i, tb_i) = (m as i32, n as i32, k as i32, ta as i32, tb as i32);
    launch(
        "pca_gemm_f32",
        (ceil_div(n, 32), ceil_div(m, 32), 1),
        (256, 1, 1),
        0,
        LaunchArgs::new().arg(&a).arg(&b).arg(&bias).arg(&c).arg(&m_i).arg(&n_i).arg(&k_i).arg(&ta_i).arg(&tb_i).as_params(),
    )
}

/// [rows, cols] -> [cols, rows]
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|e| a[(e % rows) * cols + e / rows]).collect()
}

/// pca_orth_f32 on Qt [k, D].
fn orth_launch(q: *mut f32, d: usize, k: usize) -> Result<()> {
    orth_launch_block(q, d, k, 32 * k as u32)
}
fn orth_launch_block(q: *mut f32, d: usize, k: usize, block: u32) -> Result<()> {
    let (d_i, k_i) = (d as i32, k as i32);
    launch("pca_orth_f32", (1, 1, 1), (block, 1, 1), 0, LaunchArgs::new().arg(&q).arg(&d_i).arg(&k_i).as_params())
}

#[test]
fn pca_gemm_kernel() {
    let cases: Vec<(usize, usize, usize, bool, bool, bool)> = [(1, 1, 1), (7, 33, 45), (65, 59, 70), (45, 4, 128)]
        .iter()
        .flat_map(|&(m, n, k)| [(false, false), (true, false), (false, true), (true, true)].map(move |(ta, tb)| (m, n, k, ta, tb, ta ^ tb)))
        .collect();
    for_all_cases("pca_gemm_f32", &cases, |&(m, n, k, ta, tb, with_bias)| {
        let mut rng = Rng::new((m * n * k) as u64);
        let (a, b, bias) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0), rng.vec(n, -1.0, 1.0));
        let at = |i: usize, p: usize| (if ta { a[p * m + i] } else { a[i * k + p] }) as f64;
        let bt = |p: usize, j: usize| (if tb { b[j * k + p] } else { b[p * n + j] }) as f64;
        let want: Vec<f64> =
            (0..m * n).map(|e| (0..k).map(|p| at(e / n, p) * bt(p, e % n)).sum::<f64>() + if with_bias { bias[e % n] as f64 } else { 0.0 }).collect();
        let (mut ga, mut gb, mut gbias, mut gc) =
            (Guarded::from_slice(&a), Guarded::from_slice(&b), Guarded::from_slice(&bias), Guarded::filled(m * n, f32::NAN));
        let pbias = if with_bias { gbias.ptr() as *const f32 } else { std::ptr::null() };
        gemm_launch(ga.ptr(), gb.ptr(), pbias, gc.ptr(), m, n, k, ta, tb)?;
        for (g, name) in [(&ga, "A"), (&gb, "B"), (&gbias, "bias"), (&gc, "C")] {
            g.check(name)?;
        }
        check_close("C", gc.data(), &want, 1e-5, 1e-5)
    });
}

#[test]
fn pca_orth_kernel_is_the_cpu_gram_schmidt() {
    let cases = [(59usize, 32usize, 1024u32), (59, 32, 256), (65, 4, 32), (128, 32, 96), (33, 32, 1024), (7, 1, 64)];
    for_all_cases("pca_orth_f32", &cases, |&(d, k, block)| {
        let q0 = start_basis(d, k, 7);
        let mut want = q0.clone();
        orthonormalize(&mut want, d, k);
        let mut gq = Guarded::from_slice(&transpose(&q0, d, k));
        orth_launch_block(gq.ptr(), d, k, block)?;
        gq.check("Qt")?;
        let got = transpose(gq.data(), k, d);
        check_orthonormal_or_zero(&got, d, k, 1e-5)?;
        check_close("Q", &got, &to_f64(&want), 1e-5, 1e-4)
    });
}

/// The whole iteration on the emulator (basis kept as Qt = Vᵀ [k, D]); returns (mean, V [D, k], recon).
type PcaOut = (Vec<f32>, Vec<f32>, Vec<f32>);
fn run_pca_emu(x: &[f32], b: usize, d: usize, k: usize, iters: usize) -> Result<PcaOut> {
    let mut gx = Guarded::from_slice(x);
    let (mut xc, mut mu) = (Guarded::filled(b * d, f32::NAN), Guarded::filled(d, f32::NAN));
    let (mut q, mut z) = (Guarded::filled(k * d, f32::NAN), Guarded::filled(k * d, f32::NAN));
    let (mut y, mut recon) = (Guarded::filled(b * k, f32::NAN), Guarded::filled(b * d, f32::NAN));
    let (px, pxc, pmu) = (gx.ptr() as *const f32, xc.ptr(), mu.ptr());
    let (b_i, d_i, k_i, seed) = (b as i32, d as i32, k as i32, 0u32);
    launch("pca_center_f32", (ceil_div(d, 32), 1, 1), (32, 8, 1), 0, LaunchArgs::new().arg(&px).arg(&pxc).arg(&pmu).arg(&b_i).arg(&d_i).as_params())?;
    let pq0 = q.ptr();
    launch("pca_init_f32", (ceil_div(d * k, 256), 1, 1), (256, 1, 1), 0, LaunchArgs::new().arg(&pq0).arg(&d_i).arg(&k_i).arg(&seed).as_params())?;
    if q.data() != transpose(&start_basis(d, k, 0), d, k).as_slice() {
        return Err(Error::msg("pca_init_f32 differs from ops::pca::start_basis (transposed)"));
    }
    let nul = std::ptr::null::<f32>();
    let (mut pq, mut pz) = (q.ptr(), z.ptr());
    for _ in 0..iters {
        gemm_launch(pxc, pq, nul, y.ptr(), b, k, d, false, true)?; // Y = Xc·Qtᵀ
        gemm_launch(y.ptr(), pxc, nul, pz, k, d, b, true, false)?; // Zt = Yᵀ·Xc
        orth_launch(pz, d, k)?;
        std::mem::swap(&mut pq, &mut pz);
    }
    if iters == 0 {
        orth_launch(pq, d, k)?;
    }
    gemm_launch(pxc, pq, nul, y.ptr(), b, k, d, false, true)?;
    gemm_launch(y.ptr(), pq, pmu, recon.ptr(), b, d, k, false, false)?; // X̂ = Y·Qt + μ
    for (g, name) in [(&gx, "X"), (&xc, "Xc"), (&mu, "mu"), (&q, "Qt"), (&z, "Zt"), (&y, "Y"), (&recon, "recon")] {
        g.check(name)?;
    }
    let qt = if iters.is_multiple_of(2) { q.data() } else { z.data() };
    Ok((mu.data().to_vec(), transpose(qt, k, d), recon.data().to_vec()))
}

#[test]
fn pca_kernels_match_exact_eigendecomposition() {
    let mut cases = Vec::new();
    for b in [7usize, 45, 64] {
        for d in [59usize, 65, 128] {
            for k in [4usize, 32] {
                cases.push((b, d, k));
            }
        }
    }
    // inputs and the O(D³) references once per shape, not once per schedule
    let cases: Vec<_> = cases
        .into_iter()
        .map(|(b, d, k)| {
            let rank = (b - 1).min(d);
            let gapped = rank > k;
            let sigma = if gapped { gapped_sigma(k, rank) } else { (0..rank).map(|i| 5.0 - 0.5 * i as f64).collect() };
            let x = spectral_batch(b, d, &sigma, (b * d * k) as u64);
            let want = pca_reference(&x, b, d, k).unwrap();
            PcaCase { b, d, k, gapped, x, want }
        })
        .collect();
    for_all_cases("pca", &cases, |c| {
        let (b, d, k) = (c.b, c.d, c.k);
        let (mean, v, recon) = run_pca_emu(&c.x, b, d, k, 8)?;
        check_close("mean", &mean, &c.want.mean, 1e-6, 1e-6)?;
        check_orthonormal_or_zero(&v, d, k, 1e-4)?;
        // gapped: the SVD reconstruction; rank < k: the subspace holds every row, X̂ = X
        check_close("recon", &recon, &c.want.recon, 1e-4, 1e-4)?;
        if c.gapped {
            let diff = max_abs_diff(&projector(&v, d, k), &projector(&c.want.v, d, k));
            if diff > 1e-4 {
                return Err(Error::msg(format!("projectors differ by {diff}")));
            }
        }
        Ok(())
    });
}

struct PcaCase {
    b: usize,
    d: usize,
    k: usize,
    gapped: bool,
    x: Vec<f32>,
    want: clipforge::ops::pca::PcaRef,
}
impl std::fmt::Debug for PcaCase {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "B {} D {} k {}", self.b, self.d, self.k)
    }
}

#[test]
fn pca_kernels_on_degenerate_inputs_stay_finite() {
    let row = Rng::new(2).vec(65, -1.0, 1.0);
    let cases: Vec<(&str, Vec<f32>, usize, usize, usize)> = vec![
        ("identical rows", row.iter().cycle().take(5 * 65).copied().collect(), 5, 65, 4),
        ("one row", row[..59].to_vec(), 1, 59, 32),
        ("zeros", vec![0.0; 9 * 33], 9, 33, 32),
        ("repeated across k", spectral_batch(64, 59, &[2.0; 40], 3), 64, 59, 32),
    ];
    for_all_cases("pca degenerate", &cases, |(what, x, b, d, k)| {
        let (b, d, k) = (*b, *d, *k);
        let (mean, v, recon) = run_pca_emu(x, b, d, k, 6)?;
        if !mean.iter().chain(&v).chain(&recon).all(|t| t.is_finite()) {
            return Err(Error::msg(format!("{what}: not finite")));
        }
        check_orthonormal_or_zero(&v, d, k, 1e-4)?;
        let want = pca_reference(x, b, d, k)?;
        let optimal: f64 = want.eigenvalues[k..].iter().map(|v| v.max(0.0)).sum();
        let total: f64 = want.eigenvalues.iter().map(|v| v.max(0.0)).sum();
        let missed = residual_energy(x, &recon);
        if missed > optimal + 1e-5 * total + 1e-8 {
            return Err(Error::msg(format!("{what}: misses {missed}, optimum {optimal}")));
        }
        Ok(())
    });
}
