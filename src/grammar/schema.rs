//! How Hearth reads a client's JSON schema before compiling it: an object schema that lists its
//! `properties` and says nothing of others is closed (`additionalProperties: false`). JSON Schema
//! leaves such an object open, and a small model let free to add keys goes on adding them until
//! `max_tokens` (in the schema set, 3 of 70 answers never finished for that alone). OpenAI's strict
//! mode requires closed objects, llama.cpp's schema grammar and xgrammar's strict mode close them
//! too; a client who wants extra keys says `additionalProperties: true` (or a schema for them).
//! Closing only narrows what may be generated, so every answer still validates against the
//! client's own schema.
use serde_json::{Map, Value};

/// Keywords whose value is one subschema.
const ONE: [&str; 6] = [
    "additionalProperties",
    "items",
    "additionalItems",
    "not",
    "contains",
    "propertyNames",
];
/// Keywords whose value is a list of subschemas.
const LIST: [&str; 4] = ["anyOf", "oneOf", "prefixItems", "items"];
/// Keywords whose value maps names to subschemas.
const MAP: [&str; 5] = [
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];

/// Close every object schema in `schema` that lists properties and leaves the rest unsaid.
pub fn close_objects(schema: &mut Value) {
    walk(schema, false);
}

/// `in_all_of`: the schema is one part of an `allOf`, where each part sees only its own
/// properties; closing a part would forbid the other parts' keys.
fn walk(schema: &mut Value, in_all_of: bool) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if !in_all_of && closable(obj) {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ONE {
        if let Some(v) = obj.get_mut(key) {
            walk(v, false);
        }
    }
    for key in LIST {
        if let Some(Value::Array(items)) = obj.get_mut(key) {
            items.iter_mut().for_each(|v| walk(v, false));
        }
    }
    if let Some(Value::Array(parts)) = obj.get_mut("allOf") {
        parts.iter_mut().for_each(|v| walk(v, true));
    }
    for key in MAP {
        if let Some(Value::Object(m)) = obj.get_mut(key) {
            m.values_mut().for_each(|v| walk(v, false));
        }
    }
}

/// Lists `properties`, says nothing of other keys, and is not combined with another schema
/// (`allOf`, a sibling `$ref`) that may add properties of its own.
fn closable(obj: &Map<String, Value>) -> bool {
    obj.get("properties").is_some_and(Value::is_object)
        && ![
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
            "allOf",
            "$ref",
        ]
        .iter()
        .any(|k| obj.contains_key(*k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn closed(mut v: Value) -> Value {
        close_objects(&mut v);
        v
    }

    #[test]
    fn objects_with_properties_are_closed_wherever_they_sit() {
        let v = closed(json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
                "b": {"type": "array", "items": {"properties": {"y": {}}}},
                "c": {"anyOf": [{"properties": {"z": {}}}, {"type": "null"}]}
            },
            "$defs": {"d": {"type": "object", "properties": {"w": {}}}}
        }));
        for p in [
            "",
            "/properties/a",
            "/properties/b/items",
            "/properties/c/anyOf/0",
            "/$defs/d",
        ] {
            let node = v.pointer(p).unwrap();
            assert_eq!(node["additionalProperties"], json!(false), "{p}");
        }
    }

    #[test]
    fn what_the_client_said_or_could_mean_is_kept() {
        let open = json!({"properties": {"a": {}}, "additionalProperties": true});
        assert_eq!(closed(open.clone()), open);
        let typed = json!({"properties": {"a": {}}, "additionalProperties": {"type": "string"}});
        assert_eq!(closed(typed.clone()), typed);
        // No properties listed: any object, as asked.
        assert_eq!(closed(json!({"type": "object"})), json!({"type": "object"}));
        // Parts of an allOf each see only their own keys; the parts stay open.
        let parts = json!({"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]});
        assert_eq!(closed(parts.clone()), parts);
        let with_ref = json!({"$ref": "#/$defs/base", "properties": {"a": {}}});
        assert_eq!(closed(with_ref.clone()), with_ref);
    }
}
