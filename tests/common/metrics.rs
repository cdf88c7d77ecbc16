//! Reading samples from ringlb's /metrics: one scrape parsed once into (name, labels, value).
//!
//! `metrics(admin)` scrapes; `Metrics::get(name, labels)` finds the first sample of `name`
//! whose labels include every given `(key, value)` pair (any order, exact values). A missing
//! series is `None`: the call site says what that means (`.expect(..)`, `.unwrap_or(0.0)`).

use std::net::SocketAddr;

use super::{get, Ringlb};

/// One sample line: `name{labels} value`, label values unescaped, in source order.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `want` is one of this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Parses one sample line of the Prometheus text format (not a `#` or blank line): name,
/// optional `{k="v",...}` with `\\`, `\"` and `\n` escapes, value (`+Inf`, `-Inf`, `NaN`
/// too), optional timestamp. Errors say what is wrong with the line.
pub fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                r = after;
                break;
            }
            let eq = r.find('=').ok_or("label without '='")?;
            let key = &r[..eq];
            let quoted = r[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("label {key}: value not quoted"))?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("label {key}: bad escape {other:?}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {key}: unterminated value")),
                }
            };
            labels.push((key.to_string(), value));
            r = &quoted[end + 1..];
            if let Some(after) = r.strip_prefix(',') {
                r = after;
            }
        }
        rest = r;
    }
    let mut fields = rest.split(' ').filter(|f| !f.is_empty());
    let value = match fields.next().ok_or("no value")? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// One parsed scrape of /metrics.
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// The scraped text, for failure messages.
    pub text: String,
}

impl Metrics {
    /// Parses Prometheus text; panics on a malformed sample line (ringlb never writes one).
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|(n, l)| {
                parse_sample(l).unwrap_or_else(|e| panic!("/metrics line {}: {e}: {l:?}", n + 1))
            })
            .collect();
        Metrics {
            samples,
            text: text.to_string(),
        }
    }

    /// The value of the first sample of `name` whose labels include every one of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// Like `get`, but a missing series fails the test, naming it and showing the scrape.
    pub fn expect(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in /metrics:\n{}", self.text))
    }

    /// The value of the sample of `name` whose labels are exactly `labels` (any order).
    pub fn exact(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    /// The sum of every sample of `name` whose labels include `labels`; 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(labels))
    }
}

/// Scrapes the admin listener's /metrics once.
pub fn metrics(admin: SocketAddr) -> Metrics {
    Metrics::parse(&get(admin, "/metrics"))
}

/// One scrape, one sample: `metrics(admin).get(name, labels)`.
pub fn sample(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics(admin).get(name, labels)
}

impl Ringlb {
    /// Scrapes this ringlb's /metrics (it must have an admin listener).
    pub fn metrics(&self) -> Metrics {
        metrics(self.admin.expect("ringlb has no admin listener"))
    }

    /// One scrape, one sample: `self.metrics().get(name, labels)`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.metrics().get(name, labels)
    }
}
