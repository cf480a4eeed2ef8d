//! A queue of work shared by a few tasks, the shape every parallel step of a PostgreSQL
//! snapshot or restore has: each task opens its own connection once, then takes items until
//! the queue is empty. The first failure empties the queue, so the other tasks stop after the
//! item in hand (a half-done snapshot or restore is abandoned as a whole), and is the error
//! returned.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Items waiting for a task.
pub struct WorkQueue<T> {
    items: Mutex<VecDeque<T>>,
}

impl<T> WorkQueue<T> {
    fn new(items: impl IntoIterator<Item = T>) -> WorkQueue<T> {
        WorkQueue {
            items: Mutex::new(items.into_iter().collect()),
        }
    }

    /// The next item, or `None` when the queue is empty (or was emptied by a failure).
    pub fn pop(&self) -> Option<T> {
        self.lock().pop_front()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Run up to `workers` tasks (at least one, at most one per item), each made by `worker` and
/// taking items from one queue holding `items` in order. Returns every task's output, or the
/// first failure; `what` names the step in the error of a task that panicked.
pub async fn run<T, R, F, Fut>(
    items: impl IntoIterator<Item = T>,
    workers: usize,
    what: &str,
    worker: F,
) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(Arc<WorkQueue<T>>) -> Fut,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let queue = Arc::new(WorkQueue::new(items));
    let workers = workers.clamp(1, queue.len().max(1));
    let tasks: Vec<_> = (0..workers).map(|_| worker(queue.clone())).collect();
    let stop = queue.clone();
    spawn_all(tasks, move || stop.clear(), what).await
}

/// Run `tasks` at once, each on its own tokio task; the first to fail calls `stop` (so the
/// others stop taking work) and is the error returned, else every task's output in order.
/// `what` names the step in the error of a task that panicked. [`run`] is this over one queue;
/// a step with its own schedule (the PostgreSQL row load) calls it directly.
pub async fn spawn_all<R, Fut>(
    tasks: Vec<Fut>,
    stop: impl Fn() + Clone + Send + 'static,
    what: &str,
) -> Result<Vec<R>>
where
    R: Send + 'static,
    Fut: Future<Output = Result<R>> + Send + 'static,
{
    let handles: Vec<_> = tasks
        .into_iter()
        .map(|task| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let result = task.await;
                if result.is_err() {
                    stop();
                }
                result
            })
        })
        .collect();
    let mut outputs = Vec::with_capacity(handles.len());
    let mut first_error = None;
    for handle in handles {
        match handle.await {
            Ok(Ok(output)) => outputs.push(output),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::other(format!("{what}: a task failed: {e}")));
            }
        }
    }
    first_error.map_or(Ok(outputs), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn every_item_is_taken_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let outputs = run(0..100, 3, "test", |queue| {
            let seen = seen.clone();
            async move {
                let mut n = 0;
                while let Some(i) = queue.pop() {
                    seen.lock().unwrap().push(i);
                    n += 1;
                    tokio::task::yield_now().await;
                }
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(outputs.len(), 3);
        assert_eq!(outputs.iter().sum::<i32>(), 100);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_failure_stops_the_others_and_is_returned() {
        let taken = Arc::new(AtomicUsize::new(0));
        let err = run(0..1000, 2, "test", |queue| {
            let taken = taken.clone();
            async move {
                while let Some(i) = queue.pop() {
                    taken.fetch_add(1, Ordering::SeqCst);
                    if i == 10 {
                        return Err(Error::other("item 10 failed"));
                    }
                    tokio::task::yield_now().await;
                }
                Ok(())
            }
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("item 10 failed"), "{err}");
        assert!(taken.load(Ordering::SeqCst) < 1000);
    }

    #[tokio::test]
    async fn no_more_tasks_than_items() {
        let outputs = run(0..2, 8, "test", |queue| async move {
            Ok(std::iter::from_fn(|| queue.pop()).count())
        })
        .await
        .unwrap();
        assert_eq!(outputs.len(), 2);
    }
}
