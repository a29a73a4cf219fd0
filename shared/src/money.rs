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

/// Exponents beyond this size decide nothing more: any non-zero amount with one is out of
/// range (or too precise), so larger ones are clamped to it before any arithmetic.
const EXPONENT_CLAMP: i128 = 1 << 40;

/// Parses decimal text in major units into minor units with `digits` decimal places, exactly.
///
/// Accepts the JSON number grammar plus a leading `+`: an optional sign, digits, an optional
/// fraction and an optional exponent. Trailing zeros beyond `digits` are fine (`1.500` with two
/// digits is 150); any non-zero digit beyond them is [`AmountError::TooPrecise`], and anything
/// that does not fit in an `i64` of minor units is [`AmountError::Overflow`]. Time is linear in
/// the length of the text and nothing is allocated for the digits, whatever the exponent
/// (`1e999999999999` is an overflow, `1e-999999999999` too precise, both at once).
pub fn parse_minor(text: &str, digits: u32) -> Result<i64, AmountError> {
    let decimal = Decimal::parse(text).ok_or_else(|| AmountError::NotANumber(text.to_owned()))?;
    match decimal.to_minor(digits) {
        Ok(minor) => Ok(minor),
        Err(Inexact::TooPrecise) => too_precise(text, digits),
        Err(Inexact::Overflow) => Err(AmountError::Overflow(text.to_owned())),
    }
}

/// Decimal text split into its parts, borrowed from the text: `±int.frac × 10^exponent`.
struct Decimal<'a> {
    negative: bool,
    int: &'a [u8],
    frac: &'a [u8],
    /// Clamped to ±[`EXPONENT_CLAMP`].
    exponent: i128,
}

/// Why a well-formed decimal is not a whole number of minor units.
enum Inexact {
    TooPrecise,
    Overflow,
}

impl<'a> Decimal<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let s = text.trim();
        let (negative, s) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (mantissa, exponent) = match s.find(['e', 'E']) {
            Some(i) => (&s[..i], parse_exponent(&s[i + 1..])?),
            None => (s, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() && frac.is_empty() || !all_digits(int) || !all_digits(frac) {
            return None;
        }
        Some(Decimal {
            negative,
            int: int.as_bytes(),
            frac: frac.as_bytes(),
            exponent,
        })
    }

    /// The `i`-th digit of `int` followed by `frac`, zero beyond them.
    fn digit(&self, i: usize) -> u8 {
        let d = match i.checked_sub(self.int.len()) {
            None => self.int[i],
            Some(j) => self.frac.get(j).copied().unwrap_or(b'0'),
        };
        d - b'0'
    }

    fn to_minor(&self, digits: u32) -> Result<i64, Inexact> {
        let len = self.int.len() + self.frac.len();
        let Some(first) = (0..len).find(|&i| self.digit(i) != 0) else {
            return Ok(0);
        };
        let last = (0..len)
            .rev()
            .find(|&i| self.digit(i) != 0)
            .unwrap_or(first);
        // The minor units are the digits before position `point`; every digit from `point` on
        // must be zero.
        let point = self.int.len() as i128 + self.exponent + i128::from(digits);
        if (last as i128) >= point {
            return Err(Inexact::TooPrecise);
        }
        // u64 holds any 19 digits; more cannot fit an i64.
        if point - first as i128 > 19 {
            return Err(Inexact::Overflow);
        }
        let point = point as usize; // first < point <= first + 19
        let magnitude = (first..point).fold(0u64, |m, i| m * 10 + u64::from(self.digit(i)));
        let signed = if self.negative {
            -i128::from(magnitude)
        } else {
            i128::from(magnitude)
        };
        i64::try_from(signed).map_err(|_| Inexact::Overflow)
    }
}

/// An exponent: an optional sign and at least one digit, clamped to ±[`EXPONENT_CLAMP`].
fn parse_exponent(s: &str) -> Option<i128> {
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let magnitude = digits.bytes().fold(0i128, |m, b| {
        (m * 10 + i128::from(b - b'0')).min(EXPONENT_CLAMP)
    });
    Some(if negative { -magnitude } else { magnitude })
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

    // Regression (issue 9, defect 5): `1e999999999999` made the parser build a string of a
    // trillion zeros and abort the process; a huge negative exponent did the same arithmetic.
    #[test]
    fn huge_exponents_are_errors_without_allocating() {
        for text in [
            "1e999999999999",
            "1E+999999999999",
            "-7e99999999999999999999999",
        ] {
            assert_eq!(
                parse_minor(text, 2),
                Err(AmountError::Overflow(text.into()))
            );
        }
        for text in ["1e-999999999999", "5e-99999999999999999999999"] {
            assert_eq!(parse_minor(text, 2), too_precise(text, 2));
        }
        assert_eq!(parse_minor("0e999999999999", 2), Ok(0));
        assert_eq!(parse_minor("0e-999999999999", 2), Ok(0));
    }

    #[test]
    fn ten_thousand_digit_mantissas_are_decided_exactly() {
        let ones = "1".repeat(10_000);
        assert!(matches!(
            parse_minor(&ones, 2),
            Err(AmountError::Overflow(_))
        ));
        let tiny = format!("0.{}1", "0".repeat(10_000));
        assert!(matches!(
            parse_minor(&tiny, 2),
            Err(AmountError::TooPrecise { .. })
        ));
        let padded = format!("{}12.50{}", "0".repeat(10_000), "0".repeat(10_000));
        assert_eq!(parse_minor(&padded, 2), Ok(1250));
        let shifted = format!("1{}e-10000", "0".repeat(10_000));
        assert_eq!(parse_minor(&shifted, 2), Ok(100));
    }

    #[test]
    fn the_edges_of_i64_minor_units() {
        assert_eq!(parse_minor("92233720368547758.07", 2), Ok(i64::MAX));
        assert_eq!(parse_minor("-92233720368547758.08", 2), Ok(i64::MIN));
        assert_eq!(parse_minor("9223372036854775807", 0), Ok(i64::MAX));
        for text in [
            "92233720368547758.08",
            "-92233720368547758.09",
            "99999999999999999.99",
        ] {
            assert_eq!(
                parse_minor(text, 2),
                Err(AmountError::Overflow(text.into()))
            );
        }
        assert_eq!(
            parse_minor("9223372036854775808", 0),
            Err(AmountError::Overflow("9223372036854775808".into()))
        );
        assert_eq!(parse_minor("92233720368547758.06", 2), Ok(i64::MAX - 1));
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
