//! Workers that answer every command at once without IO: the `noop` variant of the benchmark,
//! which measures what the orchestration itself costs. The charge of a customer whose id starts
//! with `decline` is declined (the benchmark's failure injection: the card itself is a secret
//! the command does not carry, and a noop worker reads nothing).
//!
//! Without IO there is no order to check a command against: unlike the real services
//! ([`crate::orders::check`]), these answer any command of the shop's contracts that decodes,
//! stray or forged ones included. They do nothing either, so nothing is charged, held or
//! booked.

use chrono::{Duration, Utc};
use sagas::shop::{inventory, payment, shipping};
use sagas::wire::{Command, ReplyOutcome};

use crate::bus::{self, Handler};

pub struct Noop {
    /// The pool it answers for.
    pub service: &'static str,
}

impl Handler for Noop {
    async fn handle(&self, cmd: &Command) -> Result<ReplyOutcome, bus::Error> {
        Ok(match self.service {
            inventory::SERVICE => match bus::payload(cmd, self.service)? {
                inventory::Command::ReserveStock { hold_seconds, .. } => {
                    ReplyOutcome::succeeded(&inventory::Output::StockReserved {
                        reservation_id: None,
                        expires_at: Utc::now() + Duration::seconds(i64::from(hold_seconds)),
                    })
                }
                inventory::Command::ReleaseStock { .. } => {
                    ReplyOutcome::succeeded(&inventory::Output::StockReleased)
                }
                inventory::Command::CommitStock { .. } => {
                    ReplyOutcome::succeeded(&inventory::Output::StockCommitted)
                }
                inventory::Command::PickOrder { .. } => {
                    ReplyOutcome::succeeded(&inventory::Output::OrderPicked)
                }
                inventory::Command::Restock { .. } => {
                    ReplyOutcome::succeeded(&inventory::Output::Restocked { units: 0 })
                }
            },
            payment::SERVICE => match bus::payload(cmd, self.service)? {
                payment::Command::ChargePayment { customer_id, .. }
                    if customer_id.starts_with("decline") =>
                {
                    ReplyOutcome::refused("card_declined", "the card was declined")
                }
                payment::Command::ChargePayment { .. } => {
                    ReplyOutcome::succeeded(&payment::Output::PaymentCharged {
                        charge_id: cmd.id.as_uuid(),
                        processor_ref: "noop".into(),
                    })
                }
                payment::Command::RefundPayment { .. } => {
                    ReplyOutcome::succeeded(&payment::Output::PaymentRefunded { refund_id: None })
                }
                payment::Command::VerifyCharge { charge_id, .. } => {
                    ReplyOutcome::succeeded(&payment::Output::ChargeVerified { charge_id })
                }
            },
            shipping::SERVICE => match bus::payload(cmd, self.service)? {
                shipping::Command::CreateShipment { .. } => {
                    ReplyOutcome::succeeded(&shipping::Output::ShipmentCreated {
                        shipment_id: cmd.id.as_uuid(),
                        tracking_number: "NOOP".into(),
                    })
                }
                shipping::Command::CancelShipment { .. } => {
                    ReplyOutcome::succeeded(&shipping::Output::ShipmentCancelled)
                }
                shipping::Command::RequestPickup { shipment_id, .. } => {
                    ReplyOutcome::succeeded(&shipping::Output::PickupRequested {
                        shipment_id,
                        tracking_number: "NOOP".into(),
                    })
                }
            },
            other => {
                return Err(bus::Error::Poison(format!(
                    "the noop worker has no contract for the {other} service"
                )));
            }
        })
    }
}
