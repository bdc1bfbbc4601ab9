//! Errors about `keys[N]` also name the key's id, so an operator with forty keys need not
//! count tables: `keys[3].rate_limit (id "ci-prod"): invalid rate …`. Only a valid key id is
//! shown: an invalid one may be a token or hash pasted into the wrong field.

use crate::auth::token::is_valid_id;

/// `path` with ` (id "…")` appended when it is under `keys[N]` and key N has a valid id.
pub fn label(path: &str, id_of: impl Fn(usize) -> Option<String>) -> Option<String> {
    let rest = path.strip_prefix("keys[")?;
    let (n, _) = rest.split_once(']')?;
    let id = id_of(n.parse().ok()?)?;
    if !is_valid_id(&id) || path.contains(" (id \"") {
        return None;
    }
    Some(format!("{path} (id {id:?})"))
}

/// Applies [`label`] to every error path and to warnings of the form `keys[N]…: message`.
pub fn name_keys(
    errors: &mut [super::ConfigError],
    warnings: &mut [String],
    id_of: impl Fn(usize) -> Option<String>,
) {
    for e in errors {
        if let Some(p) = label(&e.path, &id_of) {
            e.path = p;
        }
    }
    for w in warnings {
        if let Some((path, msg)) = w.split_once(": ")
            && let Some(p) = label(path, &id_of)
        {
            *w = format!("{p}: {msg}");
        }
    }
}

/// The `id` of `keys[i]` in a TOML text that parses but did not deserialize.
pub fn id_in_text(text: &str, i: usize) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let key = table.get("keys")?.as_array()?.get(i)?;
    Some(key.get("id")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_ids_are_named() {
        let ids = |i: usize| {
            ["ci-prod", "kg_x_secretsecret", "$argon2id$v=19"]
                .get(i)
                .map(|s| s.to_string())
        };
        assert_eq!(
            label("keys[0].rate_limit", ids).as_deref(),
            Some("keys[0].rate_limit (id \"ci-prod\")")
        );
        assert_eq!(label("keys[1].hash", ids), None);
        assert_eq!(label("keys[2].id", ids), None);
        assert_eq!(label("keys[9].id", ids), None);
        assert_eq!(label("server.listen", ids), None);
    }
}
