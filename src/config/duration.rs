//! Human durations in config files: "2s", "500ms", "10m", "1h30m".
//!
//! Operators write durations as strings, the way HAProxy and systemd do. A bare number is
//! rejected on purpose: "2" could mean seconds or milliseconds, and guessing wrong is worse
//! than asking.

use std::time::Duration;

/// Parses "500ms", "2s", "10m", "1h", or concatenations like "1m30s".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!("bad duration \"{text}\": expected a number with a unit (ms, s, m, h), like \"2s\" or \"500ms\"")
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Formats a duration the way the config writes it, for logs and /status.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_combinations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bare_numbers_and_unknown_units_are_rejected_with_the_text() {
        for bad in ["2", "2x", "", "s", "1.5s", "-1s", "2 s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("\"{bad}\"")), "{err}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["500ms", "2s", "10m", "1h"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
