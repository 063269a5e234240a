//! Where this process stands in a data-parallel job, and the single-machine launcher.
//!
//! - [`RankEnv`]: rank, world size, local rank and rank 0's address from the launcher's variables:
//!   torchrun's `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; else srun's
//!   `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (or `SLURM_NTASKS`), `SLURM_LOCALID`; else Open MPI's
//!   `OMPI_COMM_WORLD_RANK` / `_SIZE` / `_LOCAL_RANK`; else MPICH's `PMI_RANK` / `PMI_SIZE` /
//!   `MPI_LOCALRANKID`. srun and mpirun do not set `MASTER_ADDR`: export it (rank 0's host) in the
//!   job script. `MASTER_PORT` defaults to [`DEFAULT_PORT`]. No variables at all: a plain single
//!   process (`None`).
//! - [`spawn_local`]: `--nproc-per-node N` — N children of this program, one per GPU, with the
//!   torchrun variables set; rank 0's output passes through, the other ranks' stderr is prefixed
//!   `[rank r] `; the first rank to fail stops the others (SIGTERM, then SIGKILL after
//!   [`KILL_GRACE`]); Ctrl-C is forwarded to the children (each runs in its own process group,
//!   so the terminal's SIGINT reaches them once, through here) and the launcher waits for them.
use crate::error::{Error, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `MASTER_PORT` when it is not set (torchrun's default).
pub const DEFAULT_PORT: u16 = 29500;
/// Set to 1 in the children of [`spawn_local`].
pub const LAUNCHED_VAR: &str = "CLIPFORGE_LAUNCHED";
/// How long stopped ranks get between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank's index on its machine: the GPU it drives.
    pub local_rank: usize,
    /// Rank 0's host (name or address): where the rendezvous listens.
    pub master_addr: String,
    pub master_port: u16,
}

/// Which launcher's variables name the rank, the world size and the local rank.
const SCHEMES: [(&str, &[&str], &[&str]); 4] = [
    ("RANK", &["WORLD_SIZE"], &["LOCAL_RANK"]),
    ("SLURM_PROCID", &["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"], &["SLURM_LOCALID"]),
    ("OMPI_COMM_WORLD_RANK", &["OMPI_COMM_WORLD_SIZE"], &["OMPI_COMM_WORLD_LOCAL_RANK"]),
    ("PMI_RANK", &["PMI_SIZE"], &["MPI_LOCALRANKID"]),
];

impl RankEnv {
    /// From the process environment; see [`RankEnv::from_vars`].
    pub fn from_env() -> Result<Option<RankEnv>> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    /// From `get` (a variable's value, or None when unset). `None` when no launcher variable is
    /// set (a plain single process); every bad value is a one-line error naming its variable.
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let Some((rank_var, world_vars, local_vars)) = SCHEMES.iter().find(|s| get(s.0).is_some()).copied().or_else(|| {
            // WORLD_SIZE alone (RANK forgotten) is a torchrun-style setup with a missing variable
            get("WORLD_SIZE").map(|_| SCHEMES[0])
        }) else {
            return Ok(None);
        };
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.parse::<usize>().map(Some).map_err(|_| Error::msg(format!("{var}={v:?} is not a non-negative integer"))),
            }
        };
        let first = |vars: &[&str]| -> Result<Option<(String, usize)>> {
            for v in vars {
                if let Some(n) = num(v)? {
                    return Ok(Some((v.to_string(), n)));
                }
            }
            Ok(None)
        };
        let rank =
            num(rank_var)?.ok_or_else(|| Error::msg(format!("{} is set but {rank_var} is not: set {rank_var} to this process's rank", world_vars[0])))?;
        let (world_var, world) = first(world_vars)?
            .ok_or_else(|| Error::msg(format!("{rank_var}={rank} is set but {} is not: set it to the number of processes in the job", world_vars[0])))?;
        if world == 0 {
            return Err(Error::msg(format!("{world_var}=0: the job needs at least one process")));
        }
        if rank >= world {
            return Err(Error::msg(format!("{rank_var}={rank} is not below {world_var}={world}: ranks run from 0 to {}", world - 1)));
        }
        let local_rank = match first(local_vars)? {
            Some((_, l)) => l,
            None if world == 1 => 0,
            None => {
                return Err(Error::msg(format!(
                    "{} is not set ({rank_var}={rank}, {world_var}={world}): set it to this process's GPU index on its machine",
                    local_vars[0]
                )))
            }
        };
        let master_port = match get("MASTER_PORT") {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(Error::msg(format!("MASTER_PORT={p:?} is not a port number (1-65535)"))),
            },
        };
        let master_addr = match get("MASTER_ADDR") {
            Some(a) => a,
            None if world == 1 => "127.0.0.1".to_string(),
            None => {
                return Err(Error::msg(format!(
                    "MASTER_ADDR is not set ({rank_var}={rank}, {world_var}={world}): export MASTER_ADDR=<host name or address of rank 0's machine> (and MASTER_PORT, default {DEFAULT_PORT})"
                )))
            }
        };
        Ok(Some(RankEnv { rank, world, local_rank, master_addr, master_port }))
    }

    /// True in a child started by [`spawn_local`].
    pub fn launched_here() -> bool {
        std::env::var(LAUNCHED_VAR).is_ok_and(|v| v == "1")
    }
}

