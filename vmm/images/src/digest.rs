//! Content digests (`sha256:<64 hex>`) and hashing while copying.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A sha256 content digest, `sha256:` and 64 lowercase hex digits.
///
/// Only sha256 is supported: it is what every registry and `docker save`
/// produce. A parsed digest is always well formed, so its hex part is safe
/// to use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// A string that is not a sha256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: {reason}")]
pub struct DigestError {
    /// The string as given (cut to 100 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hash(Sha256::digest(bytes).into())
    }

    fn from_hash(hash: [u8; 32]) -> Self {
        let mut hex = String::with_capacity(64);
        for b in hash {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Self { hex }
    }

    /// Parses a 64-digit lowercase hex string (without `sha256:`).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        let err = |reason| DigestError { input: hex.chars().take(100).collect(), reason };
        if hex.len() != 64 {
            return Err(err("a sha256 digest has 64 hex digits"));
        }
        if !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(err("a sha256 digest has only lowercase hex digits"));
        }
        Ok(Self { hex: hex.to_owned() })
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as `docker images` shows an image ID.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }

    /// The digest `oci-spec` parsed in a descriptor, if it is a sha256 one
    /// (`oci-spec` takes any algorithm; the store keeps blobs by sha256).
    pub(crate) fn from_oci(d: &oci_spec::image::Digest) -> Result<Self, DigestError> {
        d.as_ref().parse()
    }

    /// The digest as `oci-spec`'s type, for a descriptor vmrun writes. A
    /// parsed digest is always one `oci-spec` takes, but it has no
    /// infallible way to make one.
    pub(crate) fn to_oci(&self) -> Result<oci_spec::image::Digest, DigestError> {
        oci_spec::image::Digest::try_from(self.to_string())
            .map_err(|_| DigestError { input: self.to_string(), reason: "oci-spec does not take it" })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Self::from_hex(hex),
            Some((_, _)) => Err(DigestError {
                input: s.chars().take(100).collect(),
                reason: "only sha256 digests are supported",
            }),
            None => Err(DigestError { input: s.chars().take(100).collect(), reason: "a digest starts with `sha256:`" }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes and counts what passes through it into `inner`.
#[derive(Debug)]
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The digest and size of everything written, and the inner writer.
    pub(crate) fn finish(self) -> (Digest, u64, W) {
        (Digest::from_hash(self.hasher.finalize().into()), self.count, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The digest and size of everything `reader` yields.
pub(crate) fn digest_reader(reader: &mut impl Read) -> io::Result<(Digest, u64)> {
    let mut w = HashingWriter::new(io::sink());
    io::copy(reader, &mut w)?;
    let (d, n, _) = w.finish();
    Ok((d, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_empty() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_and_reject() {
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse().unwrap();
        assert_eq!(d.short(), "e3b0c44298fc");
        assert!("sha512:abcd".parse::<Digest>().unwrap_err().to_string().contains("only sha256"));
        assert!("sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855".parse::<Digest>().is_err());
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
        assert!("e3b0".parse::<Digest>().is_err());
    }

    #[test]
    fn converts_from_and_to_oci_spec() {
        let d = Digest::of(b"x");
        let oci = d.to_oci().unwrap();
        assert_eq!(oci.as_ref(), d.to_string());
        assert_eq!(Digest::from_oci(&oci).unwrap(), d);
        // Digests oci-spec takes but the store cannot name files by.
        let sha512: oci_spec::image::Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert!(Digest::from_oci(&sha512).unwrap_err().to_string().contains("only sha256"));
        let other: oci_spec::image::Digest = "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8".parse().unwrap();
        assert!(Digest::from_oci(&other).unwrap_err().to_string().contains("only sha256"));
    }

    #[test]
    fn hashing_writer_counts() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello").unwrap();
        let (d, n, v) = w.finish();
        assert_eq!((n, v.as_slice()), (5, &b"hello"[..]));
        assert_eq!(d, Digest::of(b"hello"));
    }
}
