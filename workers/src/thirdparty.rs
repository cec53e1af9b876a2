//! The idempotent call to a third party (the card processor, the carrier), written once for the
//! services that make one: claim, call, settle, void. A service's effect is a row of its own
//! table that is both the effect and its record, one per idempotency key; the service says how
//! to read and write its rows and how to talk to its third party ([`Service`]), and [`Calls`]
//! runs the discipline over them.
//!
//! A forward command ([`Calls::make`]) answers from the recorded row when there is one. Without
//! a row it calls the third party under the key and writes the row once, with the result
//! (settles it): `pending` is written first only when the call is still running after
//! `pending_after`, or before the call when that is zero. A row that changed meanwhile (a
//! compensation voided it, or another delivery settled it) is read again and answered from.
//! A compensation ([`Calls::compensate`]) claims a `voided` tombstone, so that a forward
//! command that comes later does nothing; it hands a made effect back to its service to undo,
//! and otherwise voids the key at the third party, which returns what was made under it (undone
//! then) and refuses anything later. So neither a crash between the call and the write nor a
//! call that timed out here but goes on there leaves anything behind. Claims, settles and status
//! changes go through a [`Batcher`] (group commit), and a status change is guarded by the
//! status it changes.
//!
//! It must never call the third party without the key, write `pending` over a row that is
//! there, or change a row whose status is no longer the one the change starts from (a settle
//! completes only a `pending` row). It must never answer a compensation, or a forward command
//! that finds a tombstone, as done while the third party could still make something under the
//! key: unless the row records what was made, the key is voided there first. It knows no table
//! and no reply of a particular service, and no status but `pending` and `voided`: the others
//! are the service's.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use sagas::wire::ReplyOutcome;
use uuid::Uuid;

use crate::batch::{Batcher, Numbered};
use crate::bus::Unavailable;
use crate::clients::CallError;

/// The status of a call on record while it goes on (or whose process died).
pub const PENDING: &str = "pending";
/// The status of a tombstone: a compensation came first, or voided a call in flight.
pub const VOIDED: &str = "voided";

/// A row to claim: what it holds, and the status it is inserted in.
pub struct Claim<S: Service> {
    pub entry: S::Entry,
    pub status: &'static str,
}

/// A call's result to record: insert the row with it, or complete the row's `pending`.
pub struct Settle<S: Service> {
    pub claim: Claim<S>,
    pub outcome: S::Outcome,
}

/// A status change of a row, with what it writes besides (nothing, for the default outcome).
pub struct Transition<S: Service> {
    pub id: Uuid,
    pub from: &'static str,
    pub to: &'static str,
    pub outcome: S::Outcome,
}

/// What a batched statement returns: one item per input or per row, or the database's error.
pub type Rows<T> = Result<Vec<T>, sqlx::Error>;

/// What a forward command does with the row it finds.
pub enum Recorded {
    /// Answer this: the effect was made, refused or undone.
    Answer(ReplyOutcome),
    /// Undo what the third party may have made under the key: the row is a tombstone.
    Undo,
    /// Call again, under the same key: the row is `pending`, a call that did not finish.
    Call,
}

/// What a compensation leaves to its service.
pub enum Compensation<R> {
    /// The effect was made and is on record: the service undoes it (refund, cancel).
    Made(R),
    /// Nothing is held: nothing was made, or what was made is undone (now or before).
    Done,
    /// The row changed while the compensation voided it: try again.
    Changed,
    /// The third party could not void or undo now: try again.
    Retry(String),
}

