//! The thread the health checks run on: a current-thread tokio runtime of its own.
//!
//! The control loop also reloads (reading the file, validating, binding), answers the admin
//! listener and applies health events; none of that may delay a probe, or a healthy backend
//! whose check times out behind it looks dead. So the checkers ([`super::checker`]) run here
//! and talk to the control loop only through channels (their `HealthEvent`s, the settings
//! `watch`, the forced-down `Notify`), which work across runtimes.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Runs futures on the `ringlb-health` thread; stops it (and drops what still runs there)
/// when dropped.
pub struct ProbeRuntime {
    handle: Handle,
    /// Dropping it ends the thread's `block_on`.
    _stop: Option<oneshot::Sender<()>>,
}

impl ProbeRuntime {
    /// Starts the thread; if it cannot be started, the checks run on the caller's runtime
    /// (the control thread's), as they did before, and that is logged.
    pub fn start() -> ProbeRuntime {
        match Self::spawn_thread() {
            Ok(me) => me,
            Err(e) => {
                crate::error!(
                    "cannot start the health-check thread ({e}): checks run on the control thread"
                );
                ProbeRuntime {
                    handle: Handle::current(),
                    _stop: None,
                }
            }
        }
    }

    fn spawn_thread() -> std::io::Result<ProbeRuntime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ringlb-health".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping `rt` here cancels every checker still on it.
            })?;
        Ok(ProbeRuntime {
            handle,
            _stop: Some(stop),
        })
    }

    pub fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}
