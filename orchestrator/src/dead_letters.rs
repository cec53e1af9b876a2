//! The dead letters an operator sees and acts on: messages a consumer set aside
//! (`<prefix>.dlq.<origin>`, stream `DEAD_LETTERS`, with the reason and the subject they came
//! on), listed newest first, replayed to where they came from, or discarded.
//!
//! A replay publishes the message again on its subject with its headers (but the dead-letter
//! ones) and a `Nats-Msg-Id` of `dlq-replay:<sequence>`, so that two replays of one letter
//! within JetStream's duplicate window publish it once; then it deletes the letter. Every
//! consumer is idempotent on what it receives (commands by id, replies fenced by attempt), so a
//! replay that reaches a message's target twice does nothing twice.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use sagas::wire::{Subjects, headers};
use serde::Serialize;

/// One dead letter, as the list shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Letter {
    /// Its sequence in the dead-letter stream: how an operator names it.
    pub seq: u64,
    /// The consumer that set it aside (`replies`, `signals`, a worker pool...).
    pub origin: String,
    /// The subject it came on, where a replay sends it.
    pub subject: String,
    pub reason: String,
    pub at: DateTime<Utc>,
    pub size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The payload, when it is JSON (payment tokens removed; they are never in one anyway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no dead letter {0}")]
    NotFound(u64),
    #[error("JetStream did not answer: {0}")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> Error {
    Error::Nats(e.to_string())
}

/// The dead letters of one deployment.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    subjects: Subjects,
    stream: String,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, subjects: Subjects, stream: String) -> Self {
        Self {
            js,
            subjects,
            stream,
        }
    }

    async fn stream(&self) -> Result<stream::Stream, Error> {
        self.js.get_stream(&self.stream).await.map_err(nats)
    }

    fn origin_of<'a>(&self, subject: &'a str) -> &'a str {
        let prefix = self.subjects.dead_letter("");
        subject.strip_prefix(prefix.as_str()).unwrap_or(subject)
    }

    /// How many letters each origin has.
    pub async fn counts(&self) -> Result<BTreeMap<String, u64>, Error> {
        let stream = self.stream().await?;
        let mut subjects = stream
            .info_with_subjects(self.subjects.dead_letters())
            .await
            .map_err(nats)?;
        let mut counts = BTreeMap::new();
        while let Some((subject, n)) = subjects.try_next().await.map_err(nats)? {
            counts.insert(self.origin_of(&subject).to_owned(), n as u64);
        }
        Ok(counts)
    }

    /// Up to `limit` letters, newest first, of `origin` if given, older than `before` if given.
    pub async fn list(
        &self,
        origin: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Letter>, Error> {
        let mut stream = self.stream().await?;
        let state = stream.info().await.map_err(nats)?.state.clone();
        if state.messages == 0 {
            return Ok(Vec::new());
        }
        let mut seq = before
            .map_or(state.last_sequence, |b| b.saturating_sub(1))
            .min(state.last_sequence);
        let mut letters = Vec::new();
        // Walk down from the newest; deleted sequences are gaps. Bounded, so that a page over
        // a stream of gaps still answers.
        let mut looked = 0;
        while seq >= state.first_sequence && seq > 0 && letters.len() < limit && looked < 10_000 {
            looked += 1;
            if let Some(letter) = self.get(&stream, seq).await?
                && origin.is_none_or(|o| letter.origin == o)
            {
                letters.push(letter);
            }
            seq -= 1;
        }
        Ok(letters)
    }

    async fn get(&self, stream: &stream::Stream, seq: u64) -> Result<Option<Letter>, Error> {
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if e.to_string().contains("no message found") => return Ok(None),
            Err(e) => return Err(nats(e)),
        };
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
        let mut payload: Option<serde_json::Value> = serde_json::from_slice(&msg.payload).ok();
        if let Some(p) = payload.as_mut() {
            crate::privacy::drop_secrets(p);
        }
        Ok(Some(Letter {
            seq,
            origin: self.origin_of(msg.subject.as_str()).to_owned(),
            subject: header(headers::DEAD_LETTER_SUBJECT).unwrap_or_default(),
            reason: header(headers::DEAD_LETTER_REASON).unwrap_or_default(),
            at: DateTime::from_timestamp(msg.time.unix_timestamp(), msg.time.nanosecond())
                .unwrap_or_default(),
            size: msg.payload.len(),
            correlation_id: header(headers::CORRELATION_ID),
            payload,
        }))
    }

    /// One letter by its sequence.
    pub async fn letter(&self, seq: u64) -> Result<Letter, Error> {
        let stream = self.stream().await?;
        self.get(&stream, seq).await?.ok_or(Error::NotFound(seq))
    }

    /// Send letter `seq` back to its subject, then delete it.
    pub async fn replay(&self, seq: u64) -> Result<Letter, Error> {
        let stream = self.stream().await?;
        let msg = match stream.get_raw_message(seq).await {
            Ok(m) => m,
            Err(e) if e.to_string().contains("no message found") => {
                return Err(Error::NotFound(seq));
            }
            Err(e) => return Err(nats(e)),
        };
        let letter = self.get(&stream, seq).await?.ok_or(Error::NotFound(seq))?;
        if letter.subject.is_empty() {
            return Err(Error::Nats(format!(
                "dead letter {seq} does not say where it came from"
            )));
        }
        let mut h = HeaderMap::new();
        for (name, values) in msg.headers.iter() {
            let name_str: &str = name.as_ref();
            if name_str == headers::DEAD_LETTER_REASON
                || name_str == headers::DEAD_LETTER_SUBJECT
                || name_str == headers::MSG_ID
            {
                continue;
            }
            for v in values {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(headers::MSG_ID, format!("dlq-replay:{seq}").as_str());
        self.js
            .publish_with_headers(letter.subject.clone(), h, msg.payload.clone())
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        self.delete(&stream, seq).await?;
        Ok(letter)
    }

    /// Delete letter `seq` without sending it anywhere.
    pub async fn discard(&self, seq: u64) -> Result<Letter, Error> {
        let stream = self.stream().await?;
        let letter = self.get(&stream, seq).await?.ok_or(Error::NotFound(seq))?;
        self.delete(&stream, seq).await?;
        Ok(letter)
    }

    async fn delete(&self, stream: &stream::Stream, seq: u64) -> Result<(), Error> {
        match stream.delete_message(seq).await {
            Ok(_) => Ok(()),
            // Deleted meanwhile (a second operator, a replay that raced): the same outcome.
            Err(e) if e.to_string().contains("no message found") => Ok(()),
            Err(e) => Err(nats(e)),
        }
    }
}
