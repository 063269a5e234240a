//! `finetune` on many ranks (src/dist/):
//! - `--nproc-per-node N` on a plain command line: this process starts N copies of the same
//!   command (one per GPU of this machine) and waits for them; one failing stops them all;
//! - a process started by those copies' launcher, by torchrun (`--no-python`), srun or mpirun
//!   joins the job named by its environment: the TCP rendezvous on MASTER_ADDR:MASTER_PORT, then
//!   NCCL on GPU LOCAL_RANK (`--device cuda`, or `auto` when a GPU opens) or the TCP collective
//!   (`--device cpu`, and SmartCLIP, which trains on the CPU).
use clipforge::cuda::{CudaDevice, GpuOps};
use clipforge::dist::launch::{spawn_local, RankEnv};
use clipforge::dist::nccl::NcclCollective;
use clipforge::dist::tcp::TcpGroup;
use clipforge::dist::Collective;
use clipforge::error::{Error, Result};
use std::ffi::OsString;
use std::rc::Rc;
use std::time::Duration;

/// How long a rank waits for the others at the rendezvous.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// This process's part in a job of several ranks.
pub struct Rank {
    pub env: RankEnv,
    pub comm: Rc<dyn Collective>,
    /// The GPU this rank drives (NCCL), handed to the trainer.
    pub gpu: Option<GpuOps>,
}

/// `--nproc-per-node n` (n > 1): starts the n ranks of this machine, each this command without
/// the flag, and waits for them all.
pub fn spawn(n: usize) -> Result<()> {
    if let Some(env) = RankEnv::from_env()? {
        return Err(Error::msg(format!(
            "--nproc-per-node: this process is already rank {} of {} of a launcher's job (RANK/WORLD_SIZE or srun/mpirun variables are set); drop --nproc-per-node",
            env.rank, env.world
        )));
    }
    let exe = std::env::current_exe().map_err(|e| Error::msg(format!("--nproc-per-node: cannot find this executable: {e}")))?;
    spawn_local(&exe, &without_nproc(std::env::args_os().skip(1)), n)
}

/// The command line without `--nproc-per-node N` / `--nproc-per-node=N`.
fn without_nproc(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = vec![];
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.to_str() {
            Some("--nproc-per-node") => skip = true,
            Some(s) if s.starts_with("--nproc-per-node=") => {}
            _ => out.push(a),
        }
    }
    out
}

/// Joins the job the environment names (None: no launcher, or a world of one). `device`: auto,
/// cpu or cuda; `smart`: SmartCLIP (CPU only).
pub fn join(device: &str, smart: bool) -> Result<Option<Rank>> {
    let Some(env) = RankEnv::from_env()?.filter(|e| e.world > 1) else { return Ok(None) };
    let gpu = match (device, smart) {
        ("cpu", _) | ("auto", true) => None,
        ("cuda", true) => return Err(Error::msg("--device cuda: SmartCLIP fine-tuning runs on the CPU backend; use --device cpu")),
        ("cuda", false) => Some(open_gpu(&env)?),
        ("auto", false) => open_gpu(&env).ok(),
        (d, _) => return Err(Error::msg(format!("--device {d}: expected auto, cpu or cuda"))),
    };
    share_cores(local_ranks(&env, &|k| std::env::var(k).ok()));
    let group = TcpGroup::connect(&env, RENDEZVOUS_TIMEOUT)?;
    let comm: Rc<dyn Collective> = match &gpu {
        Some(g) => {
            let mut nccl = NcclCollective::new(&env, g, group)?;
            nccl.set_overlap(true)?; // bucket sums on their own stream, beside the rest of the backward
            Rc::new(nccl)
        }
        None => Rc::new(group),
    };
    Ok(Some(Rank { env, comm, gpu }))
}

/// The ranks on this machine: torchrun's LOCAL_WORLD_SIZE, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE,
/// srun's SLURM_NTASKS_PER_NODE ("8" or "8(x2)"); in `--nproc-per-node`'s children, the world.
fn local_ranks(env: &RankEnv, get: &dyn Fn(&str) -> Option<String>) -> usize {
    let num = |k: &str| get(k).and_then(|v| v.chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse::<usize>().ok()).filter(|&n| n > 0);
    num("LOCAL_WORLD_SIZE").or_else(|| num("OMPI_COMM_WORLD_LOCAL_SIZE")).or_else(|| num("SLURM_NTASKS_PER_NODE")).unwrap_or(if RankEnv::launched_here() {
        env.world
    } else {
        1
    })
}

/// Gives each of this machine's `local` ranks its share of the cores for the host work (the loss
/// head, the loader), unless `--threads` already sized the pool.
fn share_cores(local: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if local > 1 {
        let _ = rayon::ThreadPoolBuilder::new().num_threads((cores / local).max(1)).build_global();
        // Err: --threads set it
    }
}

/// GPU LOCAL_RANK; or GPU 0 when the launcher shows each rank one GPU (srun --gpus-per-task 1).
fn open_gpu(env: &RankEnv) -> Result<GpuOps> {
    let count = CudaDevice::device_count()?;
    let ordinal = match count {
        1 => 0,
        n if env.local_rank < n => env.local_rank,
        n => return Err(Error::device(format!("LOCAL_RANK {} but this machine shows {n} GPUs: start at most {n} ranks per machine", env.local_rank))),
    };
    GpuOps::open_ordinal(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_come_from_the_launchers_variables() {
        let env = RankEnv { rank: 3, world: 16, local_rank: 3, master_addr: "h".into(), master_port: 1 };
        let vars = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(local_ranks(&env, &vars(&[("LOCAL_WORLD_SIZE", "8")])), 8);
        assert_eq!(local_ranks(&env, &vars(&[("SLURM_NTASKS_PER_NODE", "4(x4)")])), 4);
        assert_eq!(local_ranks(&env, &vars(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "2")])), 2);
        assert_eq!(local_ranks(&env, &vars(&[("LOCAL_WORLD_SIZE", "zero")])), 1);
    }

    #[test]
    fn the_flag_and_its_value_are_removed() {
        let args = ["finetune", "--nproc-per-node", "4", "--batch", "8", "--nproc-per-node=2", "--out", "o"].map(OsString::from);
        let want: Vec<OsString> = ["finetune", "--batch", "8", "--out", "o"].map(OsString::from).to_vec();
        assert_eq!(without_nproc(args.into_iter()), want);
    }
}
