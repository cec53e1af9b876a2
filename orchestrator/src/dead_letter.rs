//! The dead-letter subject: where a message that cannot be processed is set aside, with the
//! reason and the subject it came from, for an operator to look at.

use async_nats::HeaderMap;
use async_nats::jetstream;
use sagas::wire::{Subjects, headers};

#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    subjects: Subjects,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, subjects: Subjects) -> Self {
        Self { js, subjects }
    }

    /// Store `msg` on `<prefix>.dlq.<origin>` and wait for JetStream's acknowledgement.
    pub async fn put(
        &self,
        origin: &str,
        msg: &jetstream::Message,
        reason: &str,
    ) -> Result<(), async_nats::Error> {
        let mut h = HeaderMap::new();
        if let Some(original) = &msg.headers {
            for (name, values) in original.iter() {
                // A dead letter is not a duplicate of what it carries.
                if AsRef::<str>::as_ref(name) == headers::MSG_ID {
                    continue;
                }
                for v in values {
                    h.append(name.clone(), v.clone());
                }
            }
        }
        // Header values are one line.
        let reason: String = reason
            .chars()
            .filter(|c| !c.is_control())
            .take(512)
            .collect();
        tracing::warn!(origin, reason = %reason, subject = %msg.subject, "message dead-lettered");
        h.insert(headers::DEAD_LETTER_REASON, reason.as_str());
        h.insert(headers::DEAD_LETTER_SUBJECT, msg.subject.as_str());
        self.js
            .publish_with_headers(self.subjects.dead_letter(origin), h, msg.payload.clone())
            .await?
            .await?;
        Ok(())
    }
}
