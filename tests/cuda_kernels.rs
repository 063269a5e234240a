//! The production kernels (kernels/*.cu) on the CPU emulator against float64 references:
//! every shape of common::ROWS x common::COLS, every schedule (fwd, rev, random x2),
//! per-element |got - ref| <= atol + rtol*|ref|, NaN/Inf fail, guard canaries on every buffer.
mod emu_common;
use clipforge::{Error, Result};
use emu_common::*;

struct LnInputs {
    x: Vec<f32>, // already bf16-representable when `bf16` was asked for
    res: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
}
fn ln_inputs(rows: usize, cols: usize, bf16: bool) -> LnInputs {
    let mut rng = Rng::new((rows * 1000 + cols) as u64);
    let shift = rng.uniform(-3.0, 3.0); // a row offset: two-pass variance matters
    let mut x = rng.vec(rows * cols, -2.0, 2.0).iter().map(|v| v + shift).collect::<Vec<_>>();
    let mut res = rng.vec(rows * cols, -1.0, 1.0);
    if bf16 {
        (x, res) = (round_bf16(&x), round_bf16(&res));
    }
    LnInputs { x, res, gamma: rng.vec(cols, 0.5, 1.5), beta: rng.vec(cols, -0.5, 0.5) }
}

/// Launches a forward layernorm kernel (plain or residual) in f32 or bf16; returns (x after, y, mean, rstd).
fn run_ln_fwd(kernel: &str, inp: &LnInputs, rows: usize, cols: usize, block: u32, bf16_io: bool) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> {
    let residual = kernel.starts_with("residual");
    let (g, b) = (Guarded::from_slice(&inp.gamma), Guarded::from_slice(&inp.beta));
    let (mut mean, mut rstd) = (Guarded::filled(rows, f32::NAN), Guarded::filled(rows, f32::NAN));
    let (rows_i, cols_i, eps) = (rows as i32, cols as i32, EPS);
    let grid = (ceil_div(rows, (block / 32) as usize), 1, 1);
    let out = if bf16_io {
        let to = |v: &[f32]| v.iter().map(|&x| bf16(x)).collect::<Vec<u16>>();
        let (mut x, mut r, mut y) = (Guarded::from_slice(&to(&inp.x)), Guarded::from_slice(&to(&inp.res)), Guarded::filled(rows * cols, 0x7fc0u16));
        let (px, pr, py) = (x.ptr(), r.ptr(), y.ptr());
        let (pg, pb, pm, ps) = (g.cptr(), b.cptr(), mean.ptr(), rstd.ptr());
        let mut a = LaunchArgs::new().arg(&px);
        if residual {
            a = a.arg(&pr);
        }
        let mut a = a.arg(&pg).arg(&pb).arg(&py).arg(&pm).arg(&ps).arg(&rows_i).arg(&cols_i).arg(&eps);
        launch(kernel, grid, (block, 1, 1), 0, a.as_params())?;
        for (buf, n) in [(&x, "x"), (&r, "residual"), (&y, "y")] {
            buf.check(n)?;
        }
        let back = |v: &[u16]| v.iter().map(|&h| bf16_to_f32(h)).collect::<Vec<f32>>();
        (back(x.data()), back(y.data()), mean.data().to_vec(), rstd.data().to_vec())
    } else {
        let (mut x, mut r, mut y) = (Guarded::from_slice(&inp.x), Guarded::from_slice(&inp.res), Guarded::filled(rows * cols, f32::NAN));
        let (px, pr, py) = (x.ptr(), r.ptr(), y.ptr());
        let (pg, pb, pm, ps) = (g.cptr(), b.cptr(), mean.ptr(), rstd.ptr());
        let mut a = LaunchArgs::new().arg(&px);
        if residual {
            a = a.arg(&pr);
        }
        let mut a = a.arg(&pg).arg(&pb).arg(&py).arg(&pm).arg(&ps).arg(&rows_i).arg(&cols_i).arg(&eps);
        launch(kernel, grid, (block, 1, 1), 0, a.as_params())?;
        for (buf, n) in [(&x, "x"), (&r, "residual"), (&y, "y")] {
            buf.check(n)?;
        }
        (x.data().to_vec(), y.data().to_vec(), mean.data().to_vec(), rstd.data().to_vec())
    };
    g.check("gamma")?;
    b.check("beta")?;
    mean.check("mean")?;
    rstd.check("rstd")?;
    Ok(out)
}

