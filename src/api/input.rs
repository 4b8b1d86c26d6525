//! Checks on request bodies that come before the engine sees them: JSON types, unknown
//! fields, UUID-like strings and OpenStack's lenient booleans.
//!
//! Every refusal is a 400 whose message names the field, in the shape Cinder's schema
//! validator uses: `Invalid input for field/attribute <field>. Value: <value>. <why>`.

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{Error, Result};

/// A JSON object, as request bodies arrive.
pub type Object = Map<String, Value>;

/// Longest rendering of a rejected value in an error message; bodies may be 64 KiB.
const SHOWN_VALUE_CHARS: usize = 120;

/// Strings accepted as true, exactly as OpenStack's `boolean` parameter type lists them.
const TRUE_WORDS: [&str; 12] = [
    "True", "TRUE", "true", "1", "ON", "On", "on", "YES", "Yes", "yes", "y", "t",
];

/// Strings accepted as false.
const FALSE_WORDS: [&str; 12] = [
    "False", "FALSE", "false", "0", "OFF", "Off", "off", "NO", "No", "no", "n", "f",
];

/// The refusal of `value` in `field`, with the reason in one sentence.
pub fn invalid_field(field: &str, value: &Value, reason: &str) -> Error {
    Error::invalid(format!(
        "Invalid input for field/attribute {field}. Value: {}. {reason}",
        shown(value)
    ))
}

/// The refusal of a body that lacks the required `field` inside `parent`.
pub fn missing_field(parent: &str, field: &str) -> Error {
    Error::invalid(format!(
        "Invalid input for field/attribute {parent}. Required field '{field}' is missing."
    ))
}

/// `value` as an object, or a refusal naming `field`.
pub fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Object> {
    value
        .as_object()
        .ok_or_else(|| invalid_field(field, value, "Expected a JSON object."))
}

/// Refuses any key of `object` (the value of `field`) that is not in `allowed`.
pub fn only_fields(object: &Object, field: &str, allowed: &[&str]) -> Result<()> {
    match object.keys().find(|key| !allowed.contains(&key.as_str())) {
        None => Ok(()),
        Some(key) => Err(Error::invalid(format!(
            "Invalid input for field/attribute {field}. Unexpected field {key:?}; allowed \
             fields are {}.",
            allowed.join(", ")
        ))),
    }
}

/// The value of `key`, with JSON `null` counted as absent.
pub fn present<'a>(object: &'a Object, key: &str) -> Option<&'a Value> {
    object.get(key).filter(|value| !value.is_null())
}

/// `value` (the value of `field`) as a string.
pub fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str> {
    value
        .as_str()
        .ok_or_else(|| invalid_field(field, value, "Expected a string."))
}

/// `value` (the value of `field`) as a non-negative integer.
pub fn count(value: &Value, field: &str) -> Result<u64> {
    value
        .as_u64()
        .ok_or_else(|| invalid_field(field, value, "Expected a non-negative integer."))
}

/// The optional string `key` of `object`; `null` counts as absent.
pub fn optional_string(object: &Object, key: &str) -> Result<Option<String>> {
    present(object, key)
        .map(|value| string(value, key).map(str::to_owned))
        .transpose()
}

/// The optional UUID-like string `key` of `object`; `null` counts as absent.
pub fn optional_uuid(object: &Object, key: &str) -> Result<Option<Uuid>> {
    present(object, key)
        .map(|value| uuid(value, key))
        .transpose()
}

/// `value` (the value of `field`) as a UUID-like string, see [`uuid_like`].
pub fn uuid(value: &Value, field: &str) -> Result<Uuid> {
    value
        .as_str()
        .and_then(uuid_like)
        .ok_or_else(|| invalid_field(field, value, "Expected a UUID."))
}

/// Parses a UUID the way oslo's `is_uuid_like` accepts one: any case, dashes anywhere or
/// nowhere, `urn:` and `uuid:` removed, and `{` `}` trimmed from both ends.
pub fn uuid_like(text: &str) -> Option<Uuid> {
    // Same steps in the same order as oslo, so odd inputs are judged alike.
    let text = text.replace("urn:", "").replace("uuid:", "");
    let hex: String = text
        .trim_matches(|c| c == '{' || c == '}')
        .chars()
        .filter(|c| *c != '-')
        .collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Uuid::try_parse(&hex).ok()
}

/// Parses a UUID in its canonical 8-4-4-4-12 form (Glance's `id` pattern), in any case.
pub fn canonical_uuid(text: &str) -> Option<Uuid> {
    let dashes_in_place = text.len() == 36
        && text
            .char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    if !dashes_in_place {
        return None;
    }
    Uuid::try_parse(text).ok()
}

/// Reads an OpenStack boolean: a JSON boolean or one of a fixed list of strings. Anything
/// else, `null` and numbers included, is not a boolean.
pub fn bool_like(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::String(text) if TRUE_WORDS.contains(&text.as_str()) => Some(true),
        Value::String(text) if FALSE_WORDS.contains(&text.as_str()) => Some(false),
        _ => None,
    }
}

/// An action body `{"<action>": <arguments>}` split into its one key and value.
pub fn single_action(body: &Value) -> Result<(&str, &Value)> {
    let object = body
        .as_object()
        .ok_or_else(|| Error::invalid("Malformed request body: expected a JSON object."))?;
    let mut entries = object.iter();
    match (entries.next(), entries.next()) {
        (Some((action, arguments)), None) => Ok((action.as_str(), arguments)),
        (None, _) => Err(Error::invalid("Malformed request body: no action given.")),
        (Some(_), Some(_)) => Err(Error::invalid(
            "Malformed request body: too many body keys.",
        )),
    }
}

