//! The emulator itself: planted bugs (kernels/buggy/) must be caught, CUDA semantics probes,
//! launch API errors, concurrent launches from several test threads.
//! Run with `--nocapture` to see which schedule caught which bug.
mod emu_common;
use clipforge::Result;
use emu_common::*;

/// What one run of a layernorm-forward-shaped f32 kernel showed.
#[derive(Default, Debug)]
struct Findings {
    launch_error: Option<String>,
    canary: Option<String>,
    values: Option<String>,
}
impl Findings {
    fn caught(&self) -> bool {
        self.launch_error.is_some() || self.canary.is_some() || self.values.is_some()
    }
    fn summary(&self) -> String {
        let mut v = Vec::new();
        if let Some(e) = &self.launch_error {
            v.push(format!("launch error: {e}"));
        }
        if let Some(e) = &self.canary {
            v.push(format!("guard canary: {e}"));
        }
        if let Some(e) = &self.values {
            v.push(format!("wrong values: {e}"));
        }
        if v.is_empty() {
            "NOT CAUGHT".into()
        } else {
            v.join("; ")
        }
    }
}

/// Runs a kernel with layernorm_fwd_f32's signature; `grid_rows` = rows per block (1 for the
/// block-per-row kernels, blockDim/32 for the warp-per-row ones).
fn ln_run(kernel: &str, rows: usize, cols: usize, block: u32, rows_per_block: usize) -> Findings {
    let mut rng = Rng::new(4242 + cols as u64);
    let x = rng.vec(rows * cols, -2.0, 2.0).iter().map(|v| v + 1.5).collect::<Vec<f32>>();
    let (gamma, beta) = (rng.vec(cols, 0.5, 1.5), rng.vec(cols, -0.5, 0.5));
    let (want_y, want_m, want_r) = layernorm_ref(&to_f64(&x), rows, cols, &gamma, &beta);
    let (mut gx, mut gg, mut gb) = (Guarded::from_slice(&x), Guarded::from_slice(&gamma), Guarded::from_slice(&beta));
    let (mut y, mut m, mut r) = (Guarded::filled(rows * cols, f32::NAN), Guarded::filled(rows, f32::NAN), Guarded::filled(rows, f32::NAN));
    let (px, pg, pb, py, pm, pr) = (gx.ptr(), gg.ptr(), gb.ptr(), y.ptr(), m.ptr(), r.ptr());
    let (ri, ci, eps) = (rows as i32, cols as i32, EPS);
    let mut args = LaunchArgs::new().arg(&px).arg(&pg).arg(&pb).arg(&py).arg(&pm).arg(&pr).arg(&ri).arg(&ci).arg(&eps);
    let mut f = Findings::default();
    if let Err(e) = launch(kernel, (ceil_div(rows, rows_per_block), 1, 1), (block, 1, 1), 0, args.as_params()) {
        f.launch_error = Some(e.to_string());
        return f;
    }
    let canaries = [gx.check("x"), gg.check("gamma"), gb.check("beta"), y.check("y"), m.check("mean"), r.check("rstd")];
    f.canary = canaries.into_iter().find_map(|c| c.err()).map(|e| e.to_string());
    f.values = check_close("y", y.data(), &want_y, 2e-5, 2e-5)
        .and_then(|_| check_close("mean", m.data(), &want_m, 1e-5, 1e-5))
        .and_then(|_| check_close("rstd", r.data(), &want_r, 1e-5, 1e-4))
        .err()
        .map(|e| e.to_string());
    f
}

/// Runs the kernel in every schedule and prints what each one showed.
fn per_schedule(label: &str, run: impl Fn() -> Findings) -> Vec<(Schedule, Findings)> {
    let out: Vec<(Schedule, Findings)> = TEST_SCHEDULES
        .iter()
        .map(|&s| {
            set_schedule(s);
            (s, run())
        })
        .collect();
    set_schedule(Schedule::Forward);
    for (s, f) in &out {
        println!("[{label}] {:<10} {}", sched_name(*s), f.summary());
    }
    out
}

#[test]
fn bug_free_twins_pass_in_every_schedule() {
    for (rows, cols, block) in [(1, 1, 32), (7, 59, 128), (45, 1000, 128), (3, 768, 1024)] {
        for (s, f) in per_schedule("ln_block_f32 control", || ln_run("ln_block_f32", rows, cols, block, 1)) {
            assert!(!f.caught(), "ln_block_f32 {rows}x{cols} block {block} {}: {}", sched_name(s), f.summary());
        }
    }
}

