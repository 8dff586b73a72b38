"""Write benches/structured_set.jsonl: JSON schemas written for Hearth's structured-output benchmark,
each with a chat prompt asking for such a record.

    python3 benches/structured_set.py

Fourteen internal-app records (tickets, invoices, inventory, ...), each in four variants that add
features: flat fields with bounds and enums; optional fields and a nested object; an array of
objects through `$ref`; `anyOf` with null, `pattern` and `const`. Every string is bounded (maxLength,
enum or pattern) and every array has maxItems, so a small model's answer stays short.
"""
import json
import pathlib

S = lambda n: {"type": "string", "maxLength": n}  # noqa: E731
I = lambda lo, hi: {"type": "integer", "minimum": lo, "maximum": hi}  # noqa: E731
N = lambda lo, hi: {"type": "number", "minimum": lo, "maximum": hi}  # noqa: E731
E = lambda *v: {"enum": list(v)}  # noqa: E731

# name, request, flat fields, optional fields, nested object (name, fields), item (name, fields),
# anyOf-null field, pattern field (name, regex), const field (name, value)
RECORDS = [
    ("ticket", "a support ticket for a broken laptop screen",
     {"title": S(40), "priority": E("low", "medium", "high"), "estimate_hours": I(1, 40)},
     {"assignee": S(24)}, ("reporter", {"name": S(24), "team": S(20)}),
     ("comment", {"author": S(20), "text": S(40)}), "due_date", ("id", "^TCK-[0-9]{4}$"), ("kind", "ticket")),
    ("invoice", "an invoice for two hours of consulting",
     {"customer": S(30), "currency": E("EUR", "USD", "GBP"), "total": N(0, 100000)},
     {"notes": S(40)}, ("billing_address", {"street": S(30), "city": S(20), "zip": S(10)}),
     ("line", {"description": S(30), "quantity": I(1, 100), "unit_price": N(0, 10000)}), "po_number",
     ("number", "^INV-[0-9]{6}$"), ("version", 1)),
    ("inventory_item", "a warehouse inventory record for office chairs",
     {"name": S(30), "quantity": I(0, 10000), "unit": E("piece", "box", "pallet")},
     {"supplier": S(30)}, ("location", {"aisle": I(1, 50), "shelf": I(1, 10)}),
     ("movement", {"kind": E("in", "out"), "quantity": I(1, 500)}), "expiry",
     ("sku", "^[A-Z]{3}-[0-9]{4}$"), ("tracked", True)),
    ("employee", "an HR record for a new software engineer",
     {"name": S(30), "department": E("engineering", "sales", "finance", "hr"), "level": I(1, 8)},
     {"manager": S(30)}, ("contact", {"email": S(40), "phone": S(20)}),
     ("skill", {"name": S(20), "years": I(0, 40)}), "end_date", ("employee_id", "^E[0-9]{5}$"),
     ("active", True)),
    ("meeting", "notes from a weekly planning meeting",
     {"topic": S(40), "duration_minutes": I(5, 240), "mood": E("good", "neutral", "tense")},
     {"room": S(20)}, ("organizer", {"name": S(24), "team": S(20)}),
     ("action_item", {"owner": S(20), "task": S(40)}), "follow_up", ("date", "^2026-[0-1][0-9]-[0-3][0-9]$"),
     ("format", "notes")),
    ("log_event", "a log event for a failed database login",
     {"service": S(24), "level": E("debug", "info", "warn", "error"), "latency_ms": N(0, 60000)},
     {"trace_id": S(32)}, ("host", {"name": S(24), "region": E("eu", "us", "asia")}),
     ("field", {"key": S(16), "value": S(30)}), "user", ("code", "^[A-Z]{2}[0-9]{3}$"), ("schema", 2)),
    ("product", "a product catalog entry for a stainless steel water bottle",
     {"title": S(40), "price": N(0, 5000), "category": E("kitchen", "outdoor", "office", "toys")},
     {"brand": S(24)}, ("dimensions", {"height_cm": N(0, 200), "weight_g": I(0, 50000)}),
     ("variant", {"color": S(16), "stock": I(0, 1000)}), "discount", ("ean", "^[0-9]{13}$"),
     ("listed", True)),
    ("address", "a shipping address in Lyon, France",
     {"street": S(40), "city": S(24), "country": E("FR", "DE", "US", "GB", "IT")},
     {"apartment": S(10)}, ("geo", {"lat": N(-90, 90), "lon": N(-180, 180)}),
     ("contact", {"name": S(24), "phone": S(20)}), "delivery_notes", ("postcode", "^[0-9]{5}$"),
     ("validated", False)),
    ("calendar_event", "a calendar event for a dentist appointment",
     {"title": S(40), "duration_minutes": I(5, 480), "visibility": E("public", "private")},
     {"location": S(30)}, ("reminder", {"minutes_before": I(0, 1440), "channel": E("email", "popup")}),
     ("attendee", {"name": S(24), "required": {"type": "boolean"}}), "recurrence",
     ("start", "^[0-2][0-9]:[0-5][0-9]$"), ("calendar", "work")),
    ("sensor_reading", "a temperature sensor reading from a server room",
     {"sensor": S(20), "celsius": N(-40, 125), "status": E("ok", "warning", "critical")},
     {"firmware": S(12)}, ("position", {"rack": I(1, 100), "slot": I(1, 48)}),
     ("sample", {"offset_s": I(0, 3600), "value": N(-40, 125)}), "alarm", ("device_id", "^S-[0-9]{3}$"),
     ("unit", "celsius")),
    ("expense", "an expense claim for a train ticket to Berlin",
     {"description": S(40), "amount": N(0, 20000), "category": E("travel", "meals", "lodging", "other")},
     {"project": S(24)}, ("approver", {"name": S(24), "level": I(1, 5)}),
     ("receipt", {"vendor": S(24), "amount": N(0, 20000)}), "reimbursed_on",
     ("claim_id", "^EXP-[0-9]{5}$"), ("currency", "EUR")),
    ("incident", "an incident report for a website outage",
     {"summary": S(40), "severity": I(1, 5), "state": E("open", "mitigated", "resolved")},
     {"root_cause": S(40)}, ("impact", {"users_affected": I(0, 10000000), "minutes": I(0, 10000)}),
     ("timeline_entry", {"minute": I(0, 10000), "note": S(40)}), "postmortem_url",
     ("id", "^INC-[0-9]{4}$"), ("public", False)),
    ("recipe", "a recipe for a simple tomato soup",
     {"name": S(30), "servings": I(1, 12), "difficulty": E("easy", "medium", "hard")},
     {"cuisine": S(20)}, ("timing", {"prep_minutes": I(0, 300), "cook_minutes": I(0, 600)}),
     ("ingredient", {"item": S(24), "grams": I(1, 5000)}), "wine_pairing", ("code", "^R[0-9]{3}$"),
     ("vegetarian", True)),
    ("flight", "a flight booking from Paris to Rome",
     {"airline": S(24), "seats": I(1, 9), "cabin": E("economy", "business", "first")},
     {"meal": S(20)}, ("route", {"from": S(3), "to": S(3)}),
     ("passenger", {"name": S(24), "age": I(0, 120)}), "loyalty_number",
     ("flight_number", "^[A-Z]{2}[0-9]{3,4}$"), ("booked", True)),
]


