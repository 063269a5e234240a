//! The data-parallel transports and launcher without GPUs: the TCP collective with ranks as
//! threads on 127.0.0.1 (rank-ordered gather and sum, broadcast, barrier, device buckets through
//! the emulator, abort, a vanished rank, a refused hello, timeouts), the launcher variables of
//! torchrun / srun / mpirun, `spawn_local` with /bin/sh children, and NCCL's error paths.
use clipforge::cuda::{DeviceOps, EmuOps};
use clipforge::dist::launch::{free_port, spawn_local, RankEnv, DEFAULT_PORT};
use clipforge::dist::nccl::{self, NcclCollective};
use clipforge::dist::tcp::TcpGroup;
use clipforge::dist::Collective;
use clipforge::error::Result;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const JOIN: Duration = Duration::from_secs(30);

fn env(rank: usize, world: usize, port: u16) -> RankEnv {
    RankEnv { rank, world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

/// Runs `f(rank, group)` on `world` threads, one rank each (rank `claims[i]` with world
/// `worlds[i]` on thread i); results in thread order. Panics (instead of hanging) after `JOIN`.
fn threads<T: Send + 'static>(claims: &[(usize, usize)], f: impl Fn(usize, Result<TcpGroup>) -> T + Send + Sync + 'static) -> Vec<T> {
    let port = free_port().unwrap();
    let f = std::sync::Arc::new(f);
    let (tx, rx) = mpsc::channel();
    for (i, &(rank, world)) in claims.iter().enumerate() {
        let (tx, f) = (tx.clone(), f.clone());
        std::thread::spawn(move || {
            let g = TcpGroup::connect(&env(rank, world, port), Duration::from_secs(10));
            let _ = tx.send((i, f(rank, g)));
        });
    }
    let deadline = Instant::now() + JOIN;
    let mut out: Vec<Option<T>> = claims.iter().map(|_| None).collect();
    for _ in claims {
        let (i, v) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a rank hung");
        out[i] = Some(v);
    }
    out.into_iter().map(|v| v.unwrap()).collect()
}

fn world(n: usize) -> Vec<(usize, usize)> {
    (0..n).map(|r| (r, n)).collect()
}

/// Per-rank data whose sum depends on the order of the additions.
fn data(rank: usize) -> Vec<f32> {
    let big = [1.0e8f32, 1.0, -1.0e8];
    (0..37).map(|i| big[(rank + i) % 3] * (1.0 + i as f32 * 0.37) + rank as f32 * 0.25).collect()
}

#[test]
fn three_ranks_gather_sum_broadcast_and_barrier_in_rank_order() {
    let out = threads(&world(3), |rank, g| -> Result<_> {
        let g = g?;
        assert_eq!((g.rank(), g.world()), (rank, 3));
        let gathered = g.all_gather(&[rank as f32 * 10.0, rank as f32 * 10.0 + 1.0])?;
        let mut sum = data(rank);
        g.all_reduce_sum(&mut sum)?;
        let id = g.broadcast_bytes(if rank == 0 { Some(b"the unique id".as_slice()) } else { None })?;
        g.barrier()?;
        // a bucket of two device buffers through the default all_reduce_device (emulator)
        let ops = EmuOps;
        let mut a = ops.upload(&[rank as f32, 1.0, 2.0])?;
        let mut b = ops.upload(&data(rank)[..5])?;
        g.all_reduce_device(&ops, &mut [&mut a, &mut b])?;
        let dev = (ops.download(&a)?, ops.download(&b)?);
        g.barrier()?;
        Ok((gathered, sum, id, dev))
    });
    let rank_ordered: Vec<f32> = (0..37).map(|i| (data(0)[i] + data(1)[i]) + data(2)[i]).collect();
    let other_order: Vec<f32> = (0..37).map(|i| data(0)[i] + (data(1)[i] + data(2)[i])).collect();
    assert_ne!(rank_ordered, other_order, "the data must tell the orders apart");
    for (rank, r) in out.into_iter().enumerate() {
        let (gathered, sum, id, (a, b)) = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert_eq!(gathered, vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&sum), bits(&rank_ordered), "rank {rank}: the sum must be 0 + 1 + 2 in that order");
        assert_eq!(id, b"the unique id");
        assert_eq!(a, vec![3.0, 3.0, 6.0]);
        assert_eq!(bits(&b), bits(&rank_ordered[..5]));
    }
}