fn ln_fwd_case(kernel: &str, rows: usize, cols: usize, block: u32, bf16_io: bool) -> Result<()> {
    let inp = ln_inputs(rows, cols, bf16_io);
    let residual = kernel.starts_with("residual");
    // x after the residual add, exactly as the kernel must store it (f32 add, then bf16 rounding)
    let mut x_new: Vec<f32> = if residual { inp.x.iter().zip(&inp.res).map(|(a, b)| a + b).collect() } else { inp.x.clone() };
    if bf16_io {
        x_new = round_bf16(&x_new);
    }
    let (want_y, want_mean, want_rstd) = layernorm_ref(&to_f64(&x_new), rows, cols, &inp.gamma, &inp.beta);
    let (x_out, y, mean, rstd) = run_ln_fwd(kernel, &inp, rows, cols, block, bf16_io)?;
    if x_out.iter().zip(&x_new).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(Error::msg("x after the kernel differs from the expected (x + residual) bits"));
    }
    let (atol, rtol) = if bf16_io { (1e-4, half_rtol()) } else { (2e-5, 2e-5) };
    check_close("y", &y, &want_y, atol, rtol)?;
    check_close("mean", &mean, &want_mean, 1e-5, 1e-5)?;
    check_close("rstd", &rstd, &want_rstd, 1e-5, 1e-4)
}

#[test]
fn layernorm_fwd_f32() {
    for_all_shapes("layernorm_fwd_f32", |r, c| ln_fwd_case("layernorm_fwd_f32", r, c, 128, false));
}

#[test]
fn layernorm_fwd_f32_other_block_sizes() {
    for block in [32, 256, 1024] {
        for_all_shapes("layernorm_fwd_f32", |r, c| ln_fwd_case("layernorm_fwd_f32", r, c, block, false).map_err(|e| e.context(format!("block {block}"))));
    }
}

#[test]
fn layernorm_f16_variants() {
    use_f16(true);
    for_all_shapes("layernorm_fwd_f16", |r, c| ln_fwd_case("layernorm_fwd_f16", r, c, 128, true));
    for_all_shapes("residual_layernorm_fwd_f16", |r, c| ln_fwd_case("residual_layernorm_fwd_f16", r, c, 128, true));
    for_all_shapes("layernorm_bwd_f16", |r, c| ln_bwd_case("layernorm_bwd_f16", r, c, 3, true));
}

#[test]
fn bias_act_f16_variants() {
    use_f16(true);
    for_all_shapes("bias_quick_gelu f16", |r, n| bias_act_case("quick_gelu", r, n, true));
    for_all_shapes("bias_gelu f16", |r, n| bias_act_case("gelu", r, n, true));
}

#[test]
fn layernorm_fwd_bf16() {
    for_all_shapes("layernorm_fwd_bf16", |r, c| ln_fwd_case("layernorm_fwd_bf16", r, c, 128, true));
}

#[test]
fn residual_layernorm_fwd_f32() {
    for_all_shapes("residual_layernorm_fwd_f32", |r, c| ln_fwd_case("residual_layernorm_fwd_f32", r, c, 128, false));
}

#[test]
fn residual_layernorm_fwd_bf16() {
    for_all_shapes("residual_layernorm_fwd_bf16", |r, c| ln_fwd_case("residual_layernorm_fwd_bf16", r, c, 128, true));
}

