//! One grammar for the sizes users and bundles give (`vmrun run -m`,
//! `vmrun boot --disk ...,bw=`, the OCI memory annotation): digits, then
//! optionally a unit `k`, `m`, `g` or `t` (powers of 1024), which may be
//! followed by `i` and `b` (`512k`, `10M`, `1Gi`, `64MiB`, `2gb`), or `b`
//! alone for bytes; either case; no spaces. What a plain number means is the caller's
//! ([`bytes`] or [`mib`]).

/// A size that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("invalid size {0:?} (use a number, optionally with k, m, g or t: 512k, 10m, 1g)")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

/// A size in bytes; a plain number is bytes.
pub fn bytes(s: &str) -> Result<u64, SizeError> {
    parse(s, 0)
}

/// A size in MiB, rounded up; a plain number is MiB.
pub fn mib(s: &str) -> Result<u64, SizeError> {
    Ok(parse(s, 20)?.div_ceil(1 << 20))
}

/// Bytes of `s`, a plain number counting `1 << plain_shift` bytes.
fn parse(s: &str, plain_shift: u32) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(s.to_string());
    let lower = s.to_ascii_lowercase();
    let (t, byte_suffix) = lower.strip_suffix('b').map_or((lower.as_str(), false), |t| (t, true));
    let (t, binary_suffix) = t.strip_suffix('i').map_or((t, false), |t| (t, true));
    let (digits, shift) = match t.as_bytes().last() {
        Some(b'k') => (&t[..t.len() - 1], 10),
        Some(b'm') => (&t[..t.len() - 1], 20),
        Some(b'g') => (&t[..t.len() - 1], 30),
        Some(b't') => (&t[..t.len() - 1], 40),
        // `i` is no unit of its own; `b` alone is bytes.
        _ if binary_suffix => return Err(invalid()),
        _ if byte_suffix => (t, 0),
        _ => (t, plain_shift),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let too_large = || SizeError::TooLarge(s.to_string());
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    n.checked_mul(1u64 << shift).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bytes_and_units() {
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("0"), Ok(0));
        assert_eq!(bytes("512k"), Ok(512 << 10));
        assert_eq!(bytes("10M"), Ok(10 << 20));
        assert_eq!(bytes("10mb"), Ok(10 << 20));
        assert_eq!(bytes("1Gi"), Ok(1 << 30));
        assert_eq!(bytes("64MiB"), Ok(64 << 20));
        assert_eq!(bytes("2t"), Ok(2 << 40));
        assert_eq!(bytes("100b"), Ok(100));
        for bad in ["", "k", "b", "i", "ib", "10x", "1.5m", "-1", " 10", "1 m", "0x10", "10bi", "m10"] {
            assert_eq!(bytes(bad), Err(SizeError::Invalid(bad.into())), "{bad}");
        }
        assert!(bytes("99999999999999999999").unwrap_err().to_string().contains("too large"));
        assert!(bytes("17179869184g").unwrap_err().to_string().contains("too large"));
    }

    #[test]
    fn mib_rounds_up_and_plain_numbers_are_mib() {
        assert_eq!(mib("512"), Ok(512));
        assert_eq!(mib("512m"), Ok(512));
        assert_eq!(mib("1g"), Ok(1024));
        assert_eq!(mib("2Gi"), Ok(2048));
        assert_eq!(mib("262144k"), Ok(256));
        assert_eq!(mib("1k"), Ok(1));
        assert_eq!(mib("1048577b"), Ok(2));
        assert!(mib("lots").is_err());
        assert!(mib("99999999999999m").unwrap_err().to_string().contains("too large"));
    }
}