#[test]
fn an_abort_reaches_every_rank_with_its_name() {
    // rank 2 fails before the barrier the others wait in; later calls fail too
    let out = threads(&world(3), |rank, g| {
        let g = g.unwrap();
        if rank == 2 {
            std::thread::sleep(Duration::from_millis(200)); // the others are already waiting
            g.abort("out of device memory");
            return g.barrier().unwrap_err().to_string();
        }
        let first = g.barrier().unwrap_err().to_string();
        let later = g.all_gather(&[1.0]).unwrap_err().to_string();
        assert_eq!(first, later);
        first
    });
    for m in out {
        assert_eq!(m, "rank 2 failed: out of device memory");
    }
    // rank 0 fails: the others, blocked in an all-gather, hear it
    let out = threads(&world(3), |rank, g| {
        let g = g.unwrap();
        if rank == 0 {
            std::thread::sleep(Duration::from_millis(200));
            g.abort("bad batch");
            return String::new();
        }
        g.all_gather(&[1.0]).unwrap_err().to_string()
    });
    assert_eq!(out[1..], ["rank 0 failed: bad batch", "rank 0 failed: bad batch"]);
}

#[test]
fn a_vanished_rank_is_an_error_not_a_hang() {
    for gone in [1usize, 0] {
        let out = threads(&world(3), move |rank, g| {
            let g = g.unwrap();
            if rank == gone {
                drop(g); // its process ended: the sockets close
                return None;
            }
            let mut x = vec![1.0f32; 4];
            let e = g.all_reduce_sum(&mut x).unwrap_err().to_string();
            Some(e)
        });
        for (rank, m) in out.into_iter().enumerate() {
            if rank != gone {
                assert_eq!(m.as_deref(), Some(format!("rank {gone} disconnected: its process ended").as_str()), "rank {rank}");
            }
        }
    }
}

#[test]
fn the_rendezvous_refuses_ranks_that_do_not_fit() {
    // a world-size mismatch: both sides get the same line
    let out = threads(&[(0, 2), (1, 3)], |_, g| g.map(|_| ()).unwrap_err().to_string());
    for m in &out {
        assert!(m.contains("says WORLD_SIZE=3 but rank 0 has WORLD_SIZE=2"), "{m}");
    }
    // two processes with the same rank
    let out = threads(&[(0, 3), (1, 3), (1, 3)], |_, g| g.map(|_| ()).unwrap_err().to_string());
    for m in &out {
        assert!(m.contains("two processes say they are rank 1"), "{m}");
    }
}

#[test]
fn rendezvous_timeouts_name_what_is_missing() {
    let t = Instant::now();
    // rank 0 alone in a world of 3 times out; a drawn port that something else took between
    // `free_port`'s probe and rank 0's listen (seen twice in CI) is drawn again, not a failure
    let (port, e) = (0..5)
        .map(|_| {
            let port = free_port().unwrap();
            (port, TcpGroup::connect(&env(0, 3, port), Duration::from_millis(300)).map(|_| ()).unwrap_err().to_string())
        })
        .find(|(_, e)| !e.contains("Address already in use"))
        .expect("five drawn ports were all in use");
    assert!(e.contains("for rank(s) 1, 2 of 3"), "{e}");
    let e = TcpGroup::connect(&env(1, 3, port), Duration::from_millis(300)).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("rank 1 could not reach rank 0 at 127.0.0.1:"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // one rank needs no network at all
    let g = TcpGroup::connect(&env(0, 1, port), Duration::from_millis(1)).unwrap();
    let mut x = vec![2.5f32];
    g.all_reduce_sum(&mut x).unwrap();
    assert_eq!((x, g.all_gather(&[1.0]).unwrap()), (vec![2.5], vec![1.0]));
}

fn vars(pairs: &[(&str, &str)]) -> Result<Option<RankEnv>> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    RankEnv::from_vars(&move |k: &str| m.get(k).cloned())
}

