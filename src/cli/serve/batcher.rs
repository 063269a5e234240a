//! Dynamic batching: requests queue their texts (token ids) or images (preprocessed pixels) here,
//! and one worker thread per model, which owns the model, merges queued requests of one kind into
//! batches bounded by `--max-batch-tokens` / `--max-batch-images`, waiting at most `--max-wait-ms`
//! after the oldest request's arrival for more to come (while it computes, requests pile up and
//! the next batch takes them all). Each request gets its own rows back, L2-normalised exactly as
//! `embed-text` / `embed-image` write them. A batch that fails (or panics) is retried request by
//! request, so one bad request fails alone and the worker keeps serving.
use super::metrics::Metrics;
use clipforge::api::{ClipModel, OpenOptions};
use clipforge::error::{Error, Result};
use clipforge::io::image_prep::PreprocessConfig;
use clipforge::io::tokenizer::ClipTokenizer;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What one request asks the model for.
pub enum Work {
    /// Token ids, start and end tokens included, one sequence per text.
    Text(Vec<Vec<u32>>),
    /// `n` preprocessed images, [n, 3, S, S] row-major.
    Image { pixels: Vec<f32>, n: usize },
}

impl Work {
    fn is_text(&self) -> bool {
        matches!(self, Work::Text(_))
    }
    /// What the work costs against the batch budget: tokens of a text request, images of an image one.
    fn cost(&self) -> usize {
        match self {
            Work::Text(ids) => ids.iter().map(|s| s.len()).sum(),
            Work::Image { n, .. } => *n,
        }
    }
    fn rows(&self) -> usize {
        match self {
            Work::Text(ids) => ids.len(),
            Work::Image { n, .. } => *n,
        }
    }
}

/// A request's rows (rows × D, L2-normalised), or why the model failed on it.
pub type Reply = std::result::Result<Vec<f32>, String>;

struct Job {
    work: Work,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The batch bounds.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_tokens: usize,
    pub max_images: usize,
    pub max_wait: Duration,
}

/// What the handlers need to know of the model, read once by the worker after opening it.
pub struct ModelInfo {
    pub dim: usize,
    pub context_length: usize,
    pub image_size: usize,
    pub vocab: usize,
    pub device: String,
    pub dtype: &'static str,
    pub logit_scale: f32,
    pub tokenizer: ClipTokenizer,
    pub preprocess: PreprocessConfig,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// The queue between the handlers and the worker.
pub struct Batcher {
    state: Mutex<State>,
    wake: Condvar,
    limits: BatchLimits,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Queues `work`; the receiver gets its rows. None once the server is shutting down.
    pub fn submit(&self, work: Work) -> Option<oneshot::Receiver<Reply>> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.state.lock().ok()?;
        if st.closed {
            return None;
        }
        st.jobs.push_back(Job { work, enqueued: Instant::now(), reply: tx });
        self.metrics.queue_depth.store(st.jobs.len(), Ordering::Relaxed);
        drop(st);
        self.wake.notify_one();
        Some(rx)
    }

    /// No new work; the worker finishes what is queued, then exits.
    pub fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
        }
        self.wake.notify_all();
    }

    /// The next batch: the oldest live request and the queued ones of its kind that fit the
    /// budget (in arrival order), waiting until the oldest is `max_wait` old for more. None when
    /// closed and empty.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut st = self.state.lock().ok()?;
        let first = loop {
            match st.jobs.pop_front() {
                Some(j) if j.reply.is_closed() => continue, // the client went away (timeout, disconnect)
                Some(j) => break j,
                None if st.closed => return None,
                None => st = self.wake.wait(st).ok()?,
            }
        };
        let text = first.work.is_text();
        let budget = if text { self.limits.max_tokens } else { self.limits.max_images };
        let deadline = first.enqueued + self.limits.max_wait;
        let mut cost = first.work.cost();
        let mut batch = vec![first];
        loop {
            let mut full = cost >= budget;
            let mut i = 0;
            while i < st.jobs.len() && !full {
                match st.jobs.get(i) {
                    Some(j) if j.work.is_text() != text => i += 1,
                    Some(j) if j.reply.is_closed() => drop(st.jobs.remove(i)),
                    Some(j) if cost + j.work.cost() <= budget => {
                        cost += j.work.cost();
                        batch.extend(st.jobs.remove(i));
                    }
                    _ => full = true, // the next of this kind waits for the next batch (arrival order)
                }
            }
            let now = Instant::now();
            if full || st.closed || now >= deadline {
                break;
            }
            st = self.wake.wait_timeout(st, deadline - now).ok()?.0;
        }
        self.metrics.queue_depth.store(st.jobs.len(), Ordering::Relaxed);
        Some(batch)
    }
}

