//! A test double of the ranks' collective: N ranks as threads of one process, meeting in shared
//! memory (not a product path: the product has TCP and NCCL, src/dist/). Every operation is an
//! exchange of each rank's data; results are combined in rank order, so they are the same bits
//! on every rank, as the real transports promise. A rank's `abort` fails every pending and later
//! call of the others; a wait longer than two minutes fails instead of hanging the test.
#![allow(dead_code)]
use clipforge::dist::Collective;
use clipforge::error::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    /// Each rank's contribution to the round in progress.
    data: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The finished round's contributions, until every rank has read them.
    result: Option<Arc<Vec<Vec<f32>>>>,
    left: usize,
    failed: Option<(usize, String)>,
}

struct Shared {
    n: usize,
    st: Mutex<State>,
    cv: Condvar,
}

/// One rank's handle.
pub struct ThreadComm {
    rank: usize,
    sh: Arc<Shared>,
}

/// `n` connected ranks, to be moved into their threads.
pub fn group(n: usize) -> Vec<ThreadComm> {
    let st = State { data: vec![None; n], ..State::default() };
    let sh = Arc::new(Shared { n, st: Mutex::new(st), cv: Condvar::new() });
    (0..n).map(|rank| ThreadComm { rank, sh: sh.clone() }).collect()
}

const WAIT: Duration = Duration::from_secs(120);

impl ThreadComm {
    fn wait<'a>(&self, mut g: std::sync::MutexGuard<'a, State>, until: impl Fn(&State) -> bool) -> Result<std::sync::MutexGuard<'a, State>> {
        loop {
            if until(&g) {
                return Ok(g); // (a round every rank finished is delivered even after a later abort)
            }
            if let Some((r, why)) = &g.failed {
                return Err(Error::msg(format!("rank {r} failed: {why}")));
            }
            let (ng, to) = self.sh.cv.wait_timeout(g, WAIT).map_err(|_| Error::msg("thread group poisoned"))?;
            if to.timed_out() {
                return Err(Error::msg(format!("rank {}: no other rank came for two minutes", self.rank)));
            }
            g = ng;
        }
    }

    /// Every rank's `mine`, in rank order.
    fn exchange(&self, mine: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>> {
        let g = self.sh.st.lock().map_err(|_| Error::msg("thread group poisoned"))?;
        let mut g = self.wait(g, |s| s.result.is_none())?; // the previous round is read by all
        g.data[self.rank] = Some(mine);
        g.arrived += 1;
        if g.arrived == self.sh.n {
            let all: Vec<Vec<f32>> = g.data.iter_mut().map(|d| d.take().unwrap_or_default()).collect();
            g.result = Some(Arc::new(all));
            (g.arrived, g.left) = (0, 0);
            self.sh.cv.notify_all();
        }
        let mut g = self.wait(g, |s| s.result.is_some())?;
        let r = g.result.clone().ok_or_else(|| Error::msg("no result"))?;
        g.left += 1;
        if g.left == self.sh.n {
            g.result = None;
            self.sh.cv.notify_all();
        }
        Ok(r)
    }
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.sh.n
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(self.exchange(local.to_vec())?.concat())
    }
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let all = self.exchange(data.to_vec())?;
        if all.iter().any(|v| v.len() != data.len()) {
            return Err(Error::msg("all_reduce_sum: the ranks passed different lengths"));
        }
        for (i, x) in data.iter_mut().enumerate() {
            *x = all[0][i]; // rank 0 + rank 1 + …
            for v in &all[1..] {
                *x += v[i];
            }
        }
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(vec![]).map(|_| ())
    }
    fn abort(&self, why: &str) {
        if let Ok(mut g) = self.sh.st.lock() {
            g.failed.get_or_insert((self.rank, why.to_string()));
            self.sh.cv.notify_all();
        }
    }
    fn describe(&self) -> String {
        format!("{} threads (test double)", self.sh.n)
    }
}
