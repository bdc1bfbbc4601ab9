//! API token format: `kg_<id>_<secret><check>` (SPEC §2).
//!
//! Parsing is the first thing done with a presented credential, and it is done before any hash
//! is computed: a token that does not parse, or whose CRC32 check fails, costs a few hundred
//! nanoseconds and no argon2 work. Nothing here allocates on the parse path.

use std::fmt;

/// Length of the random part, in base-62 characters (≈190 bits).
pub const SECRET_LEN: usize = 32;
/// Length of the CRC32 check, in base-62 characters.
pub const CHECK_LEN: usize = 6;
/// Longest key id.
pub const MAX_ID_LEN: usize = 32;
const PREFIX: &str = "kg_";
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented token did not parse. Never shown to the client (which only sees 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token does not have the form kg_<id>_<secret><check>")]
    Form,
    #[error("token checksum does not match")]
    Checksum,
}

/// A syntactically valid token, borrowed from the request header.
///
/// `Debug` never prints the secret part.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token<'a> {
    whole: &'a str,
    id_len: usize,
}

impl<'a> Token<'a> {
    /// Parses and checks the CRC32; rejects anything else without touching a hash.
    pub fn parse(s: &'a str) -> Result<Self, TokenError> {
        let rest = s.strip_prefix(PREFIX).ok_or(TokenError::Form)?;
        let id_len = rest.find('_').ok_or(TokenError::Form)?;
        let id = &rest[..id_len];
        if !is_valid_id(id) {
            return Err(TokenError::Form);
        }
        let tail = &rest[id_len + 1..];
        if tail.len() != SECRET_LEN + CHECK_LEN || !tail.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(TokenError::Form);
        }
        let body_len = PREFIX.len() + id_len + 1 + SECRET_LEN;
        let expected = check_digits(crc32fast::hash(&s.as_bytes()[..body_len]));
        // Not secret-dependent in a useful way (the check is public), but cheap to do in constant time.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            &expected[..],
            &s.as_bytes()[body_len..],
        )) {
            return Err(TokenError::Checksum);
        }
        Ok(Token { whole: s, id_len })
    }

    /// The key id: not secret, used to find the key and in logs.
    pub fn id(&self) -> &'a str {
        &self.whole[PREFIX.len()..PREFIX.len() + self.id_len]
    }

    /// The whole token, for hashing. Callers must never log it.
    pub fn expose(&self) -> &'a [u8] {
        self.whole.as_bytes()
    }
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(kg_{}_<redacted>)", self.id())
    }
}

/// `[a-z0-9-]{1,32}`
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The 6 base-62 digits of a CRC32, most significant first, zero-padded.
pub fn check_digits(mut crc: u32) -> [u8; CHECK_LEN] {
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

/// A freshly generated token. Its `Debug` is redacted; the only way to see it is [`NewToken::reveal`].
pub struct NewToken(String);

impl NewToken {
    /// `kg_<id>_<32 base-62 chars from the OS CSPRNG><check>`.
    pub fn generate(id: &str) -> Self {
        assert!(is_valid_id(id), "key id must match [a-z0-9-]{{1,32}}");
        let mut s = String::with_capacity(PREFIX.len() + id.len() + 1 + SECRET_LEN + CHECK_LEN);
        s.push_str(PREFIX);
        s.push_str(id);
        s.push('_');
        let mut filled = 0;
        while filled < SECRET_LEN {
            let mut buf = [0u8; 64];
            getrandom::fill(&mut buf).expect("the OS random number generator failed");
            for b in buf {
                // Rejection sampling: 248 = 4 * 62, so `b % 62` is unbiased below it.
                if b < 248 && filled < SECRET_LEN {
                    s.push(BASE62[(b % 62) as usize] as char);
                    filled += 1;
                }
            }
        }
        let check = check_digits(crc32fast::hash(s.as_bytes()));
        s.push_str(std::str::from_utf8(&check).expect("base62 is ASCII"));
        NewToken(s)
    }

    /// The token text, to be shown to the operator exactly once.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewToken(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_vectors() {
        assert_eq!(
            crc32fast::hash(b"kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV"),
            0x2ea6_1189
        );
        assert_eq!(&check_digits(0x2ea6_1189), b"0qxrDd");
        assert_eq!(
            crc32fast::hash(b"kg_ci-prod_abcdefghijklmnopqrstuvwxyzABCDEF"),
            0x5b5c_f937
        );
        assert_eq!(&check_digits(0x5b5c_f937), b"1fjYRT");
        let t = Token::parse("kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd").unwrap();
        assert_eq!(t.id(), "demo");
        let t = Token::parse("kg_ci-prod_abcdefghijklmnopqrstuvwxyzABCDEF1fjYRT").unwrap();
        assert_eq!(t.id(), "ci-prod");
    }

    #[test]
    fn rejects_bad_forms_and_checksums() {
        for bad in [
            "",
            "kg_",
            "kg_demo_",
            "xx_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd",
            "kg_Demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd",
            "kg__0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDd",
            "kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrD",
            "kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDdX",
            "kg_demo_0123456789ABCDEFGHIJKLMNOPQRS-UV0qxrDd",
            "kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUV0qxrDé",
        ] {
            assert_eq!(Token::parse(bad), Err(TokenError::Form), "{bad}");
        }
        assert_eq!(
            Token::parse("kg_demo_0123456789ABCDEFGHIJKLMNOPQRSTUW0qxrDd"),
            Err(TokenError::Checksum)
        );
    }

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = NewToken::generate("ci-prod");
        let b = NewToken::generate("ci-prod");
        assert_ne!(a.reveal(), b.reveal());
        let t = Token::parse(a.reveal()).unwrap();
        assert_eq!(t.id(), "ci-prod");
        assert!(!format!("{a:?}{t:?}").contains(&a.reveal()[11..]));
    }
}
