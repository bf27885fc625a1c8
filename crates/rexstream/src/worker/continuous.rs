//! The detector worker's continuous-batching loop (`[model] continuous_batching`): frames join the decode batch
//! between steps instead of waiting for the whole batch.
//!
//! In: [`Batch`]es from the scheduler, asked for with a credit that says how many frames fit now (free decode
//! slots not promised to waiting frames). Out: one document per frame through [`Worker::publish`], as soon as
//! its row finishes. Runs on the detector thread; owns a [`ContinuousSession`] of `max_batch` slots.
//!
//! Per loop: ask for frames when there is room (one credit outstanding at most); take a batch without waiting
//! while rows are decoding (blocking only when idle); admit its frames (vision + prefill, same-size frames in
//! one call; each with its stream's previous answer as a draft where `[model] drafts` is on); run one decode
//! pass (a step, or a draft verification block); publish the rows that finished. A stream has at most one
//! row decoding, so its documents stay in frame order: a frame whose stream is still decoding waits (in
//! arrival order) for that row to finish. When the scheduler hangs up, the rows and waiting frames are
//! finished first, so no frame that reached the worker is lost. A model error drops the frames it touched
//! (`detector_error`) and the loop goes on.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};

use rexomni::engine::{GenerateRequest, Ticket};
use tracing::error;

use rexstream::scheduler::Batch;

use super::{Pending, Worker};

pub(super) fn run(w: &mut Worker, credits: &SyncSender<usize>, batches: &Receiver<Batch>) {
    let mut session = match w.engine.continuous(
        w.ctx.max_batch,
        w.ctx.params.clone(),
        w.ctx.max_objects,
    ) {
        Ok(s) => s,
        Err(e) => {
            error!(message = "Cannot start the continuous batch; the detector stops.", error = %e);
            return;
        }
    };
    let mut in_flight: HashMap<Ticket, Pending> = HashMap::new();
    // Streams with a row decoding, and frames waiting for their stream's row to finish.
    let mut busy: HashSet<usize> = HashSet::new();
    let mut waiting: Vec<(GenerateRequest, Pending)> = Vec::new();
    let (mut credit_out, mut hung_up) = (false, false);
    loop {
        let room = session.free_slots().saturating_sub(waiting.len());
        if !credit_out && !hung_up && room > 0 {
            if credits.send(room).is_ok() {
                credit_out = true;
            } else {
                hung_up = true;
            }
        }
        if credit_out {
            let idle = session.is_idle() && waiting.is_empty();
            let batch = if idle {
                batches.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                batches.try_recv()
            };
            match batch {
                Ok(batch) => {
                    credit_out = false;
                    w.ctx.metrics.queue_depth.dec();
                    let (requests, pending) = w.prepare(batch.frames);
                    waiting.extend(requests.into_iter().zip(pending));
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    credit_out = false;
                    hung_up = true;
                }
            }
        }

        // Admit waiting frames whose stream is free, in arrival order, while slots last.
        let mut admit: Vec<(GenerateRequest, Pending)> = Vec::new();
        let mut rest = Vec::new();
        for (req, p) in waiting.drain(..) {
            let s = p.frame.stream_index;
            if admit.len() < session.free_slots()
                && !busy.contains(&s)
                && !admit.iter().any(|(_, q)| q.frame.stream_index == s)
            {
                admit.push((req, p));
            } else {
                rest.push((req, p));
            }
        }
        waiting = rest;
        if !admit.is_empty() {
            let (requests, pending): (Vec<_>, Vec<_>) = admit.into_iter().unzip();
            // Drafts are taken now: a stream's previous answer was published before its next frame is admitted.
            let drafts: Vec<Option<Vec<u32>>> = pending.iter().map(|p| w.draft_for(p)).collect();
            match session.admit_with_drafts(w.engine.model(), &requests, &[], &drafts) {
                Ok(tickets) => {
                    for (t, p) in tickets.into_iter().zip(pending) {
                        busy.insert(p.frame.stream_index);
                        in_flight.insert(t, p);
                    }
                }
                Err(e) => w.failed(&pending, e.to_string()),
            }
        }

        if !session.is_idle() {
            match session.step(w.engine.model()) {
                Ok(finished) => {
                    for f in finished {
                        if let Some(p) = in_flight.remove(&f.ticket) {
                            busy.remove(&p.frame.stream_index);
                            w.observe_model_stages(&f.output);
                            w.publish(p, f.output);
                        }
                    }
                }
                Err(e) => {
                    let lost: Vec<Pending> = session
                        .abort()
                        .into_iter()
                        .filter_map(|t| in_flight.remove(&t))
                        .collect();
                    busy.clear();
                    w.failed(&lost, e.to_string());
                }
            }
        }
        if hung_up && session.is_idle() && waiting.is_empty() {
            break;
        }
    }
}