/// layernorm_bwd_<dtype> with `parts` blocks, then layernorm_bwd_reduce_f32.
fn ln_bwd_case(kernel: &str, rows: usize, cols: usize, parts: usize, bf16_io: bool) -> Result<()> {
    let inp = ln_inputs(rows, cols, bf16_io);
    let mut rng = Rng::new(77 + rows as u64);
    let mut dy = rng.vec(rows * cols, -1.0, 1.0);
    if bf16_io {
        dy = round_bf16(&dy);
    }
    let (_, m64, r64) = layernorm_ref(&to_f64(&inp.x), rows, cols, &inp.gamma, &inp.beta);
    let mean: Vec<f32> = m64.iter().map(|&v| v as f32).collect();
    let rstd: Vec<f32> = r64.iter().map(|&v| v as f32).collect();
    // reference with the same saved statistics
    let (mut want_dx, mut want_dg, mut want_db) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
    for r in 0..rows {
        let (m, rs) = (mean[r] as f64, rstd[r] as f64);
        let xhat = |c: usize| (inp.x[r * cols + c] as f64 - m) * rs;
        let gdy = |c: usize| inp.gamma[c] as f64 * dy[r * cols + c] as f64;
        let a = (0..cols).map(gdy).sum::<f64>() / cols as f64;
        let b = (0..cols).map(|c| gdy(c) * xhat(c)).sum::<f64>() / cols as f64;
        for c in 0..cols {
            want_dx[r * cols + c] = rs * (gdy(c) - a - xhat(c) * b);
            want_dg[c] += dy[r * cols + c] as f64 * xhat(c);
            want_db[c] += dy[r * cols + c] as f64;
        }
    }
    let (rows_i, cols_i, parts_i) = (rows as i32, cols as i32, parts as i32);
    let (mut g, mut gm, mut gr) = (Guarded::from_slice(&inp.gamma), Guarded::from_slice(&mean), Guarded::from_slice(&rstd));
    let (mut dgp, mut dbp) = (Guarded::filled(parts * cols, f32::NAN), Guarded::filled(parts * cols, f32::NAN));
    let (mut dg, mut db) = (Guarded::filled(cols, f32::NAN), Guarded::filled(cols, f32::NAN));
    let (pg, pm, pr, pdgp, pdbp) = (g.ptr(), gm.ptr(), gr.ptr(), dgp.ptr(), dbp.ptr());
    let dx: Vec<f32> = if bf16_io {
        let to = |v: &[f32]| v.iter().map(|&x| bf16(x)).collect::<Vec<u16>>();
        let (mut bdy, mut bx, mut bdx) = (Guarded::from_slice(&to(&dy)), Guarded::from_slice(&to(&inp.x)), Guarded::filled(rows * cols, 0x7fc0u16));
        let (pdy, px, pdx) = (bdy.ptr(), bx.ptr(), bdx.ptr());
        let mut a = LaunchArgs::new().arg(&pdy).arg(&px).arg(&pg).arg(&pm).arg(&pr).arg(&pdx).arg(&pdgp).arg(&pdbp).arg(&rows_i).arg(&cols_i);
        launch(kernel, (parts as u32, 1, 1), (128, 1, 1), 0, a.as_params())?;
        bdy.check("dy")?;
        bx.check("x")?;
        bdx.check("dx")?;
        bdx.data().iter().map(|&h| bf16_to_f32(h)).collect()
    } else {
        let (mut bdy, mut bx, mut bdx) = (Guarded::from_slice(&dy), Guarded::from_slice(&inp.x), Guarded::filled(rows * cols, f32::NAN));
        let (pdy, px, pdx) = (bdy.ptr(), bx.ptr(), bdx.ptr());
        let mut a = LaunchArgs::new().arg(&pdy).arg(&px).arg(&pg).arg(&pm).arg(&pr).arg(&pdx).arg(&pdgp).arg(&pdbp).arg(&rows_i).arg(&cols_i);
        launch(kernel, (parts as u32, 1, 1), (128, 1, 1), 0, a.as_params())?;
        bdy.check("dy")?;
        bx.check("x")?;
        bdx.check("dx")?;
        bdx.data().to_vec()
    };
    let (pdg, pdb) = (dg.ptr(), db.ptr());
    let mut a = LaunchArgs::new().arg(&pdgp).arg(&pdbp).arg(&pdg).arg(&pdb).arg(&parts_i).arg(&cols_i);
    launch("layernorm_bwd_reduce_f32", (ceil_div(cols, 256), 1, 1), (256, 1, 1), 0, a.as_params())?;
    for (buf, n) in [(&g, "gamma"), (&gm, "mean"), (&gr, "rstd"), (&dgp, "dgamma_partial"), (&dbp, "dbeta_partial"), (&dg, "dgamma"), (&db, "dbeta")] {
        buf.check(n)?;
    }
    let (atol, rtol) = if bf16_io { (1e-4, half_rtol()) } else { (2e-5, 1e-4) };
    check_close("dx", &dx, &want_dx, atol, rtol)?;
    check_close("dgamma", dg.data(), &want_dg, 1e-4, 1e-4)?;
    check_close("dbeta", db.data(), &want_db, 1e-4, 1e-4)
}

