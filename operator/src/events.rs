//! Events the operator publishes: one Event object per call. kube's `Recorder` merges
//! repeats of a reason regarding the same object into one Event (a series that keeps the
//! first note), which hid every rollout step after the first; a recorder per call keeps each
//! step and each CSR decision visible with its own note.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::api::OPERATOR_MANAGER;

/// Publishes one Event `reason` regarding `regarding` (related to `related`), logging a failure.
pub async fn publish(
    client: &kube::Client,
    regarding: &ObjectReference,
    related: Option<ObjectReference>,
    type_: EventType,
    action: &str,
    reason: &str,
    note: &str,
) {
    let recorder = Recorder::new(client.clone(), Reporter { controller: OPERATOR_MANAGER.into(), instance: None });
    let ev = Event { type_, reason: reason.into(), note: Some(note.into()), action: action.into(), secondary: related };
    if let Err(e) = recorder.publish(&ev, regarding).await {
        tracing::warn!("event {reason}: {e}");
    }
}
