//! Amounts typed by people, in major units (`12.34`, `100`), turned into exact minor units
//! with [`shared::money::parse_minor`] — or refused with a message that says why, before
//! anything is sent.
//!
//! - [`check_number`]: is it a decimal number at all (needs no currency).
//! - [`parse_amount`]: the minor units for a currency, refusing more decimals than it has and
//!   amounts of zero or less ([`Sign::Positive`]) or below zero ([`Sign::ZeroOrMore`]).
//! - [`check_currency`]: an ISO 4217-shaped code.

use shared::money::{AmountError, minor_digits, parse_minor};

use crate::error::CliError;

/// Which amounts are acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sign {
    /// Deposits and withdrawals: more than zero.
    Positive,
    /// Opening balances: zero is fine.
    ZeroOrMore,
}

/// Refuses text that is not a decimal number, or whose sign `sign` excludes, whatever the
/// currency (so this check needs no lookup of the account's currency).
pub fn check_number(text: &str, sign: Sign) -> Result<(), CliError> {
    if let Err(AmountError::NotANumber(_)) = parse_minor(text, 0) {
        return Err(usage(text, "is not a number (try 12.34)"));
    }
    if text.contains(['e', 'E']) {
        // `1e3` is a thousand to a parser, and a typo to a person moving money.
        return Err(usage(
            text,
            "has an exponent: write the amount in plain digits (like 1000 or 12.34)",
        ));
    }
    let trimmed = text.trim();
    let negative = trimmed.starts_with('-');
    let mantissa = trimmed
        .trim_start_matches(['+', '-'])
        .split(['e', 'E'])
        .next()
        .unwrap_or_default();
    let zero = mantissa.bytes().all(|b| b == b'0' || b == b'.');
    match sign {
        Sign::Positive if zero || negative => Err(usage(text, "must be more than zero")),
        Sign::ZeroOrMore if negative && !zero => Err(usage(text, "must not be negative")),
        _ => Ok(()),
    }
}

/// The amount `text` (major units of `currency`) in minor units.
pub fn parse_amount(text: &str, currency: &str, sign: Sign) -> Result<i64, CliError> {
    let digits = minor_digits(currency);
    let minor = parse_minor(text, digits).map_err(|e| match e {
        AmountError::NotANumber(_) => usage(text, "is not a number (try 12.34)"),
        AmountError::TooPrecise { digits: 0, .. } => usage(
            text,
            &format!("has decimals, but {currency} has no minor unit: use a whole number"),
        ),
        AmountError::TooPrecise { digits, .. } => usage(
            text,
            &format!(
                "has more than {digits} decimal place{} ({currency} amounts are counted in \
                 1/{} units)",
                if digits == 1 { "" } else { "s" },
                10u64.pow(digits)
            ),
        ),
        AmountError::Overflow(_) => usage(text, "is too large"),
    })?;
    match sign {
        Sign::Positive if minor <= 0 => Err(usage(text, "must be more than zero")),
        Sign::ZeroOrMore if minor < 0 => Err(usage(text, "must not be negative")),
        _ => Ok(minor),
    }
}

/// Refuses a currency that is not three upper-case letters (the aggregate's own rule).
pub fn check_currency(code: &str) -> Result<(), CliError> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(CliError::Usage(format!(
            "currency `{code}` is not an ISO 4217 code like USD or EUR (three upper-case letters)"
        )))
    }
}

fn usage(text: &str, why: &str) -> CliError {
    CliError::Usage(format!("amount `{text}` {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<i64, CliError>) -> String {
        let err = r.unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn converts_exactly() {
        assert_eq!(parse_amount("12.34", "USD", Sign::Positive).unwrap(), 1234);
        assert_eq!(parse_amount("100", "EUR", Sign::Positive).unwrap(), 10_000);
        assert_eq!(parse_amount("50.25", "EUR", Sign::Positive).unwrap(), 5025);
        assert_eq!(parse_amount("0.1", "USD", Sign::Positive).unwrap(), 10);
        assert_eq!(parse_amount("1.50", "USD", Sign::Positive).unwrap(), 150);
        assert_eq!(parse_amount("500", "JPY", Sign::Positive).unwrap(), 500);
        assert_eq!(parse_amount("1.234", "KWD", Sign::Positive).unwrap(), 1234);
        assert_eq!(parse_amount("0", "USD", Sign::ZeroOrMore).unwrap(), 0);
        assert_eq!(parse_amount("0.00", "USD", Sign::ZeroOrMore).unwrap(), 0);
    }

    #[test]
    fn refuses_too_many_decimals() {
        assert_eq!(
            msg(parse_amount("12.345", "EUR", Sign::Positive)),
            "amount `12.345` has more than 2 decimal places (EUR amounts are counted in 1/100 units)"
        );
        assert_eq!(
            msg(parse_amount("1.5", "JPY", Sign::Positive)),
            "amount `1.5` has decimals, but JPY has no minor unit: use a whole number"
        );
        assert!(msg(parse_amount("1.2345", "KWD", Sign::Positive)).contains("3 decimal places"));
    }

    #[test]
    fn refuses_non_numbers() {
        for text in ["", "abc", "12,50", "1.2.3", "NaN", "$5", "0x10"] {
            assert!(
                msg(parse_amount(text, "USD", Sign::Positive)).contains("is not a number"),
                "{text}"
            );
            assert!(check_number(text, Sign::ZeroOrMore).is_err(), "{text}");
        }
        assert!(
            check_number("12.345", Sign::Positive).is_ok(),
            "the currency decides precision, not this"
        );
        assert!(msg(parse_amount("1e30", "USD", Sign::Positive)).contains("too large"));
    }

    #[test]
    fn refuses_zero_and_negative_amounts() {
        assert_eq!(
            msg(parse_amount("0", "USD", Sign::Positive)),
            "amount `0` must be more than zero"
        );
        assert!(msg(parse_amount("-5", "USD", Sign::Positive)).contains("more than zero"));
        assert_eq!(
            msg(parse_amount("-0.01", "USD", Sign::ZeroOrMore)),
            "amount `-0.01` must not be negative"
        );
    }

    #[test]
    fn exponents_are_refused_whatever_the_sign() {
        for text in ["1e3", "1E3", "0e5", "-1e2", "2.5e-1"] {
            for sign in [Sign::Positive, Sign::ZeroOrMore] {
                let refused = check_number(text, sign).map_err(|e| e.to_string());
                assert!(
                    refused.as_ref().is_err_and(|e| e.contains("exponent")),
                    "{text}: {refused:?}"
                );
            }
        }
    }

    #[test]
    fn signs_are_checked_without_a_currency() {
        for zero in ["0", "0.00", "-0", "+0.0", ".0"] {
            assert!(check_number(zero, Sign::Positive).is_err(), "{zero}");
            assert!(check_number(zero, Sign::ZeroOrMore).is_ok(), "{zero}");
        }
        for negative in ["-5", "-0.01"] {
            assert!(
                check_number(negative, Sign::Positive).is_err(),
                "{negative}"
            );
            assert!(
                check_number(negative, Sign::ZeroOrMore).is_err(),
                "{negative}"
            );
        }
        for fine in ["5", "+0.01", "12.345"] {
            assert!(check_number(fine, Sign::Positive).is_ok(), "{fine}");
        }
    }

    #[test]
    fn currencies_are_iso_shaped() {
        assert!(check_currency("EUR").is_ok());
        for bad in ["eur", "EURO", "E1R", ""] {
            assert_eq!(check_currency(bad).unwrap_err().exit_code(), 2, "{bad}");
        }
    }
}
