//! A two-stage pipeline: a producer thread prepares items (decodes and preprocesses image batches,
//! itself in parallel on the rayon pool) while the caller consumes the previous ones (runs the
//! model), through a bounded channel so the producer stays at most `depth` items ahead (depth 1:
//! batch i+1 is prepared while batch i computes; memory stays bounded).
use crate::error::{Error, Result};
use std::sync::mpsc::sync_channel;

/// Runs `produce` on its own thread, handing it a `send` that returns false once the consumer has
/// stopped (then `produce` should return), and `consume`s what it sends, in order, on this thread.
/// The first error of either side ends both and is returned; a panic in `produce` is an error.
pub fn pipeline<T: Send>(depth: usize, produce: impl FnOnce(&dyn Fn(Result<T>) -> bool) + Send, mut consume: impl FnMut(T) -> Result<()>) -> Result<()> {
    let (tx, rx) = sync_channel::<Result<T>>(depth.max(1));
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || produce(&|item| tx.send(item).is_ok()));
        let mut out = Ok(());
        for item in rx.iter() {
            if let Err(e) = item.and_then(&mut consume) {
                out = Err(e);
                break;
            }
        }
        drop(rx); // a producer blocked in send() gets false and returns
        match producer.join() {
            Err(_) if out.is_ok() => Err(Error::msg("the data loader thread panicked")),
            _ => out,
        }
    })
}