/// Opens the model on a new worker thread (which owns it from then on) and starts serving the
/// queue; returns once the model is open, with what the handlers need to know of it.
pub fn start(path: PathBuf, opts: OpenOptions, limits: BatchLimits, metrics: Arc<Metrics>) -> Result<(Arc<Batcher>, ModelInfo, std::thread::JoinHandle<()>)> {
    let batcher = Arc::new(Batcher { state: Mutex::default(), wake: Condvar::new(), limits, metrics });
    let (tx, rx) = std::sync::mpsc::channel();
    let b = batcher.clone();
    let handle = std::thread::Builder::new()
        .name("clipforge-model".into())
        .spawn(move || {
            let model = match open(&path, &opts) {
                Ok((model, info)) => {
                    let _ = tx.send(Ok(info));
                    model
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            while let Some(batch) = b.next_batch() {
                run_batch(&model, &b, batch);
            }
        })
        .map_err(|e| Error::msg(format!("cannot start the model thread: {e}")))?;
    match rx.recv() {
        Ok(Ok(info)) => Ok((batcher, info, handle)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::msg("the model thread stopped while opening the model")),
    }
}

fn open(path: &std::path::Path, opts: &OpenOptions) -> Result<(ClipModel, ModelInfo)> {
    let model = ClipModel::open(path, opts)?;
    let c = model.config();
    let info = ModelInfo {
        dim: model.embed_dim(),
        context_length: model.context_length(),
        image_size: c.vision.image_size,
        vocab: c.text.vocab,
        device: model.device(),
        dtype: model.dtype().name(),
        logit_scale: model.logit_scale(),
        tokenizer: model.tokenizer(None)?,
        preprocess: model.preprocess_config()?,
    };
    Ok((model, info))
}

/// Runs one batch and answers each request; on failure, each request again alone.
fn run_batch(model: &ClipModel, b: &Batcher, batch: Vec<Job>) {
    let text = batch.first().is_some_and(|j| j.work.is_text());
    let rows: usize = batch.iter().map(|j| j.work.rows()).sum();
    let t0 = Instant::now();
    let works: Vec<&Work> = batch.iter().map(|j| &j.work).collect();
    match compute(model, &b.limits, &works) {
        Ok(out) => {
            b.metrics.batch(if text { "text" } else { "image" }, rows, t0.elapsed().as_secs_f64());
            count(&b.metrics, &works);
            let d = model.embed_dim();
            let mut at = 0;
            for j in batch {
                let n = j.work.rows() * d;
                let _ = j.reply.send(out.get(at..at + n).map(|r| r.to_vec()).ok_or_else(|| "internal: row count mismatch".to_string()));
                at += n;
            }
        }
        Err(_) if batch.len() > 1 => {
            for j in batch {
                run_batch(model, b, vec![j]);
            }
        }
        Err(e) => {
            for j in batch {
                let _ = j.reply.send(Err(e.message()));
            }
        }
    }
}

fn count(m: &Metrics, works: &[&Work]) {
    for w in works {
        match w {
            Work::Text(ids) => {
                m.texts.fetch_add(ids.len() as u64, Ordering::Relaxed);
                m.tokens.fetch_add(w.cost() as u64, Ordering::Relaxed);
            }
            Work::Image { n, .. } => {
                m.images.fetch_add(*n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// The rows of `works` (all of one kind) in order, [Σ rows, D], computed in chunks that keep to
/// the budget (only a single request over it needs more than one); a panic becomes an error.
fn compute(model: &ClipModel, limits: &BatchLimits, works: &[&Work]) -> Result<Vec<f32>> {
    catch_unwind(AssertUnwindSafe(|| -> Result<Vec<f32>> {
        let mut out = Vec::new();
        match works.first() {
            Some(Work::Text(_)) => {
                let ids: Vec<Vec<u32>> = works.iter().flat_map(|w| if let Work::Text(ids) = w { ids.clone() } else { vec![] }).collect();
                let mut start = 0;
                while start < ids.len() {
                    let (mut end, mut tokens) = (start, 0);
                    while end < ids.len() && (end == start || tokens + ids[end].len() <= limits.max_tokens) {
                        tokens += ids[end].len();
                        end += 1;
                    }
                    out.extend(model.embed_token_ids(&ids[start..end], true, end - start, &mut |_| {})?.data); // [b, D]
                    start = end;
                }
            }
            Some(Work::Image { .. }) => {
                let mut px = Vec::new();
                let mut n = 0;
                for w in works {
                    if let Work::Image { pixels, n: k } = w {
                        px.extend_from_slice(pixels);
                        n += k;
                    }
                }
                let per = px.len() / n.max(1);
                for (i, chunk) in px.chunks(per * limits.max_images.max(1)).enumerate() {
                    let k = chunk.len() / per.max(1);
                    let e = model.embed_pixels(chunk, k).map_err(|e| e.context(format!("image batch {i}")))?; // [k, D]
                    out.extend(e.normalized().data);
                }
            }
            None => {}
        }
        Ok(out)
    }))
    .unwrap_or_else(|_| Err(Error::msg("internal error in the model (the server keeps running)")))
}
