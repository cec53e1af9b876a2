//! Group commit for workers: many concurrent commands each need one small write; a
//! [`Batcher`] queues them and runs one statement (one round trip, one commit) for everything
//! queued, like the orchestrator's engine does. Under load a batch grows while the previous one
//! commits; alone, a request is written at once.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::bus::Unavailable;

type Reply<O> = oneshot::Sender<Result<O, Arc<sqlx::Error>>>;

/// A row of a batched lookup: the statement numbers its keys with `unnest(..) WITH ORDINALITY
/// AS k(.., n)` (from 1) and returns that number in its column `n`, which the row's struct
/// (read by `sqlx::query_as!`, by column name) hands over here.
pub trait Numbered {
    /// The row's `n`: the number of the key it was found for.
    fn n(&self) -> i64;
}

/// The input a row of a batched lookup answers, counted from 0 (its [`Numbered::n`] less one);
/// `Err` for a number outside the `inputs` keys.
pub fn input_of(row: &impl Numbered, inputs: usize) -> Result<usize, sqlx::Error> {
    let n = row.n();
    usize::try_from(n - 1)
        .ok()
        .filter(|i| *i < inputs)
        .ok_or_else(|| sqlx::Error::Protocol(format!("a lookup row names input {n} of {inputs}")))
}

pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Start a batcher that runs `run` on up to `max` queued inputs at a time; `run` returns
    /// one output per input, in order. It stops when every handle is dropped.
    pub fn spawn<F, Fut>(max: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, sqlx::Error>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(I, Reply<O>)>(max * 4);
        tokio::spawn(async move {
            let mut queued = Vec::with_capacity(max);
            while rx.recv_many(&mut queued, max).await > 0 {
                let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = queued.drain(..).unzip();
                match run(inputs).await {
                    Ok(outputs) => {
                        for (reply, out) in replies.into_iter().zip(outputs) {
                            let _ = reply.send(Ok(out));
                        }
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        for reply in replies {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queue one input and wait for its output.
    pub async fn call(&self, input: I) -> Result<O, Unavailable> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((input, reply))
            .await
            .map_err(|_| Unavailable("the batch writer stopped".into()))?;
        rx.await
            .map_err(|_| Unavailable("the batch writer stopped".into()))?
            .map_err(|e| Unavailable(format!("database: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Row(i64);

    impl Numbered for Row {
        fn n(&self) -> i64 {
            self.0
        }
    }

    #[test]
    fn a_row_answers_the_input_its_ordinality_names() {
        assert_eq!(input_of(&Row(1), 3).unwrap(), 0);
        assert_eq!(input_of(&Row(3), 3).unwrap(), 2);
        assert!(input_of(&Row(0), 3).is_err());
        assert!(input_of(&Row(4), 3).is_err());
    }
}
