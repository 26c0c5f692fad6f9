//! Durations as users write them: `500ms`, `10s`, `2m`, `1h`.

use core::time::Duration;

/// Why a duration literal was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Nothing before the unit, or not a whole number.
    #[error(
        "`{0}` is not a duration: expected a whole number followed by ms, s, m or h (e.g. `10s`)"
    )]
    Malformed(String),
    /// The unit is not one of the four accepted.
    #[error("`{input}` has unknown unit `{unit}`: expected ms, s, m or h")]
    UnknownUnit { input: String, unit: String },
    /// The number does not fit.
    #[error("`{0}` is too long a duration")]
    Overflow(String),
}

/// Parses `500ms`, `10s`, `2m` or `1h` (surrounding whitespace is not allowed).
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let digits = input.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = input.split_at(digits);
    if number.is_empty() || unit.starts_with('.') {
        return Err(DurationError::Malformed(input.to_owned()));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(DurationError::Malformed(input.to_owned())),
        other => {
            return Err(DurationError::UnknownUnit {
                input: input.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::Overflow(input.to_owned()))
}

/// Formats a duration in the largest unit that represents it exactly (`90s`, `2m`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    for (unit, per) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(per) {
            return format!("{}{unit}", ms / per);
        }
    }
    format!("{ms}ms")
}

/// Serde support: durations travel as the same strings users write.
pub mod serde_str {
    use core::time::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<u64, &str>) {
        let got = parse_duration(input)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| e.to_string());
        match expected {
            Ok(ms) => assert_eq!(got, Ok(ms), "{input}"),
            Err(fragment) => {
                let err = got.expect_err(input);
                assert!(err.contains(fragment), "{input}: {err}");
            }
        }
    }

    #[test]
    fn parses_the_four_units_and_rejects_the_rest() {
        check("500ms", Ok(500));
        check("10s", Ok(10_000));
        check("2m", Ok(120_000));
        check("1h", Ok(3_600_000));
        check("0s", Ok(0));
        check("10", Err("not a duration"));
        check("s", Err("not a duration"));
        check("", Err("not a duration"));
        check(
            "1.5s",
            Err("`1.5s` is not a duration: expected a whole number"),
        );
        check("10sec", Err("unknown unit `sec`"));
        check(" 10s", Err("not a duration"));
        check("99999999999999999999h", Err("too long"));
        check("9999999999999999h", Err("too long"));
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        for (ms, text) in [
            (0, "0s"),
            (250, "250ms"),
            (10_000, "10s"),
            (90_000, "90s"),
            (120_000, "2m"),
            (7_200_000, "2h"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d));
        }
    }
}
