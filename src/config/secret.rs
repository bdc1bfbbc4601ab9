//! Secrets in the config are references, never literals (SPEC §6):
//!
//! ```toml
//! secrets = [{ env = "DOCS_WEBHOOK_SECRET" }, { file = "/etc/keygate/whsec" }, { credential = "docs-webhook" }]
//! ```
//!
//! A [`SecretRef`] is what the file says; [`SecretRef::resolve`] reads the value, at load and on
//! every reload, into a [`Secret`] whose `Debug`/`Display` print `<redacted>` and whose bytes are
//! zeroed when it is dropped. Errors name the variable, file or credential, never a value.
//!
//! * `env`: the process environment. An empty variable is an error.
//! * `file`: the file's bytes; relative paths are relative to the config file's directory. One
//!   trailing line break (`\n` or `\r\n`) is removed, since `echo secret > file` writes one;
//!   any other byte counts. An empty file is an error.
//! * `credential`: `$CREDENTIALS_DIRECTORY/NAME`, where systemd's `LoadCredential=NAME:PATH`
//!   (or `SetCredentialEncrypted=`) puts it; read like `file`. The name is one path component.

use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use zeroize::Zeroize;

/// Where a secret's value comes from. Deserialises from exactly one of `{ env = "NAME" }`,
/// `{ file = "PATH" }`, `{ credential = "NAME" }`; a plain string is refused with a message
/// that does not repeat it (it is probably the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(String),
    Credential(String),
}

/// A secret's bytes. Never printed; zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<[u8]>);

impl Secret {
    pub fn new(bytes: impl Into<Box<[u8]>>) -> Self {
        Secret(bytes.into())
    }

    /// The value, for the one place that must use it (an HMAC key, a password on the wire).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The message for a literal where a reference belongs.
pub const LITERAL_SECRET: &str = "a secret must be a reference, not a literal: write { env = \"NAME\" }, { file = \"PATH\" } or { credential = \"NAME\" }";

impl SecretRef {
    /// Reads the value. `base` resolves relative `file` paths. The error names the source
    /// (variable, path, credential) and never contains the value.
    pub fn resolve(&self, base: &Path) -> Result<Secret, String> {
        self.resolve_with(base, |k| std::env::var_os(k))
    }

    /// [`resolve`](Self::resolve) with the environment supplied by the caller (tests, and the
    /// future cluster mode's own lookups).
    pub fn resolve_with(
        &self,
        base: &Path,
        env: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Secret, String> {
        match self {
            SecretRef::Env(name) => {
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(format!("invalid environment variable name {name:?}"));
                }
                let v =
                    env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
                let bytes = v
                    .into_string()
                    .map_err(|_| format!("environment variable {name} is not valid UTF-8"))?
                    .into_bytes();
                non_empty(bytes, || format!("environment variable {name} is empty"))
            }
            SecretRef::File(p) => {
                if p.is_empty() {
                    return Err("file path is empty".to_string());
                }
                let path = if Path::new(p).is_absolute() {
                    Path::new(p).to_path_buf()
                } else {
                    base.join(p)
                };
                read_secret_file(&path)
            }
            SecretRef::Credential(name) => {
                if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
                    return Err(format!(
                        "invalid credential name {name:?} (one file name, as in LoadCredential=)"
                    ));
                }
                let dir = env("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!(
                        "credential {name}: $CREDENTIALS_DIRECTORY is not set (systemd sets it for LoadCredential=)"
                    )
                })?;
                read_secret_file(&Path::new(&dir).join(name))
                    .map_err(|e| format!("credential {name}: {e}"))
            }
        }
    }
}

fn non_empty(bytes: Vec<u8>, empty: impl FnOnce() -> String) -> Result<Secret, String> {
    if bytes.is_empty() {
        Err(empty())
    } else {
        Ok(Secret::new(bytes))
    }
}

fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    let secret = non_empty(bytes.clone(), || format!("{} is empty", path.display()));
    bytes.zeroize();
    secret
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretRef;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("{ env = \"NAME\" }, { file = \"PATH\" } or { credential = \"NAME\" }")
            }
            // The value is not echoed: it is most likely the secret itself.
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretRef, E> {
                Err(E::custom(LITERAL_SECRET))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let mut found: Option<SecretRef> = None;
                while let Some(k) = map.next_key::<String>()? {
                    let v: String = map.next_value()?;
                    let r = match k.as_str() {
                        "env" => SecretRef::Env(v),
                        "file" => SecretRef::File(v),
                        "credential" => SecretRef::Credential(v),
                        _ => {
                            return Err(de::Error::unknown_field(
                                &k,
                                &["env", "file", "credential"],
                            ));
                        }
                    };
                    if found.replace(r).is_some() {
                        return Err(de::Error::custom("exactly one of env, file or credential"));
                    }
                }
                found.ok_or_else(|| de::Error::custom("exactly one of env, file or credential"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    #[derive(serde::Deserialize)]
    struct T {
        #[allow(dead_code)]
        s: SecretRef,
    }

    fn parse(toml: &str) -> Result<SecretRef, String> {
        let de = toml::de::Deserializer::parse(toml).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize::<_, T>(de)
            .map(|t| t.s)
            .map_err(|e| {
                let path = e.path().to_string();
                format!("{path}: {}", e.into_inner().message())
            })
    }

    #[test]
    fn forms() {
        assert_eq!(parse("s = { env = \"A\" }"), Ok(SecretRef::Env("A".into())));
        assert_eq!(
            parse("s = { file = \"/x\" }"),
            Ok(SecretRef::File("/x".into()))
        );
        assert_eq!(
            parse("s = { credential = \"c\" }"),
            Ok(SecretRef::Credential("c".into()))
        );
        let lit = parse("s = \"hunter2-literal\"").unwrap_err();
        assert!(lit.starts_with("s: a secret must be a reference"), "{lit}");
        assert!(!lit.contains("hunter2"), "{lit}");
        assert!(parse("s = { env = \"A\", file = \"B\" }").is_err());
        assert!(parse("s = {}").is_err());
        assert!(parse("s = { value = \"x\" }").is_err());
    }

    #[test]
    fn resolution_never_prints_values() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "s3cret-file\r\n").unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let env = |k: &str| match k {
            "SET" => Some(OsString::from("s3cret-env")),
            "EMPTY" => Some(OsString::new()),
            "CREDENTIALS_DIRECTORY" => Some(dir.path().as_os_str().to_owned()),
            _ => None,
        };
        let r = |s: SecretRef| s.resolve_with(dir.path(), env);
        assert_eq!(
            r(SecretRef::Env("SET".into())).unwrap().expose(),
            b"s3cret-env"
        );
        assert_eq!(
            r(SecretRef::File("f".into())).unwrap().expose(),
            b"s3cret-file"
        );
        assert_eq!(
            r(SecretRef::Credential("f".into())).unwrap().expose(),
            b"s3cret-file"
        );
        assert_eq!(
            r(SecretRef::Env("NOPE".into())).unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert_eq!(
            r(SecretRef::Env("EMPTY".into())).unwrap_err(),
            "environment variable EMPTY is empty"
        );
        assert!(
            r(SecretRef::File("empty".into()))
                .unwrap_err()
                .ends_with("is empty")
        );
        assert!(r(SecretRef::Credential("../f".into())).is_err());
        let s = r(SecretRef::Env("SET".into())).unwrap();
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        let no_dir = SecretRef::Credential("c".into())
            .resolve_with(dir.path(), |_| None)
            .unwrap_err();
        assert!(no_dir.contains("CREDENTIALS_DIRECTORY"), "{no_dir}");
    }
}
