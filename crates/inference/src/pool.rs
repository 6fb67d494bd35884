//! A bounded pool of inference threads.
//!
//! Model runs take milliseconds of CPU: on the async executor they would stall every HTTP request and
//! the mesh. Here they run on dedicated threads behind a bounded queue; when the queue is full the
//! caller gets [`InferenceError::QueueFull`] at once instead of waiting behind a backlog.

use crate::models::Models;
use crate::{Embedding, InferenceError};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::oneshot;

/// Requests that may wait for a worker. A POS burst is a handful of queries; 32 waiting means the
/// device is overloaded, and answering "busy" beats answering in seconds.
pub const DEFAULT_QUEUE_LEN: usize = 32;
/// Most worker threads: each holds a model run's scratch memory; the devices have 2–4 cores.
pub const MAX_WORKERS: usize = 8;

/// Runs the work and returns how to hand its result back: the worker counts the job as completed
/// before the caller can see the result, so a caller holding a result always finds it counted.
type Job = Box<dyn FnOnce(&Models) -> Box<dyn FnOnce() + Send> + Send>;

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    completed: AtomicU64,
    rejected: AtomicU64,
    busy_us: AtomicU64,
}

/// A snapshot of the pool's counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PoolStats {
    pub workers: usize,
    pub queue_capacity: usize,
    pub queued: u64,
    pub completed: u64,
    pub rejected_queue_full: u64,
    pub busy_us: u64,
}

pub struct InferencePool {
    tx: Option<SyncSender<Job>>,
    models: Arc<Models>,
    counters: Arc<Counters>,
    workers: Vec<JoinHandle<()>>,
    queue_capacity: usize,
}

impl InferencePool {
    pub fn new(models: Arc<Models>, workers: usize, queue_len: usize) -> InferencePool {
        let workers = workers.clamp(1, MAX_WORKERS);
        let queue_capacity = queue_len.max(1);
        let (tx, rx) = sync_channel::<Job>(queue_capacity);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let counters = Arc::new(Counters::default());
        let handles = (0..workers)
            .map(|i| {
                let rx = rx.clone();
                let models = models.clone();
                let counters = counters.clone();
                std::thread::Builder::new()
                    .name(format!("inference-{i}"))
                    .spawn(move || loop {
                        // Holding the lock only while taking a job: the other workers wait on it, not on the run.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        counters.queued.fetch_sub(1, Ordering::Relaxed);
                        let started = Instant::now();
                        let deliver = job(&models);
                        counters.busy_us.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        counters.completed.fetch_add(1, Ordering::Relaxed);
                        deliver();
                    })
                    .expect("spawning an inference thread")
            })
            .collect();
        InferencePool { tx: Some(tx), models, counters, workers: handles, queue_capacity }
    }

    pub fn models(&self) -> &Arc<Models> {
        &self.models
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            workers: self.workers.len(),
            queue_capacity: self.queue_capacity,
            queued: self.counters.queued.load(Ordering::Relaxed),
            completed: self.counters.completed.load(Ordering::Relaxed),
            rejected_queue_full: self.counters.rejected.load(Ordering::Relaxed),
            busy_us: self.counters.busy_us.load(Ordering::Relaxed),
        }
    }

    /// Queues `f` to run on a worker with the models; resolves with its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Models) -> Result<T, InferenceError> + Send + 'static,
    ) -> Result<T, InferenceError> {
        let rx = self.submit(f)?;
        rx.await.map_err(|_| InferenceError::PoolClosed)?
    }

    /// Queues `f` without waiting; the receiver yields its result. Errors at once if the queue is full.
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Models) -> Result<T, InferenceError> + Send + 'static,
    ) -> Result<oneshot::Receiver<Result<T, InferenceError>>, InferenceError> {
        let (done, rx) = oneshot::channel();
        let job: Job = Box::new(move |models| {
            let span = tracing::debug_span!("inference");
            let _enter = span.enter();
            let result = f(models);
            // The caller may have gone away (a closed HTTP request); its result is simply dropped.
            Box::new(move || {
                let _ = done.send(result);
            })
        });
        let tx = self.tx.as_ref().ok_or(InferenceError::PoolClosed)?;
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                Err(InferenceError::QueueFull(self.queue_capacity))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Err(InferenceError::PoolClosed)
            }
        }
    }

    /// Embeds a search query or product text. Fails at once, without queueing, if there is no text model.
    pub async fn embed_text(&self, text: String) -> Result<Embedding, InferenceError> {
        if self.models.text.is_none() {
            return Err(InferenceError::ModelUnavailable("text"));
        }
        self.run(move |m| m.text.as_ref().ok_or(InferenceError::ModelUnavailable("text"))?.embed(&text)).await
    }

    /// Embeds a JPEG or PNG photo. Fails at once, without queueing, if there is no image model.
    pub async fn embed_image(&self, photo: Vec<u8>) -> Result<Embedding, InferenceError> {
        if self.models.image.is_none() {
            return Err(InferenceError::ModelUnavailable("image"));
        }
        self.run(move |m| m.image.as_ref().ok_or(InferenceError::ModelUnavailable("image"))?.embed(&photo)).await
    }
}

impl Drop for InferencePool {
    fn drop(&mut self) {
        // Closing the queue ends each worker after the job it is running.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn a_full_queue_is_an_immediate_error_not_a_wait() {
        let pool = InferencePool::new(Arc::new(Models::none("test")), 1, 2);
        let (release_tx, release_rx) = channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        // One job occupies the worker (once it has taken it off the queue); two more fill the queue.
        let mut waiting = Vec::new();
        for i in 0..3 {
            let r = release_rx.clone();
            waiting.push(pool.submit(move |_| Ok(r.lock().unwrap().recv().is_ok())).unwrap());
            while i == 0 && pool.stats().queued > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        match pool.submit(|_| Ok(())) {
            Err(InferenceError::QueueFull(2)) => {}
            other => panic!("expected QueueFull(2), got {:?}", other.map(|_| ())),
        }
        assert_eq!(pool.stats().rejected_queue_full, 1);
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        for rx in waiting {
            assert!(rx.blocking_recv().unwrap().unwrap());
        }
        assert_eq!(pool.stats().completed, 3);
        assert_eq!(pool.stats().queued, 0);
    }

    #[test]
    fn without_a_model_embedding_fails_at_once_with_the_model_named() {
        let pool = InferencePool::new(Arc::new(Models::none("switched off")), 1, 4);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(matches!(rt.block_on(pool.embed_text("honey".into())), Err(InferenceError::ModelUnavailable("text"))));
        assert!(matches!(rt.block_on(pool.embed_image(vec![1, 2, 3])), Err(InferenceError::ModelUnavailable("image"))));
        assert_eq!(pool.stats().completed, 0);
    }
}
