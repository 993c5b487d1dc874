//! Durations in config files: `<non-negative integer><unit>` with the unit
//! one of `ms`, `s`, `m`, `h` (`"0s"`, `"500ms"`, `"60s"`, `"2m"`, `"1h"`).

use std::time::Duration;

/// Parse `<non-negative integer><ms|s|m|h>`. No sign, no spaces, no
/// fractions; the number must fit the unit without overflowing.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const FORMAT: &str = "expected a whole number followed by ms, s, m or h, such as \"60s\"";
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    if number.is_empty() {
        return Err(FORMAT.to_string());
    }
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("missing unit; {FORMAT}")),
        _ => return Err(format!("unknown unit {unit:?}; {FORMAT}")),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("number {number:?} is too large"))?;
    let millis = value
        .checked_mul(millis_per_unit)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(Duration::from_millis(millis))
}

/// The canonical text of a duration: whole seconds as `"<n>s"`, anything
/// else as `"<n>ms"`. Always parses back to the same value (sub-millisecond
/// parts cannot come from [`parse_duration`]).
pub(crate) fn format_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_unit() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "s",
            "60",
            "-1s",
            "+1s",
            "1.5s",
            " 1s",
            "1s ",
            "1 s",
            "1d",
            "1S",
            "1sec",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(60),
            Duration::from_secs(7200),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(60)), "60s");
    }
}
