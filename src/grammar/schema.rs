//! How Hearth reads a client's JSON schema before compiling it: an object schema that lists its
//! `properties` and says nothing of others is closed (`additionalProperties: false`). JSON Schema
//! leaves such an object open, and a small model let free to add keys goes on adding them until
//! `max_tokens` (in the schema set, 3 of 70 answers never finished for that alone). OpenAI's strict
//! mode requires closed objects, llama.cpp's schema grammar and xgrammar's strict mode close them
//! too; a client who wants extra keys says `additionalProperties: true` (or a schema for them).
//!
//! Closing must only narrow what may be written, so every answer still validates against the
//! client's schema, and must never make a schema unsatisfiable. So nothing is closed where the
//! grammar compiler merges schemas side by side (the parts of an `allOf`, the branches of an
//! `anyOf` beside the object's own keywords, a `$ref` with sibling keywords, and everything below
//! them, including the definitions they reach): one closed side would forbid the other side's
//! keys. A schema with a `oneOf` is left as it is: closing its branches could let the compiler
//! prove them disjoint and accept an answer that matches two of the client's open branches.
//! An object whose `required` names a key it does not list, or whose `minProperties` exceeds its
//! properties, stays open too.
use std::collections::HashSet;

use serde_json::{Map, Value};

/// Keywords whose value is one subschema.
const ONE: [&str; 5] = [
    "additionalProperties",
    "items",
    "additionalItems",
    "contains",
    "propertyNames",
];
/// Keywords whose value maps names to subschemas.
const MAP: [&str; 3] = ["properties", "patternProperties", "dependentSchemas"];
/// Where definitions live (`#/$defs/NAME`, `#/definitions/NAME`).
const DEFS: [&str; 2] = ["$defs", "definitions"];

/// Close every object schema in `schema` that lists properties and leaves the rest unsaid, where
/// that is safe (see the module's words).
pub fn close_objects(schema: &mut Value) {
    if has_key(schema, "oneOf") {
        return;
    }
    // Definitions reached from a merged place stay open, all the way down (and what they reach).
    let mut open: HashSet<String> = HashSet::new();
    let mut todo = Vec::new();
    refs(schema, false, &mut todo);
    while let Some(r) = todo.pop() {
        if open.insert(r.clone()) {
            if let Some(def) = schema.pointer(r.trim_start_matches('#')) {
                let mut more = Vec::new();
                refs(def, true, &mut more);
                todo.extend(more);
            }
        }
    }
    walk(schema, false, &open, "#");
}