/// What [`Calls`] needs of a service: its table (a row per key; the batched statements get at
/// most one settle and one transition per row), its third party, and how its rows answer.
pub trait Service: Clone + Send + Sync + 'static {
    /// What a row is unique by (payment: saga and step; shipping: the order).
    type Key: Clone + Eq + Hash + Send + Sync + 'static;
    /// What a row holds besides its status and result: enough to insert it.
    type Entry: Clone + Send + Sync + 'static;
    /// What a call's result writes into a row; the default writes nothing.
    type Outcome: Default + Send + Sync + 'static;
    /// A row as read.
    type Row: Clone + Send + Sync + 'static;

    /// What a row is called in errors ("charge", "shipment").
    const ROW: &'static str;
    /// The status of a row whose effect was made.
    const MADE: &'static str;
    /// The status of a row whose call the third party refused.
    const REFUSED: &'static str;

    fn key(entry: &Self::Entry) -> Self::Key;
    fn id(row: &Self::Row) -> Uuid;
    fn status(row: &Self::Row) -> &str;
    /// The third party's id of what it made under the row's key, when on record.
    fn made(row: &Self::Row) -> Option<&str>;
    /// The key the third party is called with.
    fn idempotency_key(key: &Self::Key) -> String;

    /// What a forward command answers (or does) for a row it finds.
    fn recorded(row: &Self::Row) -> Recorded;
    /// The answer of a forward command whose effect was undone (it came after a compensation).
    fn cancelled() -> ReplyOutcome;
    /// The answer when the third party cannot be reached: try again.
    fn retryable(reason: String) -> ReplyOutcome;
    /// What a refusal writes into a row.
    fn refusal(code: String, message: String) -> Self::Outcome;

    /// Insert each row in its status unless one with its key is there; every row with those
    /// keys, with whether this statement inserted it.
    fn claim_rows(
        &self,
        claims: &[Claim<Self>],
    ) -> impl Future<Output = Rows<(Self::Key, Self::Row, bool)>> + Send;
    /// Insert each row with its result, or complete it when it is `pending`; the rows written.
    fn settle_rows(
        &self,
        settles: &[&Settle<Self>],
    ) -> impl Future<Output = Rows<(Self::Key, Self::Row)>> + Send;
    /// Move each row from `from` to `to` where it is still in `from`; the ids of those moved.
    fn transition_rows(
        &self,
        transitions: &[&Transition<Self>],
    ) -> impl Future<Output = Rows<Uuid>> + Send;
    /// The row of a key.
    fn row(
        &self,
        key: &Self::Key,
    ) -> impl Future<Output = Result<Option<Self::Row>, sqlx::Error>> + Send;

    /// Void `key` at the third party: what it made under the key (`Some`, to be undone), or
    /// `None`, and then it makes nothing under the key any more.
    fn void(&self, key: &str) -> impl Future<Output = Result<Option<String>, CallError>> + Send;
    /// Undo at the third party what it made under a voided row's key (`made`), and record it.
    /// The outer error is the database's (the command is handed back), the inner one the third
    /// party's (answered as a failure to retry).
    fn undo(
        &self,
        key: &Self::Key,
        row: &Self::Row,
        made: &str,
    ) -> impl Future<Output = Result<Result<(), CallError>, Unavailable>> + Send;
}

/// A definitive failure, with the third party's code.
pub fn refused(code: &str, reason: impl Into<String>) -> ReplyOutcome {
    ReplyOutcome::Failed {
        retryable: false,
        code: code.to_owned(),
        reason: reason.into(),
    }
}

/// The answers of a batched lookup, one per input: each is `T::default()` until `read` fills
/// it from the rows that name it (their column `n` numbers the inputs, see
/// [`crate::batch::input_of`]). A service looks its rows up with what else a command needs (its
/// order, a token, an address) in one statement, and answers through this.
pub fn per_input<R: Numbered, T: Default>(
    rows: Vec<R>,
    inputs: usize,
    mut read: impl FnMut(&mut T, R),
) -> Rows<T> {
    let mut found: Vec<T> = (0..inputs).map(|_| T::default()).collect();
    for r in rows {
        let i = crate::batch::input_of(&r, inputs)?;
        read(&mut found[i], r);
    }
    Ok(found)
}

/// A service's idempotent calls to its third party, and the batched writes of their rows.
pub struct Calls<S: Service> {
    service: S,
    /// How long a call may take before its `pending` row is written.
    pending_after: Duration,
    claims: Batcher<Claim<S>, (S::Row, bool)>,
    settles: Batcher<Settle<S>, Option<S::Row>>,
    transitions: Batcher<Transition<S>, bool>,
}

impl<S: Service> Clone for Calls<S> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            pending_after: self.pending_after,
            claims: self.claims.clone(),
            settles: self.settles.clone(),
            transitions: self.transitions.clone(),
        }
    }
}

impl<S: Service> Calls<S> {
    pub fn new(service: S, pending_after: Duration) -> Self {
        let s = service.clone();
        let claims = Batcher::spawn(256, move |c| {
            let s = s.clone();
            async move { claim_many(&s, c).await }
        });
        let s = service.clone();
        let settles = Batcher::spawn(256, move |c| {
            let s = s.clone();
            async move { settle_many(&s, c).await }
        });
        let s = service.clone();
        let transitions = Batcher::spawn(256, move |t| {
            let s = s.clone();
            async move { transition_many(&s, t).await }
        });
        Self {
            service,
            pending_after,
            claims,
            settles,
            transitions,
        }
    }