#[test]
fn planted_a_missing_syncthreads_gives_wrong_results() {
    let runs = per_schedule("(a) missing __syncthreads", || ln_run("ln_bug_missing_sync_f32", 7, 1000, 128, 1));
    assert!(runs.iter().any(|(_, f)| f.caught()), "missing barrier not caught in any schedule");
    // no false diagnosis: this bug is a race, not a deadlock
    assert!(runs.iter().all(|(_, f)| f.launch_error.is_none()));
}

/// A race that launch order hides: the forward schedule runs warp w−1 before warp w, so the
/// missing barrier goes unnoticed there; reverse and random orders read stale shared memory.
/// This is what the other schedules are for (a `set_schedule` that did nothing fails here).
#[test]
fn planted_f_a_race_only_other_schedules_catch() {
    let k = 8usize;
    let x: Vec<f32> = (0..k).map(|i| 10.0 + i as f32).collect();
    let want: Vec<f32> = (0..k).map(|w| if w == 0 { 0.0 } else { x[w - 1] }).collect();
    let runs = per_schedule("(f) race hidden by launch order", || {
        let (mut gx, mut gy) = (Guarded::from_slice(&x), Guarded::filled(k, f32::NAN));
        let (px, py) = (gx.ptr(), gy.ptr());
        let mut f = Findings::default();
        if let Err(e) = launch("bug_prev_warp_race_f32", (1, 1, 1), (32 * k as u32, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&py).as_params()) {
            f.launch_error = Some(e.to_string());
            return f;
        }
        f.values = (gy.data() != want.as_slice()).then(|| format!("y = {:?}", gy.data()));
        f
    });
    for (s, f) in &runs {
        match s {
            Schedule::Forward => assert!(!f.caught(), "forward order hides this race, yet: {}", f.summary()),
            _ => assert!(f.caught(), "{} did not catch the race", sched_name(*s)),
        }
    }
}

#[test]
fn planted_b_divergent_syncthreads_is_a_launch_error() {
    for (s, f) in per_schedule("(b) divergent __syncthreads", || ln_run("ln_bug_divergent_sync_f32", 7, 1000, 128, 1)) {
        let e = f.launch_error.unwrap_or_else(|| panic!("{}: no launch error", sched_name(s)));
        assert!(e.contains("__syncthreads") && (e.contains("deadlock") || e.contains("divergent")), "{e}");
    }
}

#[test]
fn planted_c_out_of_bounds_write_hits_the_guard_canary() {
    let runs = per_schedule("(c) off-by-one write", || ln_run("ln_bug_oob_f32", 7, 59, 128, 4));
    for (s, f) in &runs {
        let c = f.canary.as_deref().unwrap_or_else(|| panic!("{}: canary intact", sched_name(*s)));
        assert!(c.starts_with("y: out-of-bounds write at element 413"), "{c}"); // 7*59
    }
}

#[test]
fn planted_d_divergent_shuffle_is_a_launch_error() {
    for s in TEST_SCHEDULES {
        set_schedule(s);
        let mut x = Guarded::from_slice(&vec![1.0f32; 64]);
        let px = x.ptr();
        let e = launch("bug_divergent_shfl_f32", (1, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).as_params()).unwrap_err().to_string();
        println!("[(d) divergent shuffle] {:<10} {e}", sched_name(s));
        assert!(e.contains("__shfl_xor_sync") && (e.contains("exited") || e.contains("deadlock")), "{e}");
    }
    set_schedule(Schedule::Forward);
}

fn smem_reverse(kernel: &str, n: usize) -> Result<Vec<f32>> {
    // n + 1 inputs: the overrun kernel also loads x[n], which the guard page would report first
    let x: Vec<f32> = (0..=n).map(|i| i as f32).collect();
    let (mut gx, mut gy) = (Guarded::from_slice(&x), Guarded::filled(n, f32::NAN));
    let (px, py, ni) = (gx.ptr(), gy.ptr(), n as i32);
    launch(kernel, (1, 1, 1), (128, 1, 1), (n * 4) as u32, LaunchArgs::new().arg(&px).arg(&py).arg(&ni).as_params())?;
    gx.check("x")?;
    gy.check("y")?;
    Ok(gy.data().to_vec())
}

