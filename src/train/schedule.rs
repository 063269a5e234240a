//! The learning-rate schedule of the Long-CLIP fine-tune (methods.md §2.5, open_clip's
//! `cosine_lr`): linear warm-up lr·(s+1)/warmup for steps s < warmup, then a half cosine
//! 0.5·(1 + cos(π·e/es))·lr with e = s − warmup and es = total − warmup. Steps count from 0
//! (the step about to be taken); the value is computed in f64 as Python computes it.

/// Warm-up then cosine decay to zero at `total` steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    pub lr: f64,
    pub warmup: usize,
    pub total: usize,
}

impl CosineSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let e = (step - self.warmup) as f64;
        let es = self.total.saturating_sub(self.warmup) as f64;
        if es <= 0.0 {
            return self.lr;
        }
        0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * self.lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = CosineSchedule { lr: 1e-3, warmup: 4, total: 12 };
        assert_eq!(s.lr(0), 1e-3 * 0.25);
        assert_eq!(s.lr(3), 1e-3);
        assert_eq!(s.lr(4), 1e-3); // e = 0: cos 0
        assert!((s.lr(8) - 0.5e-3).abs() < 1e-15); // halfway
        assert!(s.lr(11) > 0.0 && s.lr(11) < 1e-4);
        let flat = CosineSchedule { lr: 1.0, warmup: 0, total: 0 };
        assert_eq!(flat.lr(5), 1.0);
    }
}