/// A TCP port that was free a moment ago on 127.0.0.1 (bound, then released), drawn at random
/// below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by
/// default): an outgoing connection's local port, which the kernel takes from that range, cannot
/// then grab it before the rendezvous listens on it. Port 0's pick if none of 64 draws is free.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, RandomState};
    let lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    let lo = lo.unwrap_or(32768).max(2048);
    let (first, span) = (lo / 2, lo - lo / 2); // [lo/2, lo)
    let seed = RandomState::new();
    for i in 0..64u64 {
        let port = first + (seed.hash_one(i) % span as u64) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::msg(format!("finding a free port on 127.0.0.1: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| Error::msg(format!("finding a free port on 127.0.0.1: {e}")))
}

/// Ctrl-C presses seen by the launcher (its handler is installed once per process).
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);
static HANDLER: OnceLock<bool> = OnceLock::new();

/// Installs the launcher's Ctrl-C handler (once); false when another handler was there first.
fn install_interrupt_handler() -> bool {
    *HANDLER.get_or_init(|| {
        ctrlc::set_handler(|| {
            INTERRUPTS.fetch_add(1, Ordering::SeqCst);
        })
        .is_ok()
    })
}

/// The last line a child wrote to stderr, and whether its stderr is closed.
#[derive(Default)]
struct Tail {
    last: String,
    eof: bool,
}

struct Rank {
    child: Child,
    tail: Option<Arc<Mutex<Tail>>>,
    status: Option<ExitStatus>,
}

/// "status 3" or "signal 9 (SIGKILL)".
fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("status {c}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGINT => " (SIGINT)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGBUS => " (SIGBUS)",
                _ => "",
            };
            format!("signal {sig}{name}")
        }
        _ => "an unknown status".into(),
    }
}

/// Sends `sig` to the child's process group (the child and anything it started).
fn signal_group(child: &Child, sig: i32) {
    let Ok(pid) = i32::try_from(child.id()) else { return };
    // SAFETY: plain kill(2) on the process group the child leads (it was made its own group
    // leader at spawn); a group that is gone gives ESRCH, which is ignored.
    unsafe {
        libc::kill(-pid, sig);
    }
}

/// Copies a child's stderr to ours line by line with `prefix`, remembering the last line.
fn pump_stderr(src: impl std::io::Read + Send + 'static, prefix: String, tail: Arc<Mutex<Tail>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    let _ = writeln!(std::io::stderr().lock(), "{prefix}{text}");
                    if !text.trim().is_empty() {
                        if let Ok(mut t) = tail.lock() {
                            t.last = text.trim().to_string();
                        }
                    }
                }
            }
        }
        if let Ok(mut t) = tail.lock() {
            t.eof = true;
        }
    });
}

