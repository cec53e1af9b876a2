//! Logging, and traces. Every log line carries the correlation id of what it serves (a request,
//! a command, a reply, an event) through the `correlation_id` field of the span it is logged in.
//!
//! **Traces** are exported over OTLP (HTTP, JSON) when the standard variable
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`OTEL_SERVICE_NAME` and the `OTEL_BSP_*` batch settings
//! are read too); otherwise nothing of them is built. A saga is one trace, whatever process
//! works on it and however long it lives: its trace id is its saga id (both are 128 bits), and
//! its root span (`saga`, exported when the saga starts) has an id derived from it. The spans
//! of the HTTP request that started it, of each input the engine applies, of each command a
//! worker handles and of each reply are children of that root, and a message carries it in the
//! W3C `traceparent` header beside the correlation id. So no process needs to store a trace
//! context, and the dashboard links a saga's trace by its id.

use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The W3C trace-context header on commands, replies and events.
pub const TRACEPARENT: &str = "traceparent";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

thread_local! {
    /// The ids the next span made on this thread gets (a saga's root span), instead of random
    /// ones.
    static FORCED_IDS: std::cell::Cell<Option<(TraceId, SpanId)>> = const { std::cell::Cell::new(None) };
}

/// Random ids, but for a saga's root span: its trace id is the saga id, its span id derived
/// from it ([`saga_started`]).
#[derive(Debug)]
struct SagaIds(opentelemetry_sdk::trace::RandomIdGenerator);

impl opentelemetry_sdk::trace::IdGenerator for SagaIds {
    fn new_trace_id(&self) -> TraceId {
        FORCED_IDS
            .with(|f| f.get())
            .map_or_else(|| self.0.new_trace_id(), |(t, _)| t)
    }

    fn new_span_id(&self) -> SpanId {
        FORCED_IDS
            .with(|f| f.get())
            .map_or_else(|| self.0.new_span_id(), |(_, s)| s)
    }
}

/// Whether traces are exported (the OTLP endpoint is configured).
pub fn tracing_enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Install the global subscriber, writing to stderr, and the trace exporter when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set; `service` names this process in the traces (unless
/// `OTEL_SERVICE_NAME` does). `RUST_LOG` wins over the configured level.
pub fn init(format: LogFormat, level: &str, service: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let otel = exporter(service).map(|provider| {
        let tracer = provider.tracer("saga-orchestrator");
        let _ = PROVIDER.set(provider);
        tracing_opentelemetry::layer().with_tracer(tracer)
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init(),
    };
    // A second init (tests that start several apps in one process) keeps the first subscriber.
    let _ = result;
}

fn exporter(service: &str) -> Option<SdkTracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    if endpoint.trim().is_empty() {
        return None;
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: traces are not exported: {e}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_id_generator(SagaIds(Default::default()))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(name)
                    .build(),
            )
            .build(),
    )
}

/// Export what is buffered (at the end of the process).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
    }
}

/// The id of a saga's root span: derived from the saga id, so every process knows it.
fn root_span_id(saga: uuid::Uuid) -> SpanId {
    let b = saga.as_bytes();
    let mut id = [0u8; 8];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = b[i] ^ b[i + 8] ^ 0x5a;
    }
    if id == [0; 8] {
        id[7] = 1;
    }
    SpanId::from_bytes(id)
}

/// The trace context of saga `saga`: its trace, with its root span as the parent.
pub fn saga_context(saga: uuid::Uuid) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(*saga.as_bytes()),
        root_span_id(saga),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// The `traceparent` header of saga `saga`'s messages.
pub fn traceparent(saga: uuid::Uuid) -> String {
    format!(
        "00-{}-{}-01",
        TraceId::from_bytes(*saga.as_bytes()),
        root_span_id(saga)
    )
}

/// The trace context a `traceparent` header names, if it is well-formed.
pub fn context_from_traceparent(value: &str) -> Option<Context> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?);
    if trace == TraceId::INVALID || span == SpanId::INVALID {
        return None;
    }
    Some(Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    )))
}

/// Put `span` into saga `saga`'s trace (a child of its root); nothing when traces are off.
pub fn join_saga(span: &tracing::Span, saga: uuid::Uuid) {
    if tracing_enabled() {
        let _ = span.set_parent(saga_context(saga));
    }
}

/// Put `span` into the trace a message's `traceparent` names; nothing when traces are off or
/// the header is missing or malformed.
pub fn join_traceparent(span: &tracing::Span, value: Option<&str>) {
    if tracing_enabled()
        && let Some(cx) = value.and_then(context_from_traceparent)
    {
        let _ = span.set_parent(cx);
    }
}

/// Export saga `saga`'s root span (at its start): `saga <type>`, from `started` to now.
pub fn saga_started(saga: uuid::Uuid, saga_type: &str, correlation_id: &str, started: SystemTime) {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    let tracer = provider.tracer("saga-orchestrator");
    let builder = tracer
        .span_builder(format!("saga {saga_type}"))
        .with_kind(SpanKind::Internal)
        .with_start_time(started)
        .with_attributes([
            KeyValue::new("saga.id", saga.to_string()),
            KeyValue::new("saga.type", saga_type.to_owned()),
            KeyValue::new("correlation_id", correlation_id.to_owned()),
        ]);
    FORCED_IDS.with(|f| {
        f.set(Some((
            TraceId::from_bytes(*saga.as_bytes()),
            root_span_id(saga),
        )))
    });
    let mut span = builder.start_with_context(&tracer, &Context::new());
    FORCED_IDS.with(|f| f.set(None));
    span.end();
}

/// Export a span of saga `saga`'s trace (a child of its root) named `name`, from `started` to
/// now: for work that learns its saga's id only at its end (the HTTP request that starts it).
pub fn saga_span(saga: uuid::Uuid, name: &str, started: SystemTime, attributes: Vec<KeyValue>) {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    let tracer = provider.tracer("saga-orchestrator");
    let mut span = tracer
        .span_builder(name.to_owned())
        .with_kind(SpanKind::Server)
        .with_start_time(started)
        .with_attributes(attributes)
        .start_with_context(&tracer, &saga_context(saga));
    span.end();
}

/// A new correlation id, for what arrives without one.
pub fn new_correlation_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saga_s_traceparent_names_its_trace_and_root() {
        let saga = uuid::Uuid::parse_str("0192a000-0000-7000-8000-0000000000ff").unwrap();
        let header = traceparent(saga);
        assert_eq!(header.len(), 55, "{header}");
        assert!(
            header.starts_with(&format!("00-{}-", saga.simple())),
            "{header}"
        );
        let cx = context_from_traceparent(&header).expect("well-formed");
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id(), TraceId::from_bytes(*saga.as_bytes()));
        assert_eq!(sc.span_id(), root_span_id(saga));
        assert!(sc.is_remote() && sc.is_sampled());
        for bad in [
            "",
            "00-abc-def-01",
            "01-0192a000000070008000000000000ff-0000000000000001-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
        ] {
            assert!(context_from_traceparent(bad).is_none(), "{bad}");
        }
    }
}