    /// The service the calls are made for: its table and its third party's client.
    pub fn service(&self) -> &S {
        &self.service
    }

    /// Insert a row in `status` unless one exists; return the row either way, and whether it
    /// was inserted now. Batched with the other commands in flight.
    async fn claim(
        &self,
        entry: S::Entry,
        status: &'static str,
    ) -> Result<(S::Row, bool), Unavailable> {
        self.claims.call(Claim { entry, status }).await
    }

    /// Move a row from one status to another; false when it was no longer in `from`.
    pub async fn transition(
        &self,
        id: Uuid,
        from: &'static str,
        to: &'static str,
        outcome: S::Outcome,
    ) -> Result<bool, Unavailable> {
        self.transitions
            .call(Transition {
                id,
                from,
                to,
                outcome,
            })
            .await
    }

    /// Make the effect of `entry` once, given the row a lookup found (`recorded`). `call` is
    /// the third party's call under the row's idempotency key, not started yet (it runs only
    /// when no recorded row answers); what it returns is what the row records of the effect.
    pub async fn make(
        &self,
        recorded: Option<S::Row>,
        entry: S::Entry,
        call: impl Future<Output = Result<S::Outcome, CallError>>,
    ) -> Result<ReplyOutcome, Unavailable> {
        let key = S::key(&entry);
        if let Some(row) = &recorded {
            match S::recorded(row) {
                Recorded::Answer(answer) => return Ok(answer),
                Recorded::Undo => return self.undone(&key, row).await,
                // A call that did not finish: make it again, under the same key.
                Recorded::Call => {}
            }
        } else if self.pending_after.is_zero() {
            let (row, _) = self.claim(entry.clone(), PENDING).await?;
            if let Recorded::Undo = S::recorded(&row) {
                return self.undone(&key, &row).await;
            }
        }
        let result = if recorded.is_some() || self.pending_after.is_zero() {
            call.await
        } else {
            tokio::pin!(call);
            tokio::select! {
                biased;
                r = &mut call => r,
                () = tokio::time::sleep(self.pending_after) => {
                    // Slow: put the call on record while it goes on. Whatever the row turns
                    // out to be (a compensation may have voided it), the result settles it
                    // below.
                    self.claim(entry.clone(), PENDING).await?;
                    call.await
                }
            }
        };
        let (settle, refusal) = match result {
            Ok(outcome) => (
                Settle {
                    claim: Claim {
                        entry,
                        status: S::MADE,
                    },
                    outcome,
                },
                None,
            ),
            Err(CallError::Refused { code, message }) => {
                let answer = refused(&code, message.clone());
                let claim = Claim {
                    entry,
                    status: S::REFUSED,
                };
                let outcome = S::refusal(code, message);
                (Settle { claim, outcome }, Some(answer))
            }
            Err(CallError::Unavailable(why)) => return Ok(S::retryable(why)),
        };
        let row = match (self.settles.call(settle).await?, refusal) {
            (Some(_), Some(answer)) => return Ok(answer),
            (Some(row), None) => row,
            // The row is in another status: a compensation voided it while the third party
            // was being called, or another delivery of the command recorded it first.
            (None, _) => self.service.row(&key).await?.expect("a settled row exists"),
        };
        match S::recorded(&row) {
            Recorded::Answer(answer) => Ok(answer),
            // A tombstone. (A row still `pending` cannot be here: nothing writes `pending` over
            // a row, and a settle completes a `pending` one.)
            Recorded::Undo | Recorded::Call => self.undone(&key, &row).await,
        }
    }

    /// Compensate the effect of `tombstone`'s key: claim a `voided` tombstone (so that a
    /// forward command that comes later does nothing), and void whatever is not made yet.
    pub async fn compensate(
        &self,
        tombstone: S::Entry,
    ) -> Result<Compensation<S::Row>, Unavailable> {
        let key = S::key(&tombstone);
        let (row, _) = self.claim(tombstone, VOIDED).await?;
        match S::status(&row) {
            made if made == S::MADE => Ok(Compensation::Made(row)),
            PENDING => {
                // A call is in flight, or its process died: void it. A call that returns
                // later undoes itself; one that went through unseen is found here.
                let voided = self
                    .transition(S::id(&row), PENDING, VOIDED, S::Outcome::default())
                    .await?;
                if !voided {
                    return Ok(Compensation::Changed);
                }
                self.undo_voided(&key, &row).await
            }
            // A tombstone, written now or by an earlier delivery: a call whose answer was
            // never recorded may still have gone through, so the third party is asked.
            VOIDED => self.undo_voided(&key, &row).await,
            // Refused or already undone: nothing is held.
            _ => Ok(Compensation::Done),
        }
    }

