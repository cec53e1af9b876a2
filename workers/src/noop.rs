//! Workers that answer every command at once without IO: the `noop` variant of the benchmark,
//! which measures what the orchestration itself costs. The charge of a customer whose id starts
//! with `decline` is declined (the benchmark's failure injection: the card itself is a secret
//! the command does not carry, and a noop worker reads nothing).
//!
//! Without IO there is no order to check a command against: unlike the real services
//! ([`crate::orders::check`]), these answer any command that decodes, stray or forged ones
//! included. They do nothing either, so nothing is charged, held or booked.

use chrono::{Duration, Utc};
use sagas::wire::{Command, CommandBody, ReplyOutcome, StepOutput};

use crate::bus::{self, Handler};

pub struct Noop;

impl Handler for Noop {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, bus::Error> {
        let output = match &cmd.body {
            CommandBody::ReserveStock { hold_seconds, .. } => StepOutput::StockReserved {
                expires_at: Utc::now() + Duration::seconds(i64::from(*hold_seconds)),
            },
            CommandBody::ReleaseStock { .. } => StepOutput::StockReleased,
            CommandBody::CommitStock { .. } => StepOutput::StockCommitted,
            CommandBody::ChargePayment { customer_id, .. }
                if customer_id.starts_with("decline") =>
            {
                return Ok(ReplyOutcome::Failed {
                    retryable: false,
                    code: "card_declined".into(),
                    reason: "the card was declined".into(),
                });
            }
            CommandBody::ChargePayment { .. } => StepOutput::PaymentCharged {
                charge_id: cmd.id.as_uuid(),
                processor_ref: "noop".into(),
            },
            CommandBody::RefundPayment { .. } => StepOutput::PaymentRefunded { refund_id: None },
            CommandBody::CreateShipment { .. } => StepOutput::ShipmentCreated {
                shipment_id: cmd.id.as_uuid(),
                tracking_number: "NOOP".into(),
            },
            CommandBody::CancelShipment { .. } => StepOutput::ShipmentCancelled,
        };
        Ok(ReplyOutcome::Succeeded { output })
    }
}
