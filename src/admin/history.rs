//! The last few minutes of every frontend's and backend's counters, sampled on the control
//! thread, for the rates and charts of the status page and `/status`.
//!
//! Every [`SAMPLE_EVERY`] the sampler reads the live atomics (as the metrics exporter does)
//! and appends one point per series; [`KEEP`] points are kept (five minutes). Rates are
//! differences between points, so a counter is never touched on the data path for this.
//! A series whose frontend or backend left the config is forgotten at the next sample.
//! Memory: 40 bytes per point, so 6 KiB per backend.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::backend::{BackendState, Snapshot};

pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Points kept per series: five minutes at one every two seconds.
pub const KEEP: usize = 150;

#[derive(Debug, Clone, Copy, Default)]
struct Point {
    active: u64,
    sessions: u64,
    bytes_in: u64,
    bytes_out: u64,
    errors: u64,
}

#[derive(Default)]
struct Inner {
    times: VecDeque<Instant>,
    series: HashMap<String, VecDeque<Point>>,
}

#[derive(Default)]
pub struct History {
    inner: Mutex<Inner>,
}

/// One series as the page and `/status` show it: the latest rates and, oldest first, the
/// values behind the charts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Rates {
    pub sessions_per_second: f64,
    pub bytes_in_per_second: f64,
    pub bytes_out_per_second: f64,
    pub errors_per_second: f64,
    /// Sessions per second over the last minutes, one value per sample interval.
    #[serde(skip)]
    pub sessions_chart: Vec<f64>,
    /// Bytes per second (both directions) over the last minutes.
    #[serde(skip)]
    pub bytes_chart: Vec<f64>,
    /// Open sessions at each sample.
    #[serde(skip)]
    pub active_chart: Vec<f64>,
}

pub fn frontend_key(name: &str) -> String {
    format!("f\0{name}")
}

pub fn backend_key(frontend: &str, backend: &str) -> String {
    format!("b\0{frontend}\0{backend}")
}

fn backend_point(s: &BackendState) -> Point {
    Point {
        active: s.active.load(Ordering::Relaxed),
        sessions: s.connections_total(),
        bytes_in: s.bytes_in_total(),
        bytes_out: s.bytes_out_total(),
        errors: s.connect_failures_total.load(Ordering::Relaxed),
    }
}

impl History {
    /// Appends one point per frontend and backend of `snap`.
    pub fn sample(&self, snap: &Snapshot) {
        let mut points: Vec<(String, Point)> = Vec::new();
        for fe in snap.frontends.values() {
            let st = &fe.state;
            let mut total = Point {
                active: st.active(),
                sessions: st.accepted_total(),
                errors: st.rejected_no_backend_total.load(Ordering::Relaxed)
                    + st.rejected_local_total.load(Ordering::Relaxed)
                    + st.rejected_limit_total.load(Ordering::Relaxed),
                ..Point::default()
            };
            for b in &fe.backends {
                let p = backend_point(&b.state);
                total.bytes_in += p.bytes_in;
                total.bytes_out += p.bytes_out;
                points.push((backend_key(&fe.config.name, &b.config.name), p));
            }
            points.push((frontend_key(&fe.config.name), total));
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.times.push_back(Instant::now());
        if inner.times.len() > KEEP {
            inner.times.pop_front();
        }
        let mut seen = std::collections::HashSet::new();
        for (key, p) in points {
            let ring = inner.series.entry(key.clone()).or_default();
            ring.push_back(p);
            if ring.len() > KEEP {
                ring.pop_front();
            }
            seen.insert(key);
        }
        inner.series.retain(|k, _| seen.contains(k));
    }

    /// The rates and charts of one series (all zero before two samples exist).
    pub fn rates(&self, key: &str) -> Rates {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = inner.series.get(key) else {
            return Rates::default();
        };
        // A series may be younger than the clock ring: align both on their newest ends.
        let times: Vec<Instant> = inner
            .times
            .iter()
            .skip(inner.times.len().saturating_sub(ring.len()))
            .copied()
            .collect();
        let points: Vec<Point> = ring.iter().copied().collect();
        let mut r = Rates {
            active_chart: points.iter().map(|p| p.active as f64).collect(),
            ..Rates::default()
        };
        for i in 1..points.len().min(times.len()) {
            let dt = times[i]
                .duration_since(times[i - 1])
                .as_secs_f64()
                .max(0.001);
            let (a, b) = (points[i - 1], points[i]);
            let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
            r.sessions_chart.push(per(a.sessions, b.sessions));
            r.bytes_chart
                .push(per(a.bytes_in, b.bytes_in) + per(a.bytes_out, b.bytes_out));
            r.sessions_per_second = per(a.sessions, b.sessions);
            r.bytes_in_per_second = per(a.bytes_in, b.bytes_in);
            r.bytes_out_per_second = per(a.bytes_out, b.bytes_out);
            r.errors_per_second = per(a.errors, b.errors);
        }
        r
    }
}

/// Samples for the life of the process.
pub async fn run(history: std::sync::Arc<History>, published: crate::backend::Published) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        history.sample(&published.load());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Registry;
    use crate::config::Config;
    use std::sync::Arc;

    #[test]
    fn rates_are_differences_between_samples_and_series_of_removed_backends_go() {
        let toml = "[[frontend]]\nname = \"f\"\nlisten = [\"127.0.0.1:1\"]\n\
                    [[frontend.backend]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n";
        let config = Arc::new(Config::parse(toml, "t").unwrap());
        let mut registry = Registry::default();
        let snap = Snapshot::build(config, &mut registry, 1);
        let h = History::default();
        h.sample(&snap);
        let state = &snap.frontends["f"].backends[0].state;
        crate::backend::per_worker::add(&state.counts.local().connections, 10);
        crate::backend::per_worker::add(&state.counts.local().bytes_in, 1000);
        std::thread::sleep(Duration::from_millis(20));
        h.sample(&snap);
        let r = h.rates(&backend_key("f", "a"));
        assert_eq!(r.sessions_chart.len(), 1);
        assert!(r.sessions_per_second > 0.0);
        assert!(r.bytes_in_per_second > r.sessions_per_second);
        assert_eq!(r.errors_per_second, 0.0);
        assert!(h.rates(&frontend_key("f")).bytes_in_per_second > 0.0);
        let empty = Snapshot::build(
            Arc::new(Config::parse("", "t").unwrap_or_else(|_| {
                Config::parse(
                    "[[frontend]]\nname = \"g\"\nlisten = [\"127.0.0.1:1\"]\n\
                     [[frontend.backend]]\nname = \"b\"\naddress = \"127.0.0.1:3\"\n",
                    "t",
                )
                .unwrap()
            })),
            &mut registry,
            2,
        );
        h.sample(&empty);
        assert!(h.rates(&backend_key("f", "a")).sessions_chart.is_empty());
    }
}