    /// [`Calls::undo_voided`], answered to a forward command.
    async fn undone(&self, key: &S::Key, row: &S::Row) -> Result<ReplyOutcome, Unavailable> {
        Ok(match self.undo_voided(key, row).await? {
            Compensation::Retry(why) => S::retryable(why),
            _ => S::cancelled(),
        })
    }

    /// A voided row's effect may still have been made by the third party (a call that raced
    /// the compensation, one from a process that crashed, or one that timed out here and is
    /// still going on there): void its key at the third party, which returns what it already
    /// made (undone here) and refuses anything later. [`Compensation::Done`] or
    /// [`Compensation::Retry`].
    async fn undo_voided(
        &self,
        key: &S::Key,
        row: &S::Row,
    ) -> Result<Compensation<S::Row>, Unavailable> {
        let made = match S::made(row) {
            Some(made) => Some(made.to_owned()),
            None => match self.service.void(&S::idempotency_key(key)).await {
                Ok(found) => found,
                Err(e) => return Ok(Compensation::Retry(e.to_string())),
            },
        };
        if let Some(made) = made
            && let Err(e) = self.service.undo(key, row, &made).await?
        {
            return Ok(Compensation::Retry(e.to_string()));
        }
        Ok(Compensation::Done)
    }
}

/// Claim many rows in one statement: the inserted ones and the others (already there) come
/// back from it; the same row claimed twice in one batch is claimed by the first only.
async fn claim_many<S: Service>(service: &S, claims: Vec<Claim<S>>) -> Rows<(S::Row, bool)> {
    let mut by_key: HashMap<S::Key, (S::Row, bool)> = HashMap::new();
    for (key, row, inserted) in service.claim_rows(&claims).await? {
        // A row inserted now is also seen by the join only in later statements; prefer the
        // insert's answer.
        if inserted || !by_key.contains_key(&key) {
            by_key.insert(key, (row, inserted));
        }
    }
    let mut answered = HashSet::new();
    claims
        .iter()
        .map(|c| {
            let key = S::key(&c.entry);
            match by_key.get(&key) {
                Some((row, inserted)) => Ok((row.clone(), *inserted && answered.insert(key))),
                // Inserted by another transaction that committed after this one looked.
                None => Err(sqlx::Error::Protocol(format!(
                    "a {} was claimed concurrently; retry",
                    S::ROW
                ))),
            }
        })
        .collect()
}

/// The first of each key's inputs: one row once per statement (ON CONFLICT DO UPDATE cannot
/// touch a row twice); a second input for the same row is answered as not applied, and its
/// caller reads the row instead.
fn firsts<T, K: Eq + Hash>(inputs: &[T], key: impl Fn(&T) -> K) -> (Vec<bool>, Vec<&T>) {
    let mut seen = HashSet::new();
    let first: Vec<bool> = inputs.iter().map(|i| seen.insert(key(i))).collect();
    let apply = inputs
        .iter()
        .zip(&first)
        .filter(|(_, f)| **f)
        .map(|(i, _)| i)
        .collect();
    (first, apply)
}

/// Record many calls' results in one statement: insert each row with its final status, or
/// complete it when it is `pending`. `None` for a row that is in another status (a
/// compensation voided it, or another delivery recorded it first): the caller reads it.
async fn settle_many<S: Service>(service: &S, settles: Vec<Settle<S>>) -> Rows<Option<S::Row>> {
    let (first, apply) = firsts(&settles, |s| S::key(&s.claim.entry));
    let mut by_key: HashMap<S::Key, S::Row> =
        service.settle_rows(&apply).await?.into_iter().collect();
    Ok(settles
        .iter()
        .zip(first)
        .map(|(s, f)| f.then(|| by_key.remove(&S::key(&s.claim.entry))).flatten())
        .collect())
}

/// Apply many status changes in one statement; whether each went through.
async fn transition_many<S: Service>(service: &S, transitions: Vec<Transition<S>>) -> Rows<bool> {
    let (first, apply) = firsts(&transitions, |t| t.id);
    let done: HashSet<Uuid> = service.transition_rows(&apply).await?.into_iter().collect();
    Ok(transitions
        .iter()
        .zip(first)
        .map(|(t, f)| f && done.contains(&t.id))
        .collect())
}