#[test]
fn launcher_variables_of_torchrun_srun_and_mpirun() {
    assert_eq!(vars(&[]).unwrap(), None);
    let torchrun = vars(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3"), ("MASTER_ADDR", "node1"), ("MASTER_PORT", "1234")]).unwrap();
    assert_eq!(torchrun, Some(RankEnv { rank: 3, world: 8, local_rank: 3, master_addr: "node1".into(), master_port: 1234 }));
    let srun = vars(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "10.0.0.1")]).unwrap();
    assert_eq!(srun, Some(RankEnv { rank: 5, world: 8, local_rank: 1, master_addr: "10.0.0.1".into(), master_port: DEFAULT_PORT }));
    // the step's task count wins over the allocation's
    let step = vars(&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "16"), ("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_LOCALID", "1"), ("MASTER_ADDR", "h")]).unwrap();
    assert_eq!(step.map(|e| e.world), Some(2));
    let ompi = vars(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0"), ("MASTER_ADDR", "h")]).unwrap();
    assert_eq!(ompi.map(|e| (e.rank, e.world, e.local_rank)), Some((2, 4, 0)));
    let mpich = vars(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MPI_LOCALRANKID", "1"), ("MASTER_ADDR", "h")]).unwrap();
    assert_eq!(mpich.map(|e| (e.rank, e.world, e.local_rank)), Some((1, 2, 1)));
    // torchrun's variables win over a surrounding allocation's
    let both = vars(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap();
    assert_eq!(both.map(|e| (e.rank, e.world)), Some((1, 2)));
    // one process needs no MASTER_ADDR
    assert_eq!(vars(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().map(|e| (e.master_addr, e.local_rank)), Some(("127.0.0.1".into(), 0)));
}

#[test]
fn bad_launcher_variables_are_one_line_errors_naming_them() {
    let err = |pairs: &[(&str, &str)]| vars(pairs).unwrap_err().to_string();
    let cases: [(&[(&str, &str)], &str); 8] = [
        (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")], "MASTER_ADDR is not set"),
        (&[("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "1")], "MASTER_ADDR is not set"),
        (&[("RANK", "one"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], "RANK=\"one\" is not a non-negative integer"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h")], "RANK=2 is not below WORLD_SIZE=2"),
        (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
        (&[("WORLD_SIZE", "2")], "RANK is not"),
        (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")], "LOCAL_RANK is not set"),
        (&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "70000")], "MASTER_PORT=\"70000\""),
    ];
    for (pairs, want) in cases {
        let e = err(pairs);
        assert!(e.contains(want) && !e.contains('\n'), "{pairs:?}: {e}");
    }
}

fn sh(script: &str) -> Vec<OsString> {
    vec!["-c".into(), script.into()]
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("clipforge-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The processes of group `pgid` that are not zombies: "pid state name".
fn live_in_group(pgid: i32) -> Vec<String> {
    let mut out = vec![];
    for d in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(d.path().join("stat")) else { continue };
        // pid (comm) state ppid pgrp ...
        let Some(close) = stat.rfind(')') else { continue };
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" {
            out.push(format!("{} {} {}", d.file_name().to_string_lossy(), f[0], &stat[..close + 1]));
        }
    }
    out
}

/// The launcher tests run one at a time: a Ctrl-C test must not reach another test's children.
static SPAWN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_launch() -> std::sync::MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn ctrl_c_is_forwarded_and_the_launcher_waits_for_the_ranks() {
    let _one = one_launch();
    let dir = scratch("int");
    let d = dir.display();
    // each rank "checkpoints" on SIGINT (writes a file a little later) and exits 0
    let script = format!("trap 'sleep 0.3; echo saved > {d}/saved.$RANK; kill $! 2>/dev/null; exit 0' INT; sleep 30 & touch {d}/ready.$RANK; wait $!");
    let run = std::thread::spawn(move || spawn_local(Path::new("/bin/sh"), &sh(&script), 2));
    let until = Instant::now() + Duration::from_secs(10);
    while !(dir.join("ready.0").exists() && dir.join("ready.1").exists()) {
        assert!(Instant::now() < until, "the ranks did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: SIGINT to this process: spawn_local's handler (installed before the ranks
    // started) counts it; nothing else here handles SIGINT.
    unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
    let r = run.join().unwrap();
    assert!(matches!(&r, Err(clipforge::error::Error::Interrupted(m)) if m == "interrupted: all 2 ranks stopped"), "{r:?}");
    for rank in 0..2 {
        assert!(dir.join(format!("saved.{rank}")).exists(), "rank {rank} did not checkpoint before the launcher returned");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failing_rank_stops_the_others_and_is_the_error() {
    let _one = one_launch();
    let dir = scratch("fail");
    // rank 1 fails once rank 0 has written its pid (else rank 0 could be stopped before that)
    let d = dir.display();
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then while [ ! -s {d}/pid.0 ]; do sleep 0.01; done; echo starting >&2; echo boom >&2; exit 3; fi; echo $$ > {d}/pid.tmp; mv {d}/pid.tmp {d}/pid.0; sleep 30"
    );
    let t = Instant::now();
    let e = spawn_local(Path::new("/bin/sh"), &sh(&script), 2).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    assert_eq!(e, "rank 1 exited with status 3: boom");
    // the sleeping rank and its sleep are gone (its process group is empty)
    let pid: i32 = std::fs::read_to_string(dir.join("pid.0")).unwrap().trim().parse().unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    while !live_in_group(pid).is_empty() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20)); // the reparented sleep may still be exiting
    }
    assert_eq!(live_in_group(pid), Vec::<String>::new(), "rank 0's processes (group {pid}) still run");
    std::fs::remove_dir_all(&dir).unwrap();
    // a rank killed by a signal
    let e = spawn_local(Path::new("/bin/sh"), &sh("if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 30"), 2).unwrap_err().to_string();
    assert_eq!(e, "rank 0 exited with signal 9 (SIGKILL) (its messages are above)");
}

#[test]
fn ranks_get_the_torchrun_variables_and_success_is_ok() {
    let _one = one_launch();
    let dir = scratch("ok");
    let script = format!(
        "test \"$WORLD_SIZE\" = 3 && test \"$CLIPFORGE_LAUNCHED\" = 1 && test \"$LOCAL_RANK\" = \"$RANK\" && echo \"$MASTER_ADDR:$MASTER_PORT\" > {}/out.$RANK",
        dir.display()
    );
    spawn_local(Path::new("/bin/sh"), &sh(&script), 3).unwrap();
    let got: Vec<String> = (0..3).map(|r| std::fs::read_to_string(dir.join(format!("out.{r}"))).unwrap()).collect();
    assert!(got[0].starts_with("127.0.0.1:") && got.iter().all(|g| *g == got[0]), "{got:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    let e = spawn_local(Path::new("/nonexistent/clipforge"), &[], 2).unwrap_err().to_string();
    assert!(e.contains("cannot start rank 0"), "{e}");
}

#[test]
fn nccl_without_a_gpu_is_an_error_not_a_panic() {
    match nccl::available() {
        Err(e) => assert!(e.to_string().contains("NCCL not found") && !e.to_string().contains('\n'), "{e}"),
        Ok(()) => eprintln!("NCCL {} is here", nccl::version().unwrap()),
    }
    // the emulator is no CUDA device, and the other rank hears about the failure
    let out = threads(&world(2), |rank, g| {
        let e = NcclCollective::new(&env(rank, 2, 0), &EmuOps, g.unwrap()).map(|_| ()).unwrap_err();
        e.to_string()
    });
    for m in out {
        assert!(m.contains("NCCL needs a CUDA device"), "{m}");
    }
}

const CHILD_TEST: &str = "ranks_as_processes_through_the_launcher";

/// A rank started by the test below (this test binary, run again by `spawn_local`): joins
/// through the launcher's variables, sums, gathers; in "crash" mode rank 2 dies mid-run and the
/// others write the error they got to `dir`.
fn child_rank(crash: bool, dir: &Path) {
    let env = RankEnv::from_env().unwrap().expect("launched without RANK");
    let g = TcpGroup::connect(&env, Duration::from_secs(20)).unwrap();
    let mut x = vec![env.rank as f32 + 1.0; 3];
    g.all_reduce_sum(&mut x).unwrap();
    assert_eq!(x, vec![6.0; 3]);
    assert_eq!(g.all_gather(&[env.rank as f32]).unwrap(), vec![0.0, 1.0, 2.0]);
    if !crash {
        return g.barrier().unwrap();
    }
    if env.rank == 2 {
        eprintln!("rank 2: simulated crash");
        std::process::abort();
    }
    let e = g.barrier().unwrap_err().to_string();
    std::fs::write(dir.join(format!("err.{}", env.rank)), e).unwrap();
    std::thread::sleep(Duration::from_secs(2)); // so the launcher sees rank 2's death first
    std::process::exit(1);
}

#[test]
fn ranks_as_processes_through_the_launcher() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |p: &str| args.iter().find_map(|a| a.strip_prefix(p).map(str::to_string));
    if RankEnv::launched_here() {
        if let Some(dir) = arg("dir=") {
            return child_rank(arg("mode=").as_deref() == Some("crash"), Path::new(&dir));
        }
    }
    let _one = one_launch();
    let dir = scratch("procs");
    let me = std::env::current_exe().unwrap();
    let run = |mode: &str| {
        let a: Vec<OsString> =
            ["--exact", CHILD_TEST, "--nocapture", "--test-threads=1", &format!("mode={mode}"), &format!("dir={}", dir.display())].map(OsString::from).into();
        spawn_local(&me, &a, 3)
    };
    run("ok").unwrap();
    let t = Instant::now();
    let e = run("crash").unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(e, "rank 2 exited with signal 6 (SIGABRT): rank 2: simulated crash");
    for r in 0..2 {
        let got = std::fs::read_to_string(dir.join(format!("err.{r}"))).unwrap();
        assert_eq!(got, "rank 2 disconnected: its process ended", "rank {r}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `free_port` draws below the kernel's ephemeral range, so no test's or rank's outgoing
/// connection can take the port between the draw and the rendezvous's listen (a CI run once
/// failed with "Address already in use" that way).
#[test]
fn free_ports_lie_below_the_ephemeral_range() {
    let lo: u16 =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(32768);
    for _ in 0..20 {
        let p = free_port().unwrap();
        assert!(p < lo && p >= lo / 2, "port {p} outside [{}, {lo})", lo / 2);
        std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
    }
}
