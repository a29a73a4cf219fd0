//! Exact money arithmetic on decimal text: parsing major-unit amounts ("12.34", "1e2") into
//! integer minor units and formatting minor units back. Never goes through floating point.

use thiserror::Error;

/// Why a decimal amount could not be converted to minor units.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AmountError {
    /// The text is not a decimal number (`12`, `12.5`, `-3`, `1e2`, `2.5E-1`).
    #[error("`{0}` is not a decimal number")]
    NotANumber(String),
    /// The amount has more decimals than the currency's minor unit allows; it is refused rather
    /// than rounded.
    #[error("`{text}` has more than {digits} decimal places")]
    TooPrecise {
        /// The amount as given.
        text: String,
        /// How many decimal places the currency allows.
        digits: u32,
    },
    /// The amount does not fit in a signed 64-bit number of minor units.
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Number of decimal places of a currency's minor unit (ISO 4217), 2 for codes not listed.
pub fn minor_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// Parses decimal text in major units into minor units with `digits` decimal places, exactly.
///
/// Accepts the JSON number grammar plus a leading `+`: an optional sign, digits, an optional
/// fraction and an optional exponent. Trailing zeros beyond `digits` are fine (`1.500` with two
/// digits is 150); any non-zero digit beyond them is [`AmountError::TooPrecise`].
pub fn parse_minor(text: &str, digits: u32) -> Result<i64, AmountError> {
    let bad = || AmountError::NotANumber(text.to_owned());
    let s = text.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => {
            let exp: i64 = s[i + 1..].parse().map_err(|_| bad())?;
            (&s[..i], exp)
        }
        None => (s, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() && frac_part.is_empty()
        || !all_digits(int_part)
        || !all_digits(frac_part)
    {
        return Err(bad());
    }
    // value = 0.<digits of int_part frac_part> shifted: integer digits string with the decimal
    // point after `point` digits.
    let all: String = format!("{int_part}{frac_part}");
    let point = int_part.len() as i64 + exponent + i64::from(digits);
    // Minor units = the digits before position `point`; everything after must be zero.
    if point < 0 {
        return if all.bytes().all(|b| b == b'0') {
            Ok(0)
        } else {
            too_precise(text, digits)
        };
    }
    let point = usize::try_from(point).map_err(|_| AmountError::Overflow(text.to_owned()))?;
    let (whole, rest) = if point >= all.len() {
        (all.clone() + &"0".repeat(point - all.len()), "")
    } else {
        (all[..point].to_owned(), &all[point..])
    };
    if rest.bytes().any(|b| b != b'0') {
        return too_precise(text, digits);
    }
    let whole = whole.trim_start_matches('0');
    let magnitude: i64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| AmountError::Overflow(text.to_owned()))?
    };
    Ok(if negative { -magnitude } else { magnitude })
}

fn too_precise(text: &str, digits: u32) -> Result<i64, AmountError> {
    Err(AmountError::TooPrecise {
        text: text.to_owned(),
        digits,
    })
}

/// Formats minor units as a decimal string with exactly `digits` decimal places ("150.00").
pub fn format_minor(minor: i64, digits: u32) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let magnitude = minor.unsigned_abs();
    if digits == 0 {
        return format!("{sign}{magnitude}");
    }
    let scale = 10u64.pow(digits);
    format!(
        "{sign}{}.{:0width$}",
        magnitude / scale,
        magnitude % scale,
        width = digits as usize
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_fractional_amounts() {
        assert_eq!(parse_minor("12.34", 2), Ok(1234));
        assert_eq!(parse_minor("100", 2), Ok(10000));
        assert_eq!(parse_minor("0.1", 2), Ok(10));
        assert_eq!(parse_minor("0.01", 2), Ok(1));
        assert_eq!(parse_minor("-3.5", 2), Ok(-350));
        assert_eq!(parse_minor("1.500", 2), Ok(150));
        assert_eq!(parse_minor(".5", 2), Ok(50));
        assert_eq!(parse_minor("7", 0), Ok(7));
    }

    #[test]
    fn parses_exponents_exactly() {
        assert_eq!(parse_minor("1e2", 2), Ok(10000));
        assert_eq!(parse_minor("2.5E-1", 2), Ok(25));
        assert_eq!(parse_minor("1E-2", 2), Ok(1));
        assert_eq!(parse_minor("0.0e5", 2), Ok(0));
        assert_eq!(parse_minor("1e-3", 2), too_precise("1e-3", 2));
    }

    #[test]
    fn point_one_plus_point_two_is_thirty_cents() {
        let sum = parse_minor("0.1", 2).unwrap() + parse_minor("0.2", 2).unwrap();
        assert_eq!(sum, 30);
    }

    #[test]
    fn refuses_extra_precision_instead_of_rounding() {
        assert!(matches!(
            parse_minor("1.005", 2),
            Err(AmountError::TooPrecise { .. })
        ));
        assert!(matches!(
            parse_minor("1.5", 0),
            Err(AmountError::TooPrecise { .. })
        ));
    }

    #[test]
    fn refuses_garbage_and_overflow() {
        for text in [
            "", "abc", "1.2.3", "1e", "e5", "--1", "1,5", "0x10", ".", "NaN",
        ] {
            assert!(
                matches!(parse_minor(text, 2), Err(AmountError::NotANumber(_))),
                "{text}"
            );
        }
        assert!(matches!(
            parse_minor("1e30", 2),
            Err(AmountError::Overflow(_))
        ));
    }

    #[test]
    fn formats_with_fixed_decimals() {
        assert_eq!(format_minor(15000, 2), "150.00");
        assert_eq!(format_minor(5, 2), "0.05");
        assert_eq!(format_minor(-1234, 2), "-12.34");
        assert_eq!(format_minor(12, 0), "12");
        assert_eq!(format_minor(1, 3), "0.001");
    }
}