#[test]
fn layernorm_bwd_f32() {
    for parts in [1, 3] {
        for_all_shapes("layernorm_bwd_f32", |r, c| ln_bwd_case("layernorm_bwd_f32", r, c, parts, false).map_err(|e| e.context(format!("{parts} parts"))));
    }
}

#[test]
fn layernorm_bwd_bf16() {
    for_all_shapes("layernorm_bwd_bf16", |r, c| ln_bwd_case("layernorm_bwd_bf16", r, c, 3, true));
}

// ---------------------------------------------------------------- bias + activation
fn quick_gelu(x: f64) -> (f64, f64) {
    let s = 1.0 / (1.0 + (-1.702 * x).exp());
    (x * s, s + 1.702 * x * s * (1.0 - s))
}
fn gelu(x: f64) -> (f64, f64) {
    let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (x * cdf, cdf + x * pdf)
}

fn act_inputs(rows: usize, n: usize, bf16_io: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng::new((rows * 7919 + n) as u64);
    let mut y = rng.vec(rows * n, -6.0, 6.0);
    for (i, v) in y.iter_mut().enumerate().step_by(37) {
        *v = [-90.0, -20.0, 20.0, 90.0][i % 4]; // saturated tails must stay finite
    }
    let mut dy = rng.vec(rows * n, -1.0, 1.0);
    if bf16_io {
        (y, dy) = (round_bf16(&y), round_bf16(&dy));
    }
    (y, rng.vec(n, -1.0, 1.0), dy)
}

