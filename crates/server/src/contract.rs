//! The OpenAPI document as the contract: what the derived document leaves out of the
//! validation that the engine and the server apply (lengths in characters, no control
//! characters, ranges, list sizes, the policy shapes, this server's `max_n`) is stated
//! here, from the same constants, so that a request the document allows is accepted and
//! one it forbids is refused.

use onrec_engine::types::{
    MAX_AMOUNT, MAX_CONTEXT_ATTRIBUTES, MAX_DESCRIPTION_CHARS, MAX_ID_CHARS, MAX_LABEL_CHARS,
    MAX_LIST_LEN, MAX_TITLE_CHARS, MIN_TIMESTAMP_MS,
};
use onrec_policy::segment::MAX_SEGMENT_CHARS;
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::http::ApiDoc;

/// Control characters (Unicode Cc), which no text may hold.
const CONTROL: &str = r"\u0000-\u001f\u007f-\u009f";
/// White space as Rust's `char::is_whitespace` has it, beside the control characters.
const SPACE: &str = r"\u0020\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000";

/// Text without control characters, at most `max` characters long.
fn text(max: usize) -> Value {
    json!({"maxLength": max, "pattern": format!("^[^{CONTROL}]*$")})
}

/// Prose: text of at most `max` characters without control characters but line breaks
/// and tabs.
fn prose(max: usize) -> Value {
    json!({"maxLength": max, "pattern": r"^[^\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]*$"})
}

/// An identifier: text of at most `max` characters with something besides white space.
fn id(max: usize) -> Value {
    json!({
        "minLength": 1,
        "maxLength": max,
        "pattern": format!("^[^{CONTROL}]*[^{CONTROL}{SPACE}][^{CONTROL}]*$"),
    })
}

/// A list of at most `max` strings, each as `entry` says.
fn list(max: usize, entry: Value) -> Value {
    json!({"maxItems": max, "items": merge_into(json!({"type": "string"}), entry)})
}

/// A number within `min..=max`.
fn range(min: f64, max: f64) -> Value {
    json!({"minimum": min, "maximum": max})
}

/// Adds the keywords of `extra` to the object `schema`.
fn merge(schema: &mut Value, extra: Value) {
    if let (Some(schema), Value::Object(extra)) = (schema.as_object_mut(), extra) {
        schema.extend(extra);
    }
}

/// The schema of one exploration policy, as `onrec_policy::PolicyConfig` reads and checks
/// it: `kind` selects the variant, and no other field is allowed.
fn policy_schema() -> Value {
    let weight = json!({"type": "number", "minimum": 0.0, "maximum": 1.0});
    let variant = |kind: &str, required: &[&str], fields: Value| {
        let mut properties = Map::new();
        properties.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
        if let Value::Object(fields) = fields {
            properties.extend(fields);
        }
        let mut required: Vec<&str> = required.to_vec();
        required.insert(0, "kind");
        json!({
            "type": "object",
            "required": required,
            "properties": properties,
            "additionalProperties": false,
        })
    };
    json!({
        "description": "An exploration policy; `kind` selects it.",
        "oneOf": [
            variant("greedy", &[], json!({})),
            variant("epsilon_greedy", &["epsilon"], json!({
                "epsilon": weight,
                "epsilon_min": weight,
                "decay_impressions": {"type": ["number", "null"], "exclusiveMinimum": 0},
            })),
            variant("ucb1", &[], json!({
                "c": {"type": "number", "minimum": 0},
                "personal": weight,
            })),
            variant("thompson", &[], json!({
                "alpha": {"type": "number", "exclusiveMinimum": 0},
                "beta": {"type": "number", "exclusiveMinimum": 0},
                "draws": {"type": "integer", "minimum": 1, "maximum": onrec_policy::policy::MAX_DRAWS},
                "personal": weight,
            })),
        ],
    })
}

fn merge_into(mut schema: Value, extra: Value) -> Value {
    merge(&mut schema, extra);
    schema
}

/// A segment name.
fn segment() -> Value {
    id(MAX_SEGMENT_CHARS)
}