/// The refusal of an action this API does not have.
pub fn no_such_action(action: &str) -> Error {
    Error::invalid(format!("There is no such action: {action}"))
}

/// A short rendering of a client's value for an error message: strings bare, the rest as
/// JSON, cut after [`SHOWN_VALUE_CHARS`] characters.
fn shown(value: &Value) -> String {
    let text = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.chars().count() <= SHOWN_VALUE_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(SHOWN_VALUE_CHARS).collect();
    cut.push_str("...");
    cut
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ID: &str = "6f9619ff-8b86-d011-b42d-00c04fc964ff";

    #[test]
    fn uuid_like_accepts_oslo_spellings() {
        let expected = Uuid::parse_str(ID).unwrap();
        for text in [
            ID,
            "6F9619FF-8B86-D011-B42D-00C04FC964FF",
            "6f9619ff8b86d011b42d00c04fc964ff",
            "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
            "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "uuid:6f9619ff8b86d011b42d00c04fc964ff",
            "6f-9619ff8b86d011b42d00c04fc964f-f",
            "{{6f9619ff8b86d011b42d00c04fc964ff}",
        ] {
            assert_eq!(uuid_like(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn uuid_like_refuses_other_strings() {
        for text in [
            "",
            "not-a-uuid",
            "6f9619ff-8b86-d011-b42d-00c04fc964f",
            "6f9619ff-8b86-d011-b42d-00c04fc964fff",
            "6f9619ff-8b86-d011-b42d-00c04fc964fg",
            "URN:6f9619ff-8b86-d011-b42d-00c04fc964ff",
            " 6f9619ff-8b86-d011-b42d-00c04fc964ff",
            "6f9619ff_8b86_d011_b42d_00c04fc964ff",
            "+f9619ff-8b86-d011-b42d-00c04fc964ff",
            "6f9619ff-8b86-d011-b42d-00c04fc964\u{0661}\u{0662}",
        ] {
            assert_eq!(uuid_like(text), None, "{text:?}");
        }
    }

    #[test]
    fn canonical_uuid_needs_dashes_in_place() {
        assert!(canonical_uuid(ID).is_some());
        assert!(canonical_uuid(&ID.to_uppercase()).is_some());
        assert!(canonical_uuid("6f9619ff8b86d011b42d00c04fc964ff").is_none());
        assert!(canonical_uuid("6f9619f-f8b86-d011-b42d-00c04fc964ff").is_none());
        assert!(canonical_uuid("{6f9619ff-8b86-d011-b42d-00c04fc964f}").is_none());
    }

    #[test]
    fn bool_like_accepts_the_listed_words_only() {
        for word in TRUE_WORDS {
            assert_eq!(bool_like(&json!(word)), Some(true), "{word}");
        }
        for word in FALSE_WORDS {
            assert_eq!(bool_like(&json!(word)), Some(false), "{word}");
        }
        assert_eq!(bool_like(&json!(true)), Some(true));
        assert_eq!(bool_like(&json!(false)), Some(false));
        for value in [
            json!(null),
            json!(1),
            json!(0),
            json!("TrUe"),
            json!("Y"),
            json!("T"),
            json!("wrong"),
            json!(""),
            json!([]),
        ] {
            assert_eq!(bool_like(&value), None, "{value}");
        }
    }

    #[test]
    fn single_action_needs_exactly_one_key() {
        let body = json!({"os-extend": {"new_size": 2}});
        assert_eq!(
            single_action(&body).unwrap(),
            ("os-extend", &json!({"new_size": 2}))
        );

        for body in [
            json!({}),
            json!({"a": 1, "b": 2}),
            json!([]),
            json!("os-extend"),
        ] {
            let err = single_action(&body).unwrap_err();
            assert_eq!(err.status(), 400);
            assert!(
                err.message().starts_with("Malformed request body"),
                "{body}"
            );
        }
        let err = single_action(&json!({"a": 1, "b": 2})).unwrap_err();
        assert!(err.message().contains("too many body keys"));
    }

    #[test]
    fn unknown_fields_are_named() {
        let body = json!({"name": "a", "colour": "red"});
        let err = only_fields(body.as_object().unwrap(), "volume", &["name"]).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.message().contains("\"colour\""), "{}", err.message());
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = count(&json!("ten"), "size").unwrap_err();
        assert_eq!(
            err.message(),
            "Invalid input for field/attribute size. Value: ten. Expected a non-negative integer."
        );
        assert!(count(&json!(-1), "size").is_err());
        assert!(count(&json!(1.5), "size").is_err());
        assert_eq!(count(&json!(3), "size"), Ok(3));
        assert!(string(&json!(3), "name")
            .unwrap_err()
            .message()
            .contains("name"));
    }

    #[test]
    fn null_counts_as_absent_for_optional_fields() {
        let body = json!({"description": null, "instance_uuid": null});
        let object = body.as_object().unwrap();
        assert_eq!(optional_string(object, "description"), Ok(None));
        assert_eq!(optional_uuid(object, "instance_uuid"), Ok(None));
        assert_eq!(optional_string(object, "other"), Ok(None));
    }

    #[test]
    fn long_values_are_cut_in_messages() {
        let err = invalid_field("name", &json!("x".repeat(10_000)), "Too long.");
        assert!(err.message().len() < 300);
        let err = invalid_field("name", &json!("é".repeat(500)), "Too long.");
        assert!(err.message().ends_with("... Too long."));
    }
}