fn has_key(v: &Value, key: &str) -> bool {
    match v {
        Value::Object(m) => m.contains_key(key) || m.values().any(|v| has_key(v, key)),
        Value::Array(a) => a.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

/// Whether the object's own keywords sit beside an applicator the compiler merges them with.
fn merges(obj: &Map<String, Value>) -> bool {
    let own = ["properties", "required", "additionalProperties", "type"]
        .iter()
        .any(|k| obj.contains_key(*k));
    obj.contains_key("allOf")
        || (own && obj.contains_key("anyOf"))
        || (obj.contains_key("$ref") && obj.len() > 1)
}

/// Subschemas of `obj` with whether each is merged with others (`merged`: this node is).
fn children(obj: &mut Map<String, Value>, merged: bool) -> Vec<(&mut Value, bool)> {
    let side = merged || merges(obj);
    let mut out = Vec::new();
    for (k, v) in obj.iter_mut() {
        match (k.as_str(), v) {
            ("allOf" | "anyOf", Value::Array(parts)) => {
                out.extend(parts.iter_mut().map(|p| (p, side)));
            }
            ("prefixItems" | "items", Value::Array(parts)) => {
                out.extend(parts.iter_mut().map(|p| (p, merged)));
            }
            (k, v) if ONE.contains(&k) => out.push((v, merged)),
            (k, Value::Object(m)) if MAP.contains(&k) => {
                out.extend(m.values_mut().map(|p| (p, merged)));
            }
            _ => {}
        }
    }
    out
}

/// The `$ref`s reached from merged places (or, with `merged`, from anywhere below).
fn refs(schema: &Value, merged: bool, out: &mut Vec<String>) {
    let mut copy = schema.clone();
    collect(&mut copy, merged, out);
}

fn collect(schema: &mut Value, merged: bool, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(r)) = obj.get("$ref") {
        if merged || merges(obj) {
            out.push(r.clone());
        }
    }
    for (child, m) in children(obj, merged) {
        collect(child, m, out);
    }
    for d in DEFS {
        if let Some(Value::Object(defs)) = obj.get_mut(d) {
            defs.values_mut().for_each(|v| collect(v, merged, out));
        }
    }
}

/// `at`: this node's pointer, for the definitions directly under the root.
fn walk(schema: &mut Value, merged: bool, open: &HashSet<String>, at: &str) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if !merged && closable(obj) {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    for (child, m) in children(obj, merged) {
        walk(child, m, open, "");
    }
    for d in DEFS {
        if let Some(Value::Object(defs)) = obj.get_mut(d) {
            for (name, v) in defs.iter_mut() {
                let path = format!("{at}/{d}/{name}");
                let keep = merged || at.is_empty() || open.contains(&path);
                walk(v, keep, open, "");
            }
        }
    }
}

/// Lists `properties`, says nothing of other keys, is merged with nothing, and asks for no key
/// (or more keys) than it lists.
fn closable(obj: &Map<String, Value>) -> bool {
    let Some(Value::Object(props)) = obj.get("properties") else {
        return false;
    };
    let listed = obj
        .get("required")
        .and_then(Value::as_array)
        .is_none_or(|r| {
            r.iter()
                .all(|k| k.as_str().is_some_and(|k| props.contains_key(k)))
        });
    let enough = obj
        .get("minProperties")
        .and_then(Value::as_u64)
        .is_none_or(|n| n as usize <= props.len());
    listed
        && enough
        && !merges(obj)
        && ![
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
            "anyOf",
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
        let with_ref = json!({"$ref": "#/$defs/base", "properties": {"a": {}},
            "$defs": {"base": {"properties": {"id": {}}}}});
        assert_eq!(closed(with_ref.clone()), with_ref);
    }

    /// The cases where closing would forbid a key another part requires, or let an answer match
    /// two branches of a `oneOf`: nothing changes.
    #[test]
    fn merged_places_and_unlisted_requirements_stay_open() {
        for schema in [
            // A definition reached from an allOf part (inheritance, as OpenAPI writes it).
            json!({"allOf": [{"$ref": "#/$defs/Base"}, {"properties": {"x": {}}, "required": ["x"]}],
                "$defs": {"Base": {"properties": {"id": {}}}}}),
            // Own properties beside an anyOf.
            json!({"properties": {"kind": {}}, "anyOf": [{"properties": {"a": {}}, "required": ["a"]}]}),
            // An anyOf inside an allOf part, and nested objects below the parts.
            json!({"allOf": [{"anyOf": [{"properties": {"a": {}}}]},
                {"properties": {"b": {}, "p": {"properties": {"y": {}}}}, "required": ["b"]}]}),
            // Required or minProperties beyond what is listed.
            json!({"properties": {"a": {}}, "required": ["a", "b"]}),
            json!({"properties": {"a": {}}, "minProperties": 2}),
            // Any oneOf.
            json!({"properties": {"v": {"oneOf": [{"properties": {"a": {}, "b": {}}, "required": ["a"]},
                {"properties": {"b": {}}, "required": ["b"]}]}}}),
        ] {
            assert_eq!(closed(schema.clone()), schema);
        }
        // A definition reached both from a plain place and a merged one stays open; one reached
        // only from plain places is closed.
        let v = closed(
            json!({"properties": {"a": {"$ref": "#/$defs/A"}, "b": {"$ref": "#/$defs/B"},
            "c": {"allOf": [{"$ref": "#/$defs/B"}]}},
            "$defs": {"A": {"properties": {"x": {}}}, "B": {"properties": {"y": {}}}}}),
        );
        assert_eq!(v["$defs"]["A"]["additionalProperties"], json!(false));
        assert!(v["$defs"]["B"].get("additionalProperties").is_none());
    }
}
