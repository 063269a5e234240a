//! Evaluation metrics on L2-normalised embeddings (rows of row-major [N, D] slices): zero-shot
//! top-k accuracy, per-class accuracy and the confusion matrix; retrieval recall@K both ways.
//! Ties follow clip_benchmark (its `torch.topk` over the scores): a target's rank is the number
//! of candidates scoring higher plus those scoring the same that come before it, so ties are
//! broken by candidate order, never in the target's favour (four images with the same caption
//! give image→text R@1 = 25 %, not 100 %).

/// Cosine similarities [rows_a, rows_b] of normalised embeddings.
pub fn similarity(a: &[f32], b: &[f32], d: usize) -> Vec<f32> {
    let (na, nb) = (a.len() / d, b.len() / d);
    let mut s = vec![0f32; na * nb];
    crate::ops::matmul::gemm(crate::ops::matmul::View::row_major(a, na, d), crate::ops::matmul::View::row_major(b, nb, d).t(), &mut s, false);
    s
}

/// Rank of column `target` within row `row` (0 = best; ties broken by index).
fn rank(row: &[f32], target: usize) -> usize {
    let t = row[target];
    row.iter().enumerate().filter(|&(i, &v)| v > t || (v == t && i < target)).count()
}

#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct ZeroShot {
    pub top1: f64,
    pub top5: f64,
    /// Per class: (samples, top-1 accuracy).
    pub per_class: Vec<(usize, f64)>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Scores `[N, C]` (image × class) and labels `[N]` → zero-shot metrics.
pub fn zero_shot(scores: &[f32], classes: usize, labels: &[usize]) -> ZeroShot {
    let n = labels.len();
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut h1, mut h5) = (0usize, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        let row = &scores[i * classes..(i + 1) * classes];
        let r = rank(row, y);
        h1 += (r < 1) as usize;
        h5 += (r < 5) as usize;
        let pred = (0..classes).fold(0, |best, c| if row[c] > row[best] { c } else { best });
        confusion[y][pred] += 1;
    }
    let per_class = (0..classes)
        .map(|c| {
            let total: usize = confusion[c].iter().sum();
            (total, if total == 0 { f64::NAN } else { confusion[c][c] as f64 / total as f64 })
        })
        .collect();
    let d = n.max(1) as f64;
    ZeroShot { top1: h1 as f64 / d, top5: h5 as f64 / d, per_class, confusion }
}

#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct Recall {
    pub k: usize,
    pub image_to_text: f64,
    pub text_to_image: f64,
}

/// Recall@K both ways. `owner[t]` is the image of text t; an image is a hit at K if any of its
/// texts ranks in the top K; a text if its image does.
pub fn retrieval(img: &[f32], txt: &[f32], d: usize, owner: &[usize], ks: &[usize]) -> Vec<Recall> {
    let (ni, nt) = (img.len() / d, txt.len() / d);
    let s = similarity(img, txt, d); // [Ni, Nt]
    let best_i2t: Vec<usize> = (0..ni)
        .map(|i| {
            let row = &s[i * nt..(i + 1) * nt];
            (0..nt).filter(|&t| owner[t] == i).map(|t| rank(row, t)).min().unwrap_or(usize::MAX)
        })
        .collect();
    let t2i: Vec<usize> = (0..nt)
        .map(|t| {
            let col: Vec<f32> = (0..ni).map(|i| s[i * nt + t]).collect();
            rank(&col, owner[t])
        })
        .collect();
    ks.iter()
        .map(|&k| Recall {
            k,
            image_to_text: best_i2t.iter().filter(|&&r| r < k).count() as f64 / ni.max(1) as f64,
            text_to_image: t2i.iter().filter(|&&r| r < k).count() as f64 / nt.max(1) as f64,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers() {
        // 3 classes, 4 images: scores make image 3 wrong (predicts 0, true 2, rank 1)
        let scores = [0.9, 0.1, 0.0, 0.2, 0.8, 0.1, 0.1, 0.2, 0.7, 0.6, 0.1, 0.5];
        let z = zero_shot(&scores, 3, &[0, 1, 2, 2]);
        assert_eq!((z.top1, z.top5), (0.75, 1.0));
        assert_eq!(z.confusion[2], vec![1, 0, 1]);
        assert_eq!(z.per_class[2], (2, 0.5));
        // 2 images, 3 texts (image 0 owns texts 0, 1)
        let img = [1.0, 0.0, 0.0, 1.0];
        let txt = [0.0, 1.0, 1.0, 0.0, 0.6, 0.8];
        let r = retrieval(&img, &txt, 2, &[0, 0, 1], &[1, 2]);
        assert_eq!(r[0], Recall { k: 1, image_to_text: 0.5, text_to_image: 2.0 / 3.0 });
        assert_eq!(r[1], Recall { k: 2, image_to_text: 1.0, text_to_image: 1.0 });
    }

    /// Four images with the same caption: every caption ties, and only the first image's comes
    /// first (clip_benchmark's torch.topk order), so R@1 is 25 % both ways, R@4 100 %.
    #[test]
    fn ties_are_broken_by_order_not_in_the_targets_favour() {
        let img = [1.0, 0.0, 0.8, 0.6, 0.6, 0.8, 0.0, 1.0];
        let txt = [0.6, 0.8, 0.6, 0.8, 0.6, 0.8, 0.6, 0.8];
        let r = retrieval(&img, &txt, 2, &[0, 1, 2, 3], &[1, 4]);
        assert_eq!(r[0], Recall { k: 1, image_to_text: 0.25, text_to_image: 0.25 });
        assert_eq!(r[1].image_to_text, 1.0);
        let z = zero_shot(&[0.5, 0.5, 0.5, 0.5], 2, &[0, 1]);
        assert_eq!((z.top1, z.confusion[1][0]), (0.5, 1));
    }
}