/// Starts `n` ranks of `program args` on this machine (torchrun's variables with
/// MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, plus `CLIPFORGE_LAUNCHED=1`) and waits for them
/// all. The first rank to exit non-zero or by a signal stops the others and is the error:
/// `rank r exited with status s: <its last stderr line>`. Ctrl-C is forwarded to every rank as
/// SIGINT (they checkpoint and exit) and the launcher waits for them; a third Ctrl-C kills them.
pub fn spawn_local(program: &Path, args: &[OsString], n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::msg("--nproc-per-node must be at least 1"));
    }
    let port = free_port()?;
    let forwarding = install_interrupt_handler();
    let seen_at_start = INTERRUPTS.load(Ordering::SeqCst);
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    for r in 0..n {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(LAUNCHED_VAR, "1")
            .stdin(Stdio::null())
            .process_group(0);
        if r > 0 {
            cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only the child's own process state.
        unsafe {
            cmd.pre_exec(|| {
                // the rank gets SIGTERM if the launcher dies without stopping it
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                let tail = child.stderr.take().map(|e| {
                    let t = Arc::new(Mutex::new(Tail::default()));
                    pump_stderr(e, format!("[rank {r}] "), t.clone());
                    t
                });
                ranks.push(Rank { child, tail, status: None });
            }
            Err(e) => {
                stop_all(&mut ranks, None);
                return Err(Error::file(program, format!("cannot start rank {r}: {e}")));
            }
        }
    }
    let mut forwarded = seen_at_start;
    let mut failure: Option<(usize, ExitStatus)> = None;
    loop {
        let presses = INTERRUPTS.load(Ordering::SeqCst);
        if forwarding && presses > forwarded {
            forwarded = presses;
            let sig = if presses - seen_at_start >= 3 { libc::SIGKILL } else { libc::SIGINT };
            for rk in ranks.iter().filter(|rk| rk.status.is_none()) {
                signal_group(&rk.child, sig);
            }
        }
        let interrupted = forwarded > seen_at_start;
        let mut running = 0;
        for (r, rk) in ranks.iter_mut().enumerate() {
            if rk.status.is_some() {
                continue;
            }
            match rk.child.try_wait() {
                Ok(Some(s)) => {
                    rk.status = Some(s);
                    if !s.success() && failure.is_none() {
                        failure = Some((r, s));
                    }
                }
                Ok(None) => running += 1,
                Err(_) => running += 1,
            }
        }
        if running == 0 {
            break;
        }
        // after Ctrl-C every rank finishes its checkpoint; otherwise a failure stops the rest
        if failure.is_some() && !interrupted {
            stop_all(&mut ranks, failure.map(|f| f.0));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let interrupted = forwarded > seen_at_start;
    let by_interrupt = |s: &ExitStatus| s.code() == Some(130) || s.signal() == Some(libc::SIGINT);
    match failure {
        None if interrupted => Err(Error::Interrupted(format!("interrupted: all {n} ranks stopped"))),
        None => Ok(()),
        Some((_, s)) if interrupted && by_interrupt(&s) => Err(Error::Interrupted(format!("interrupted: all {n} ranks stopped"))),
        Some((r, s)) => {
            let last = ranks.get(r).and_then(|rk| rk.tail.as_ref()).map(|t| last_line(t));
            let what = format!("rank {r} exited with {}", describe_status(s));
            let line = match last {
                Some(l) if !l.is_empty() => format!("{what}: {l}"),
                Some(_) => format!("{what} (it wrote nothing to stderr)"),
                None => format!("{what} (its messages are above)"),
            };
            Err(if interrupted { Error::Interrupted(line) } else { Error::msg(line) })
        }
    }
}

/// The last stderr line of a child that has exited (waiting up to 2 s for its pipe to drain).
fn last_line(t: &Mutex<Tail>) -> String {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(g) = t.lock() {
            if g.eof || Instant::now() >= until {
                return g.last.clone();
            }
        } else {
            return String::new();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Stops every rank still running (and whatever each started): SIGTERM, then SIGKILL after
/// [`KILL_GRACE`]; reaps them all. `failed`: the rank that failed (its group is stopped too).
fn stop_all(ranks: &mut [Rank], failed: Option<usize>) {
    for (r, rk) in ranks.iter().enumerate() {
        if rk.status.is_none() || Some(r) == failed {
            signal_group(&rk.child, libc::SIGTERM);
        }
    }
    let until = Instant::now() + KILL_GRACE;
    loop {
        let mut running = false;
        for rk in ranks.iter_mut().filter(|rk| rk.status.is_none()) {
            match rk.child.try_wait() {
                Ok(Some(s)) => rk.status = Some(s),
                _ => running = true,
            }
        }
        if !running {
            break;
        }
        if Instant::now() >= until {
            for rk in ranks.iter_mut().filter(|rk| rk.status.is_none()) {
                signal_group(&rk.child, libc::SIGKILL);
                rk.status = rk.child.wait().ok();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_words() {
        assert_eq!(describe_status(ExitStatus::from_raw(3 << 8)), "status 3");
        assert_eq!(describe_status(ExitStatus::from_raw(9)), "signal 9 (SIGKILL)");
    }

    #[test]
    fn no_variables_is_a_single_process() {
        assert_eq!(RankEnv::from_vars(&|_| None).unwrap(), None);
    }
}
