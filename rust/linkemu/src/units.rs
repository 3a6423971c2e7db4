//! Parsing of the human-readable values in a profile spec (`1mbit`, `32KiB`, `1%`, `30ms`).
//!
//! Rates use `tc`'s spelling (`kbit`, `mbit`, `gbit`, decimal multiples of bits per second) so a
//! value reads the same here as in a `tc tbf` command; `kbps` is refused because `tc` reads it as
//! kilobytes per second and people read it as kilobits.

use std::time::Duration;

/// Why a value in a profile spec could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("empty value")]
    Empty,
    #[error("`{0}` is not a number")]
    NotANumber(String),
    #[error("unknown unit `{unit}` (expected one of {expected})")]
    UnknownUnit {
        unit: String,
        expected: &'static str,
    },
    #[error("`{0}` is out of range")]
    OutOfRange(String),
    #[error("bad duration: {0}")]
    Duration(String),
}

/// Splits `"12.5mbit"` into `(12.5, "mbit")`.
fn split_number(value: &str) -> Result<(f64, String), UnitError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(UnitError::Empty);
    }
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '-'))
        .unwrap_or(value.len());
    // `e` may be an exponent (`1e6`); no accepted unit starts with it.
    let (number, unit) = value.split_at(end);
    let number: f64 = number
        .parse()
        .map_err(|_| UnitError::NotANumber(value.to_owned()))?;
    if !number.is_finite() || number < 0.0 {
        return Err(UnitError::OutOfRange(value.to_owned()));
    }
    Ok((number, unit.trim().to_ascii_lowercase()))
}

/// A rate in bit/s; `unlimited` (or `none`, `off`) means no rate limit.
pub fn parse_rate(value: &str) -> Result<Option<u64>, UnitError> {
    if matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "unlimited" | "none" | "off"
    ) {
        return Ok(None);
    }
    let (number, unit) = split_number(value)?;
    let scale = match unit.as_str() {
        "" | "bit" | "bps" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => {
            return Err(UnitError::UnknownUnit {
                unit,
                expected: "bit, kbit, mbit, gbit, unlimited",
            });
        }
    };
    let bits = (number * scale).round();
    if bits < 1.0 || bits > u64::MAX as f64 {
        return Err(UnitError::OutOfRange(value.to_owned()));
    }
    Ok(Some(bits as u64))
}

/// A size in bytes: plain bytes, `kb`/`mb` (decimal) or `kib`/`mib` (binary).
pub fn parse_bytes(value: &str) -> Result<u64, UnitError> {
    let (number, unit) = split_number(value)?;
    let scale = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        _ => {
            return Err(UnitError::UnknownUnit {
                unit,
                expected: "b, kb, mb, kib, mib",
            });
        }
    };
    let bytes = (number * scale).round();
    if bytes > u64::MAX as f64 {
        return Err(UnitError::OutOfRange(value.to_owned()));
    }
    Ok(bytes as u64)
}

/// A probability, as a fraction (`0.01`) or a percentage (`1%`).
pub fn parse_probability(value: &str) -> Result<f64, UnitError> {
    let trimmed = value.trim();
    let (number, unit) = split_number(trimmed.trim_end_matches('%'))?;
    if !unit.is_empty() {
        return Err(UnitError::UnknownUnit {
            unit,
            expected: "a fraction or a percentage",
        });
    }
    let p = if trimmed.ends_with('%') {
        number / 100.0
    } else {
        number
    };
    if !(0.0..=1.0).contains(&p) {
        return Err(UnitError::OutOfRange(value.to_owned()));
    }
    Ok(p)
}

/// A duration in humantime syntax: `30ms`, `1s 500ms`.
pub fn parse_duration(value: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(value.trim()).map_err(|e| UnitError::Duration(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_use_tc_units() {
        assert_eq!(parse_rate("1mbit"), Ok(Some(1_000_000)));
        assert_eq!(parse_rate("256kbit"), Ok(Some(256_000)));
        assert_eq!(parse_rate("2.5Mbit"), Ok(Some(2_500_000)));
        assert_eq!(parse_rate("9600"), Ok(Some(9600)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert!(matches!(
            parse_rate("1kbps"),
            Err(UnitError::UnknownUnit { .. })
        ));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-1mbit").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn sizes_distinguish_decimal_and_binary() {
        assert_eq!(parse_bytes("1500"), Ok(1500));
        assert_eq!(parse_bytes("32KiB"), Ok(32 * 1024));
        assert_eq!(parse_bytes("32kb"), Ok(32_000));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert!(parse_bytes("1 parsec").is_err());
    }

    #[test]
    fn probabilities_accept_percent_and_fraction() {
        assert_eq!(parse_probability("1%"), Ok(0.01));
        assert_eq!(parse_probability("0.03"), Ok(0.03));
        assert!(parse_probability("150%").is_err());
        assert!(parse_probability("1.5").is_err());
        assert!(parse_probability("NaN").is_err());
    }

    #[test]
    fn durations_use_humantime() {
        assert_eq!(parse_duration("30ms"), Ok(Duration::from_millis(30)));
        assert_eq!(parse_duration("1s 500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
    }
}
