//! Where every event path (JSON batch, NDJSON, gRPC client and bidirectional streams)
//! hands its events to the engine, so that summaries and metrics agree across them.

use onrec_engine::{Event, EventOutcome, EventsSummary, FieldError};

use crate::App;
use crate::error::ApiError;
use crate::metrics;

/// Records events one by one and keeps the summary.
#[derive(Debug)]
pub struct EventSink<'a> {
    app: &'a App,
    summary: EventsSummary,
}

impl<'a> EventSink<'a> {
    /// An empty sink over `app`'s engine.
    pub fn new(app: &'a App) -> Self {
        Self {
            app,
            summary: EventsSummary::default(),
        }
    }

    /// Position the next event will have.
    pub fn next_index(&self) -> u64 {
        self.summary.received
    }

    /// Applies one well-formed event. Fails when the shared state cannot take it: then
    /// it is not applied, and the request answers 503 so that the client retries.
    pub async fn push(&mut self, event: &Event) -> Result<EventOutcome, ApiError> {
        let outcome = match self.app.engine().record(event).await {
            Ok(outcome) => outcome,
            Err(e) => {
                let s = &self.summary;
                return Err(ApiError::Unavailable(format!(
                    "{e}; event [{}] and those after it were not applied, the {} before it were read and {} accepted (re-sending them all is safe: those applied count as duplicates)",
                    s.received, s.received, s.accepted
                )));
            }
        };
        metrics::event(Some(event.kind), &outcome);
        let index = self.next_index();
        self.summary
            .add(index, &event.event_id, &event.item_id, &outcome);
        Ok(outcome)
    }

    /// Counts an event that could not be read; `event_id` is empty when unknown.
    pub fn push_invalid(&mut self, event_id: &str, error: FieldError) -> EventOutcome {
        let outcome = EventOutcome::Invalid(error);
        metrics::event(None, &outcome);
        let index = self.next_index();
        self.summary.add(index, event_id, "", &outcome);
        outcome
    }

    /// Applies one event that may have failed to parse.
    pub async fn push_parsed(
        &mut self,
        event_id: &str,
        parsed: Result<Event, FieldError>,
    ) -> Result<EventOutcome, ApiError> {
        match parsed {
            Ok(event) => self.push(&event).await,
            Err(error) => Ok(self.push_invalid(event_id, error)),
        }
    }

    /// The summary so far.
    pub fn summary(&self) -> &EventsSummary {
        &self.summary
    }

    /// The final summary.
    pub fn finish(self) -> EventsSummary {
        self.summary
    }
}