/// fwd then bwd (from the saved pre-activation) then bias_grad_reduce_f32.
fn bias_act_case(act: &str, rows: usize, n: usize, bf16_io: bool) -> Result<()> {
    let f: fn(f64) -> (f64, f64) = if act == "quick_gelu" { quick_gelu } else { gelu };
    let suffix = if bf16_io { half_suffix() } else { "f32" };
    let (y0, bias, dy) = act_inputs(rows, n, bf16_io);
    let parts = rows.min(4);
    let grid = (ceil_div(n, 256), parts as u32, 1);
    // the kernel adds in f32; the pre-activation it saves is rounded to the tensor type
    let pre32: Vec<f32> = (0..rows * n).map(|i| y0[i] + bias[i % n]).collect();
    let pre_saved = if bf16_io { round_bf16(&pre32) } else { pre32.clone() };
    let want_y: Vec<f64> = pre32.iter().map(|&v| f(v as f64).0).collect();
    let gpre: Vec<f64> = (0..rows * n).map(|i| dy[i] as f64 * f(pre_saved[i] as f64).1).collect();
    let mut want_db = vec![0.0; n];
    for (i, g) in gpre.iter().enumerate() {
        want_db[i % n] += g;
    }
    let (rows_i, n_i, parts_i) = (rows as i32, n as i32, parts as i32);
    let mut b = Guarded::from_slice(&bias);
    let mut dbp = Guarded::filled(parts * n, f32::NAN);
    let mut db = Guarded::filled(n, f32::NAN);
    let (pb, pdbp, pdb) = (b.ptr(), dbp.ptr(), db.ptr());
    let (y, pre, dpre): (Vec<f32>, Vec<f32>, Vec<f32>) = if bf16_io {
        let to = |v: &[f32]| v.iter().map(|&x| bf16(x)).collect::<Vec<u16>>();
        let back = |v: &[u16]| v.iter().map(|&h| bf16_to_f32(h)).collect::<Vec<f32>>();
        let (mut gy, mut gpre, mut gdy) = (Guarded::from_slice(&to(&y0)), Guarded::filled(rows * n, 0x7fc0u16), Guarded::from_slice(&to(&dy)));
        let (py, ppre, pdy) = (gy.ptr(), gpre.ptr(), gdy.ptr());
        launch(&format!("bias_{act}_fwd_{suffix}"), grid, (256, 1, 1), 0, LaunchArgs::new().arg(&py).arg(&pb).arg(&ppre).arg(&rows_i).arg(&n_i).as_params())?;
        let y = back(gy.data());
        // backward in place: dpre overwrites dy
        launch(
            &format!("bias_{act}_bwd_{suffix}"),
            grid,
            (256, 1, 1),
            0,
            LaunchArgs::new().arg(&pdy).arg(&ppre).arg(&pdy).arg(&pdbp).arg(&rows_i).arg(&n_i).as_params(),
        )?;
        for (buf, name) in [(&gy, "y"), (&gpre, "pre"), (&gdy, "dy/dpre")] {
            buf.check(name)?;
        }
        (y, back(gpre.data()), back(gdy.data()))
    } else {
        let (mut gy, mut gpre, mut gdy, mut gdpre) =
            (Guarded::from_slice(&y0), Guarded::filled(rows * n, f32::NAN), Guarded::from_slice(&dy), Guarded::filled(rows * n, f32::NAN));
        let (py, ppre, pdy, pdpre) = (gy.ptr(), gpre.ptr(), gdy.ptr(), gdpre.ptr());
        launch(&format!("bias_{act}_fwd_{suffix}"), grid, (256, 1, 1), 0, LaunchArgs::new().arg(&py).arg(&pb).arg(&ppre).arg(&rows_i).arg(&n_i).as_params())?;
        launch(
            &format!("bias_{act}_bwd_{suffix}"),
            grid,
            (256, 1, 1),
            0,
            LaunchArgs::new().arg(&pdy).arg(&ppre).arg(&pdpre).arg(&pdbp).arg(&rows_i).arg(&n_i).as_params(),
        )?;
        for (buf, name) in [(&gy, "y"), (&gpre, "pre"), (&gdy, "dy"), (&gdpre, "dpre")] {
            buf.check(name)?;
        }
        if gdy.data().iter().zip(&dy).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(Error::msg("dy was modified by an out-of-place backward"));
        }
        (gy.data().to_vec(), gpre.data().to_vec(), gdpre.data().to_vec())
    };
    launch("bias_grad_reduce_f32", (ceil_div(n, 256), 1, 1), (256, 1, 1), 0, LaunchArgs::new().arg(&pdbp).arg(&pdb).arg(&parts_i).arg(&n_i).as_params())?;
    for (buf, name) in [(&b, "bias"), (&dbp, "dbias_partial"), (&db, "dbias")] {
        buf.check(name)?;
    }
    if pre.iter().zip(&pre_saved).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(Error::msg("saved pre-activation differs from y + b"));
    }
    let (atol, rtol) = if bf16_io { (1e-6, half_rtol()) } else { (1e-6, 1e-5) };
    check_close("y", &y, &want_y, atol, rtol)?;
    check_close("dpre", &dpre, &gpre, atol, rtol)?;
    check_close("dbias", db.data(), &want_db, 1e-4, 1e-5)
}