def obj(props, required=None, defs=None):
    o = {"type": "object", "properties": props, "required": list(required if required is not None else props),
         "additionalProperties": False}
    if defs:
        o["$defs"] = defs
    return o


def variants(rec):
    name, ask, flat, optional, (nname, nfields), (iname, ifields), nullable, (pname, prx), (cname, cval) = rec
    yield "flat", ["bounds", "enum"], obj(dict(flat))
    props = {**flat, **optional, nname: obj(nfields)}
    yield "nested", ["bounds", "enum", "optional", "nested"], obj(props, required=[*flat, nname])
    props = {**flat, nname: {"$ref": f"#/$defs/{nname}"},
             f"{iname}s": {"type": "array", "items": {"$ref": f"#/$defs/{iname}"}, "minItems": 1, "maxItems": 3}}
    yield "refs", ["bounds", "enum", "nested", "array", "$ref"], obj(
        props, defs={nname: obj(nfields), iname: obj(ifields)})
    props = {pname: {"type": "string", "pattern": prx}, **flat,
             nullable: {"anyOf": [{"type": "string", "maxLength": 24}, {"type": "null"}]},
             cname: {"const": cval},
             "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}
    yield "mixed", ["bounds", "enum", "pattern", "anyOf", "const", "array", "optional"], obj(
        props, required=[pname, *flat, nullable, cname])


def main():
    out = pathlib.Path(__file__).with_name("structured_set.jsonl")
    lines = []
    for rec in RECORDS:
        for variant, features, schema in variants(rec):
            lines.append(json.dumps({
                "id": f"{rec[0]}_{variant}", "features": features,
                "prompt": f"Create {rec[1]} as JSON.", "schema": schema}))
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} schemas -> {out}")


if __name__ == "__main__":
    main()
