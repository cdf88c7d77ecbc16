//! Each worker's unsent lines: one buffer per sink, handed to the sink's writer in batches.
//!
//! A line is formatted straight into the buffer. The buffer goes to the writer when it holds
//! [`FLUSH_AT`] bytes, and otherwise every [`FLUSH_EVERY`] from a small task the worker runs
//! only while it has lines to log (started by the first line, gone after a quiet second). So
//! a worker makes no syscall per line, and a worker that logs nothing runs nothing.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::Duration;

use super::sink::{Batch, Sink};

/// A buffer this full goes to the writer at once.
pub const FLUSH_AT: usize = 16 * 1024;
/// Longest a line waits in a worker's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Quiet ticks after which the flush task ends (it starts again with the next line).
const QUIET_TICKS: u32 = 20;

struct Pending {
    sink: Arc<Sink>,
    bytes: Vec<u8>,
    lines: u64,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    static FLUSHING: Cell<bool> = const { Cell::new(false) };
}

/// Appends one line for `sink`, written by `format` into the worker's buffer.
pub fn push(sink: &Arc<Sink>, format: impl FnOnce(&mut Vec<u8>)) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let i = match p.iter().position(|e| Arc::ptr_eq(&e.sink, sink)) {
            Some(i) => i,
            None => {
                p.push(Pending {
                    sink: sink.clone(),
                    bytes: Vec::new(),
                    lines: 0,
                });
                p.len() - 1
            }
        };
        let e = &mut p[i];
        if e.bytes.capacity() == 0 {
            e.bytes.reserve(FLUSH_AT + 512);
        }
        format(&mut e.bytes);
        e.lines += 1;
        if e.bytes.len() >= FLUSH_AT {
            send(e);
        }
    });
    if !FLUSHING.replace(true) {
        crate::worker::exec::spawn(flusher());
    }
}

fn send(e: &mut Pending) {
    if e.lines == 0 {
        return;
    }
    let bytes = std::mem::take(&mut e.bytes);
    e.sink.offer(Batch {
        bytes,
        lines: std::mem::take(&mut e.lines),
    });
}

/// Sends every buffer with lines in it, and forgets the sinks that had none since the last
/// flush (so a sink a reload removed is not kept alive here). Returns whether anything was
/// sent.
fn flush_all() -> bool {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        p.retain_mut(|e| {
            let busy = e.lines > 0;
            send(e);
            busy
        });
        // Entries are kept only if they had lines, so any kept means something was sent.
        !p.is_empty()
    })
}

async fn flusher() {
    let mut quiet = 0;
    while quiet < QUIET_TICKS {
        crate::worker::deadline::sleep(FLUSH_EVERY).await;
        if flush_all() {
            quiet = 0;
        } else {
            quiet += 1;
        }
    }
    FLUSHING.set(false);
}
