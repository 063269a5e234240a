//! Gradient buckets: the trainable parameters in the order the backward pass finishes them, cut
//! into buckets of at most `cap` elements (one collective each). A bucket is launched as soon as
//! its last parameter's gradient is final and every earlier bucket is launched, so every rank
//! issues the same collectives in the same order while later layers' backward still runs.

/// Default bucket size: 25 MiB of f32 gradients (PyTorch DDP's default).
pub const DEFAULT_CAP: usize = 25 << 18;

/// Which parameters go in which bucket.
#[derive(Clone, Debug)]
pub struct BucketPlan {
    /// Parameter ids per bucket, in launch order.
    pub buckets: Vec<Vec<usize>>,
    /// The bucket of each parameter id (None: not in any bucket).
    bucket_of: Vec<Option<usize>>,
}

impl BucketPlan {
    /// `order`: (parameter id, elements) in the order the backward finishes them. A parameter
    /// larger than `cap` gets a bucket of its own.
    pub fn new(order: &[(usize, usize)], cap: usize) -> BucketPlan {
        let mut buckets: Vec<Vec<usize>> = vec![];
        let mut size = 0;
        for &(id, n) in order {
            if buckets.is_empty() || (size + n > cap && size > 0) {
                buckets.push(vec![]);
                size = 0;
            }
            if let Some(b) = buckets.last_mut() {
                b.push(id);
            }
            size += n;
        }
        let top = order.iter().map(|&(id, _)| id + 1).max().unwrap_or(0);
        let mut bucket_of = vec![None; top];
        for (k, b) in buckets.iter().enumerate() {
            for &id in b {
                bucket_of[id] = Some(k);
            }
        }
        BucketPlan { buckets, bucket_of }
    }

    /// A fresh tracker for one step.
    pub fn start(&self) -> BucketState {
        BucketState { missing: self.buckets.iter().map(|b| b.len()).collect(), seen: vec![false; self.bucket_of.len()], next: 0 }
    }

    pub fn bucket_of(&self, id: usize) -> Option<usize> {
        self.bucket_of.get(id).copied().flatten()
    }
}

/// Which buckets of a plan are complete and launched during one step.
#[derive(Clone, Debug)]
pub struct BucketState {
    missing: Vec<usize>,
    seen: Vec<bool>,
    next: usize,
}

impl BucketState {
    /// Parameter `id`'s gradient is final: the buckets that may be launched now, in order.
    pub fn ready(&mut self, plan: &BucketPlan, id: usize) -> Vec<usize> {
        if let (Some(k), Some(seen)) = (plan.bucket_of(id), self.seen.get_mut(id)) {
            if !*seen {
                *seen = true;
                self.missing[k] -= 1;
            }
        }
        let mut out = vec![];
        while self.next < self.missing.len() && self.missing[self.next] == 0 {
            out.push(self.next);
            self.next += 1;
        }
        out
    }

    /// The end of the backward: every bucket not launched yet, in order.
    pub fn rest(&mut self) -> Vec<usize> {
        let out: Vec<usize> = (self.next..self.missing.len()).collect();
        self.next = self.missing.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fill_in_order_and_launch_in_order() {
        // ids 5,4,3,2,1,0 finished in that order, sizes 3,3,5,1,1,9, cap 6
        let plan = BucketPlan::new(&[(5, 3), (4, 3), (3, 5), (2, 1), (1, 1), (0, 9)], 6);
        assert_eq!(plan.buckets, vec![vec![5, 4], vec![3, 2], vec![1], vec![0]]);
        let mut st = plan.start();
        assert!(st.ready(&plan, 4).is_empty());
        assert!(st.ready(&plan, 2).is_empty());
        assert!(st.ready(&plan, 3).is_empty(), "bucket 1 waits for bucket 0");
        assert_eq!(st.ready(&plan, 5), vec![0, 1]);
        assert!(st.ready(&plan, 5).is_empty(), "a second notice counts once");
        assert_eq!(st.ready(&plan, 1), vec![2]);
        assert_eq!(st.rest(), vec![3]);
        assert!(st.rest().is_empty());
    }
}