#[test]
fn planted_e_dynamic_smem_overrun_is_a_launch_error() {
    for s in TEST_SCHEDULES {
        set_schedule(s);
        let y = smem_reverse("smem_reverse_f32", 1000).unwrap();
        assert!(y.iter().enumerate().all(|(i, &v)| v == (999 - i) as f32));
        let e = smem_reverse("bug_smem_overrun_f32", 1000).unwrap_err().to_string();
        println!("[(e) dyn smem overrun] {:<10} {e}", sched_name(s));
        assert!(e.contains("dynamic shared memory"), "{e}");
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn trap_is_a_launch_error() {
    let mut flags = Guarded::filled(64, 0i32);
    let p = flags.ptr();
    let e = launch("bug_trap_i32", (1, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&p).as_params()).unwrap_err().to_string();
    assert!(e.contains("__trap()") && e.contains("thread (5,0,0)"), "{e}");
}

#[test]
fn collectives_follow_cuda_semantics() {
    for s in TEST_SCHEDULES {
        set_schedule(s);
        let mut out = Guarded::filled(64 * 16, 0u32);
        let (p, k) = (out.ptr(), 1000i32);
        launch("probe_collectives", (1, 1, 1), (64, 1, 1), 256, LaunchArgs::new().arg(&p).arg(&k).as_params()).unwrap();
        out.check("out").unwrap();
        for t in 0..64u32 {
            let (lane, base) = (t % 32, t - t % 32);
            let want = [
                (base + 3) * 10,
                if lane % 16 == 0 { t } else { t - 1 },
                if lane % 8 + 2 >= 8 { t } else { t + 2 },
                t ^ 5,
                0xAAAA_AAAA,
                1,
                0,
                496,
                22,
                if lane < 8 { 14 } else { 0 },
                base + (lane + 8) % 32,
                0xFFFF_FFFF,
                0xFFFF_FFFF,
                (-5i32) as u32,
                1000 + t,
                1,
            ];
            let got = &out.data()[t as usize * 16..t as usize * 16 + 16];
            assert_eq!(got, &want, "thread {t}, schedule {}", sched_name(s));
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn file_scope_extern_shared() {
    let mut out = Guarded::filled(96, 0u32);
    let p = out.ptr();
    launch("probe_file_scope_smem", (1, 1, 1), (96, 1, 1), 96 * 4, LaunchArgs::new().arg(&p).as_params()).unwrap();
    out.check("out").unwrap();
    assert!(out.data().iter().enumerate().all(|(t, &v)| v == 95 - t as u32));
}

#[test]
fn thread_and_block_indices_in_3d() {
    let (grid, block) = ((2u32, 3u32, 2u32), (4u32, 2u32, 3u32));
    let n = (grid.0 * grid.1 * grid.2 * block.0 * block.1 * block.2) as usize;
    for s in TEST_SCHEDULES {
        set_schedule(s);
        let mut out = Guarded::filled(6 * n, u32::MAX);
        let p = out.ptr();
        launch("probe_indices", grid, block, 0, LaunchArgs::new().arg(&p).as_params()).unwrap();
        out.check("out").unwrap();
        let mut g = 0;
        for (bz, by, bx) in (0..grid.2).flat_map(|z| (0..grid.1).flat_map(move |y| (0..grid.0).map(move |x| (z, y, x)))) {
            for (tz, ty, tx) in (0..block.2).flat_map(|z| (0..block.1).flat_map(move |y| (0..block.0).map(move |x| (z, y, x)))) {
                assert_eq!(&out.data()[6 * g..6 * g + 6], &[tx, ty, tz, bx, by, bz]);
                g += 1;
            }
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn launch_api_errors() {
    let mut x = vec![0f32; 64];
    let px = x.as_mut_ptr();
    let e = launch("no_such_kernel", (1, 1, 1), (32, 1, 1), 0, &mut []).unwrap_err().to_string();
    assert!(e.contains("no kernel named"), "{e}");
    let e = launch("bug_divergent_shfl_f32", (1, 1, 1), (32, 1, 1), 0, &mut []).unwrap_err().to_string();
    assert!(e.contains("takes 1 parameters, 0 given"), "{e}");
    for (grid, block, smem) in [((1, 1, 1), (2048, 1, 1), 0), ((1, 1, 1), (0, 1, 1), 0), ((1, 70000, 1), (32, 1, 1), 0), ((1, 1, 1), (32, 1, 1), 1 << 20)] {
        let e = launch("bug_divergent_shfl_f32", grid, block, smem, LaunchArgs::new().arg(&px).as_params()).unwrap_err().to_string();
        assert!(e.contains("invalid launch configuration"), "{e}");
    }
    assert_eq!(emu::kernel_arity("layernorm_fwd_f32"), Some(9));
    assert_eq!(emu::kernel_arity("nope"), None);
}

#[test]
fn launches_from_parallel_threads_do_not_interfere() {
    let workers: Vec<_> = TEST_SCHEDULES
        .into_iter()
        .map(|s| {
            std::thread::spawn(move || {
                set_schedule(s);
                for _ in 0..5 {
                    let f = ln_run("ln_block_f32", 45, 768, 256, 1);
                    assert!(!f.caught(), "{}: {}", sched_name(s), f.summary());
                    let f = ln_run("layernorm_fwd_f32", 45, 768, 128, 4);
                    assert!(!f.caught(), "{}: {}", sched_name(s), f.summary());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

/// Row sums of `blocks * tiles` tiles of 16×64 floats through a cp.async kernel of
/// kernels/buggy/cp_async_no_wait.cu. Err on a launch error or a wrong/non-finite sum.
fn cpasync_rowsum(kernel: &str, blocks: u32, tiles: i32) -> Result<()> {
    let rows = blocks as usize * tiles as usize * 16;
    let x = Rng::new(77).vec(rows * 64, -1.0, 1.0);
    let want: Vec<f64> = x.chunks(64).map(|r| r.iter().map(|&v| v as f64).sum()).collect();
    let (mut gx, mut gy) = (Guarded::from_slice(&x), Guarded::filled(rows, f32::NAN));
    let (px, py) = (gx.ptr(), gy.ptr());
    launch(kernel, (blocks, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&py).arg(&tiles).as_params())?;
    gx.check("x")?;
    gy.check("y")?;
    check_close("y", gy.data(), &want, 1e-5, 1e-5)
}

#[test]
fn cp_async_groups_land_at_the_wait() {
    for (blocks, tiles) in [(1, 1), (3, 2), (2, 5)] {
        for_all_cases("cpasync_rowsum_f32", &[(blocks, tiles)], |&(b, t)| cpasync_rowsum("cpasync_rowsum_f32", b, t));
    }
    for (kernel, tiles) in [("bug_cpasync_no_wait_f32", 1), ("bug_cpasync_no_wait_f32", 3), ("bug_cpasync_wait1_f32", 1), ("bug_cpasync_wait1_f32", 4)] {
        for s in TEST_SCHEDULES {
            set_schedule(s);
            let e = cpasync_rowsum(kernel, 3, tiles).expect_err("a missing cp.async wait went unnoticed").to_string();
            println!("[cp.async {kernel} tiles {tiles}] {:<10} {e}", sched_name(s));
            assert!(e.contains("not finite"), "{e}");
        }
    }
    set_schedule(Schedule::Forward);
}

/// Runs a kernel of kernels/buggy/interblock_race.cu over `blocks` blocks of 64 threads.
/// `counter`: the kernel adds every block's sum into one float (want: the total); otherwise it
/// writes running block sums (want: their prefix sums). Err on a wrong value.
fn interblock(kernel: &str, blocks: usize, counter: bool) -> Result<()> {
    let x = Rng::new(99).vec(blocks * 64, 0.0, 1.0);
    let sums: Vec<f64> = x.chunks(64).map(|c| c.iter().map(|&v| v as f64).sum()).collect();
    let mut gx = Guarded::from_slice(&x);
    let px = gx.ptr();
    if counter {
        let mut total = Guarded::filled(1, 0f32);
        let pt = total.ptr();
        launch(kernel, (blocks as u32, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&pt).as_params())?;
        total.check("total")?;
        return check_close("total", total.data(), &[sums.iter().sum()], 1e-4, 1e-5);
    }
    let want: Vec<f64> = sums
        .iter()
        .scan(0.0, |a, s| {
            *a += s;
            Some(*a)
        })
        .collect();
    let mut carry = Guarded::filled(blocks, f32::NAN);
    let pc = carry.ptr();
    if kernel == "block_sums_f32" {
        let mut partial = Guarded::filled(blocks, f32::NAN);
        let (pp, n) = (partial.ptr(), blocks as i32);
        launch(kernel, (blocks as u32, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&pp).as_params())?;
        launch("carry_scan_f32", (1, 1, 1), (32, 1, 1), 0, LaunchArgs::new().arg(&pp).arg(&pc).arg(&n).as_params())?;
    } else {
        launch(kernel, (blocks as u32, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&pc).as_params())?;
    }
    carry.check("carry")?;
    check_close("carry", carry.data(), &want, 1e-4, 1e-5)
}

#[test]
fn planted_g_inter_block_races_show_with_interleaved_blocks() {
    for blocks in [1, 3, 10] {
        for_all_cases("counter_atomic_f32", &[blocks], |&b| interblock("counter_atomic_f32", b, true));
        for_all_cases("block_sums_f32 + carry_scan_f32", &[blocks], |&b| interblock("block_sums_f32", b, false));
    }
    for (kernel, counter) in [("bug_counter_rmw_f32", true), ("bug_chained_carry_f32", false)] {
        let runs: Vec<(Schedule, Option<String>)> = TEST_SCHEDULES
            .iter()
            .map(|&s| {
                set_schedule(s);
                (s, interblock(kernel, 10, counter).err().map(|e| e.to_string()))
            })
            .collect();
        for (s, e) in &runs {
            println!("[(g) {kernel}] {:<10} {}", sched_name(*s), e.as_deref().unwrap_or("NOT CAUGHT"));
        }
        assert!(runs.iter().any(|(_, e)| e.is_some()), "{kernel}: inter-block race not caught in any schedule");
    }
    // The lost update needs blocks in flight together: one block at a time hides it.
    set_schedule(Schedule::Forward);
    emu::set_resident_blocks(1);
    let one_at_a_time = interblock("bug_counter_rmw_f32", 10, true);
    emu::set_resident_blocks(4);
    assert!(one_at_a_time.is_ok(), "{one_at_a_time:?}");
    assert!(interblock("bug_counter_rmw_f32", 10, true).is_err());
}

fn pair_sum(kernel: &str, n: usize) -> Result<Vec<f32>> {
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let (mut gx, mut gy) = (Guarded::from_slice(&x), Guarded::filled(n, f32::NAN));
    let (px, py, ni) = (gx.ptr(), gy.ptr(), n as i32);
    launch(kernel, (ceil_div(n, 128), 1, 1), (128, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&py).arg(&ni).as_params())?;
    gx.check("x")?;
    gy.check("y")?;
    Ok(gy.data().to_vec())
}

#[test]
fn planted_h_out_of_bounds_global_reads_and_writes_fail_the_launch() {
    let n = 1000usize; // a multiple of 4: x[n] is on the guard page
    let want: Vec<f32> = (0..n).map(|i| if i + 1 < n { (2 * i + 1) as f32 } else { i as f32 }).collect();
    for s in TEST_SCHEDULES {
        set_schedule(s);
        assert_eq!(pair_sum("pair_sum_f32", n).unwrap(), want);
        for _ in 0..2 {
            // twice: the guard page is protected again after the failed launch
            let e = pair_sum("bug_oob_read_f32", n).unwrap_err().to_string();
            println!("[(h) oob read] {:<10} {e}", sched_name(s));
            assert!(e.contains("out-of-bounds read at byte offset 4000 of a 4000-byte buffer (0 bytes past its end) by block (7,0,0) thread (103,0,0)"), "{e}");
        }
        let e = pair_sum("bug_oob_write_f32", n).unwrap_err().to_string();
        println!("[(h) oob write] {:<10} {e}", sched_name(s));
        assert!(e.contains("out-of-bounds write at byte offset 40") && e.contains("of a 4000-byte buffer"), "{e}");
    }
    set_schedule(Schedule::Forward);
    // cp.async reads its source at issue: a source one row short faults there
    let x = vec![1f32; 15 * 64];
    let (mut gx, mut gy) = (Guarded::from_slice(&x), Guarded::filled(16, f32::NAN));
    let (px, py, tiles) = (gx.ptr(), gy.ptr(), 1i32);
    let e = launch("cpasync_rowsum_f32", (1, 1, 1), (64, 1, 1), 0, LaunchArgs::new().arg(&px).arg(&py).arg(&tiles).as_params()).unwrap_err().to_string();
    assert!(e.contains("out-of-bounds read at byte offset 3840 of a 3840-byte buffer"), "{e}");
}
