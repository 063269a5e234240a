//! `clipforge bench --task loader --data PATTERN`: images/s of the WebDataset loader alone (index
//! the shards, read each member, decode, preprocess to the model's input, the same producer
//! `embed-image --shards` runs), no model. Compare with the towers' images/s (`clipforge bench`)
//! to see whether decoding keeps up; `--threads N` sets the decode threads.
use super::bench::BenchArgs;
use clipforge::error::{Error, Result};
use clipforge::io::image_prep::PreprocessConfig;
use clipforge::io::shard_stream::stream_shards;
use clipforge::io::shards::shard_list;
use clipforge::model::ClipConfig;
use std::time::Instant;

pub fn run(a: &BenchArgs) -> Result<()> {
    let spec = a.data.as_deref().ok_or_else(|| Error::msg("--task loader needs --data PATTERN (WebDataset tar shards)"))?;
    let shards = shard_list(&[spec])?;
    let (pre, source) = match &a.model {
        Some(dir) => {
            let size = ClipConfig::from_file(&dir.join("config.json"))?.vision.image_size;
            (super::common::preprocess_config(dir, size)?, dir.display().to_string())
        }
        None => {
            let cfg = ClipConfig::preset(&a.preset).ok_or_else(|| Error::msg(format!("--preset {}: expected b32, b16, l14 or l14-336", a.preset)))?;
            (PreprocessConfig::openai(cfg.vision.image_size as u32), format!("OpenAI preprocessing of {}", a.preset))
        }
    };
    let pass = || -> Result<(usize, f64, f64)> {
        let (t, c) = (Instant::now(), cpu_seconds());
        let mut n = 0;
        stream_shards(&shards, &pre, a.batch, false, |b| {
            n += b.keys.len();
            Ok(())
        })?;
        Ok((n, t.elapsed().as_secs_f64(), cpu_seconds() - c))
    };
    let bar = super::progress(a.iters as u64 + 1, "loader passes");
    pass()?; // warm-up: the shards into the page cache
    bar.inc(1);
    let mut runs = vec![];
    for _ in 0..a.iters.max(1) {
        runs.push(pass()?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let n = runs[0].0;
    let mut rates: Vec<f64> = runs.iter().map(|(n, s, _)| *n as f64 / s).collect();
    // CPU time per image (all threads): what a core costs per image, whatever else runs beside
    let mut cpu_ms: Vec<f64> = runs.iter().map(|(n, _, c)| 1e3 * c / *n as f64).collect();
    cpu_ms.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let cpu_ms = cpu_ms[cpu_ms.len() / 2];
    rates.sort_by(|x, y| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal));
    let median = rates[rates.len() / 2];
    let threads = rayon::current_num_threads();
    let size = (pre.crop_h, pre.crop_w);
    if a.json {
        let v = serde_json::json!({"task": "loader", "shards": shards.len(), "images": n, "threads": threads, "batch": a.batch, "preprocess": source, "crop": [size.0, size.1], "images_per_s": median, "runs_images_per_s": rates, "cpu_ms_per_image": cpu_ms, "images_per_s_per_core": 1e3 / cpu_ms});
        println!("{}", serde_json::to_string_pretty(&v).map_err(Error::msg)?);
    } else {
        println!("loader     {} shard(s), {n} images, batch {}, {threads} threads, to {}x{} ({source})", shards.len(), a.batch, size.0, size.1);
        println!("images/s   {median:8.1}   (median of {} passes after a warm-up; read + decode + preprocess, no model)", rates.len());
        println!("CPU time   {cpu_ms:8.2} ms per image = {:.1} images/s per busy core", 1e3 / cpu_ms);
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