/// What each (schema, property) of the derived document gains.
fn patches(max_n: u32) -> Vec<(&'static str, &'static str, Value)> {
    let label = text(MAX_LABEL_CHARS);
    vec![
        ("RecommendRequest", "user_id", id(MAX_ID_CHARS)),
        ("RecommendRequest", "n", json!({"maximum": max_n})),
        (
            "RecommendRequest",
            "recent_items",
            list(MAX_LIST_LEN, id(MAX_ID_CHARS)),
        ),
        (
            "RecommendRequest",
            "exclude",
            list(MAX_LIST_LEN, id(MAX_ID_CHARS)),
        ),
        ("RecommendRequest", "segment", segment()),
        ("Context", "device", label.clone()),
        ("Context", "country", label.clone()),
        ("Context", "page", label.clone()),
        ("Context", "hour", json!({"maximum": 23})),
        (
            "Context",
            "attributes",
            json!({
                "maxProperties": MAX_CONTEXT_ATTRIBUTES,
                "propertyNames": merge_into(json!({"type": "string"}), id(MAX_ID_CHARS)),
                "additionalProperties": merge_into(json!({"type": "string"}), label.clone()),
            }),
        ),
        ("Event", "event_id", id(MAX_ID_CHARS)),
        ("Event", "user_id", id(MAX_ID_CHARS)),
        ("Event", "item_id", id(MAX_ID_CHARS)),
        ("Event", "request_id", id(MAX_ID_CHARS)),
        ("Event", "value", range(-MAX_AMOUNT, MAX_AMOUNT)),
        ("Event", "timestamp", json!({"minimum": MIN_TIMESTAMP_MS})),
        ("Item", "item_id", id(MAX_ID_CHARS)),
        ("Item", "title", text(MAX_TITLE_CHARS)),
        ("Item", "description", prose(MAX_DESCRIPTION_CHARS)),
        ("Item", "category", label.clone()),
        ("Item", "tags", list(MAX_CONTEXT_ATTRIBUTES, label)),
        ("Item", "price", range(0.0, MAX_AMOUNT)),
        ("Item", "popularity", range(0.0, MAX_AMOUNT)),
        ("OpeRequest", "bootstrap", json!({"maximum": 10_000})),
        (
            "OpeRequest",
            "seed",
            json!({"format": "uint64", "maximum": u64::MAX}),
        ),
        (
            "OpeRequest",
            "confidence",
            json!({"exclusiveMinimum": 0, "exclusiveMaximum": 1}),
        ),
    ]
}

/// The HTTP API's document with the validation stated, for a server whose largest `n`
/// is `max_n`.
pub fn document(max_n: u32) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let segment = segment();
    let schemas = &mut doc["components"]["schemas"];
    for (schema, field, extra) in patches(max_n) {
        merge(&mut schemas[schema]["properties"][field], extra);
    }
    let ope = &mut schemas["OpeRequest"]["properties"];
    let description = |v: &Value| v["description"].clone();
    ope["policy"] = merge_into(
        policy_schema(),
        json!({"description": description(&ope["policy"])}),
    );
    ope["segments"] = json!({
        "type": "object",
        "description": description(&ope["segments"]),
        "propertyNames": merge_into(json!({"type": "string"}), segment.clone()),
        "additionalProperties": policy_schema(),
    });
    if let Some(params) = doc["paths"]["/v1/segments/{segment}"]["get"]["parameters"].as_array_mut()
    {
        for p in params.iter_mut().filter(|p| p["name"] == "segment") {
            merge(&mut p["schema"], segment.clone());
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stated_bound_lands_on_a_field_of_the_document() {
        let doc = document(7);
        let schemas = &doc["components"]["schemas"];
        for (schema, field, extra) in patches(7) {
            let property = &schemas[schema]["properties"][field];
            assert!(
                property.get("type").is_some(),
                "{schema}.{field} is not in the document"
            );
            for (key, value) in extra.as_object().unwrap() {
                assert_eq!(&property[key], value, "{schema}.{field}.{key}");
            }
        }
        assert_eq!(schemas["RecommendRequest"]["properties"]["n"]["maximum"], 7);
        let policy = &schemas["OpeRequest"]["properties"]["policy"];
        assert_eq!(policy["oneOf"].as_array().unwrap().len(), 4);
        let segment = &doc["paths"]["/v1/segments/{segment}"]["get"]["parameters"][0];
        assert_eq!(segment["schema"]["minLength"], 1);
    }
}