#[test]
fn bias_quick_gelu_f32() {
    for_all_shapes("bias_quick_gelu f32", |r, n| bias_act_case("quick_gelu", r, n, false));
}
#[test]
fn bias_quick_gelu_bf16() {
    for_all_shapes("bias_quick_gelu bf16", |r, n| bias_act_case("quick_gelu", r, n, true));
}
#[test]
fn bias_gelu_f32() {
    for_all_shapes("bias_gelu f32", |r, n| bias_act_case("gelu", r, n, false));
}
#[test]
fn bias_gelu_bf16() {
    for_all_shapes("bias_gelu bf16", |r, n| bias_act_case("gelu", r, n, true));
}

#[test]
fn every_kernel_is_registered_and_embedded() {
    let names = emu::kernel_names();
    for m in clipforge::cuda::kernels::MODULES {
        assert!(m.source.contains("extern \"C\" __global__"), "{}", m.name);
        for e in m.entry_points {
            assert!(names.iter().any(|n| n == e), "{e} not registered in the emulator");
        }
    }
    assert!(clipforge::cuda::kernels::module_of("layernorm_fwd_f32").is_some());
}

#[test]
fn gpu_modules_match_the_sources() {
    use clipforge::cuda::kernels::{MODULES, NVCC_VERSION};
    for m in MODULES {
        assert_eq!(m.ptx_compute_90.is_some(), NVCC_VERSION.is_some(), "{}", m.name);
        let sms: Vec<u32> = m.cubins.iter().map(|c| c.0).collect();
        let want: &[u32] = if NVCC_VERSION.is_some() { &[80, 86, 89, 90] } else { &[] };
        assert_eq!(sms, want, "{}", m.name);
        if let Some(ptx) = m.ptx_compute_90 {
            assert!(ptx.contains(".target sm_90"), "{}", m.name);
            for e in m.entry_points {
                // extern "C": the PTX entry carries the plain name cuModuleGetFunction looks up
                assert!(ptx.contains(&format!(".entry {e}(")), "{e} missing from {}.ptx", m.name);
            }
        }
        for (_, cubin) in m.cubins {
            assert_eq!(&cubin[..4], b"\x7fELF", "{}", m.name);
        }
    }
}

#[test]
fn production_launcher_packing_runs_on_the_emulator() {
    // The GPU path's KernelArgs + Launcher trait, with the emulator behind it: layernorm_fwd_f32.
    use clipforge::cuda::{emu::EmuLauncher, KernelArgs, LaunchCfg, Launcher};
    let (rows, cols) = (7usize, 65usize);
    let inp = ln_inputs(rows, cols, false);
    let (x, g, b) = (Guarded::from_slice(&inp.x), Guarded::from_slice(&inp.gamma), Guarded::from_slice(&inp.beta));
    let (mut y, mut mean, mut rstd) = (Guarded::filled(rows * cols, f32::NAN), Guarded::filled(rows, f32::NAN), Guarded::filled(rows, f32::NAN));
    let mut args = KernelArgs::new();
    for p in [x.cptr() as u64, g.cptr() as u64, b.cptr() as u64, y.ptr() as u64, mean.ptr() as u64, rstd.ptr() as u64] {
        args = args.ptr(p);
    }
    let mut args = args.i32(rows as i32).i32(cols as i32).f32(EPS);
    let cfg = LaunchCfg::new((ceil_div(rows, 4), 1, 1), (128, 1, 1), 0);
    EmuLauncher.launch("layernorm_fwd_f32", cfg, &mut args).unwrap();
    for r in 0..rows {
        let row = &inp.x[r * cols..(r + 1) * cols];
        let mu = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
        for (c, &xc) in row.iter().enumerate() {
            let want = (xc as f64 - mu) / (var + EPS as f64).sqrt() * inp.gamma[c] as f64 + inp.beta[c] as f64;
            let got = y.data()[r * cols + c] as f64;
            assert!((got - want).abs() <= 1e-5 + 1e-5 * want.abs(), "row {r} col {c}: {got} vs {want}");
        }
    }
    y.check("y").unwrap();
}
