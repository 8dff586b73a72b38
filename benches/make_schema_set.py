"""Write benches/schema_set.jsonl: 70 JSON schemas written by hand for Hearth's structured-output
benchmark (internal-app records: tickets, invoices, inventory, HR, logs, calendars, sensors, ...),
each with a short chat prompt asking for such a record.

    python3 benches/make_schema_set.py

Each line is {"id", "features", "prompt", "schema"}; `features` is computed from the schema (nested
objects, arrays, enums, const, bounds, optional fields, $ref, anyOf, pattern, ...). Sized for
135M-270M models: every string has maxLength <= 40, an enum, const or pattern, and every array
maxItems <= 5; the script asserts this, and that only keywords llguidance implements are used
(no `format`: dates, times and emails are patterns). `example(schema)` builds a valid instance,
used with the `jsonschema` package to check that every schema is valid and satisfiable:

    .venv-test/bin/python -c "import sys; sys.path.insert(0, 'benches'); import make_schema_set as m; m.check()"
"""
import json
import pathlib
import re

# --- building blocks ------------------------------------------------------------------------------

SAMPLES = {}  # pattern -> a string it matches, for example()


def S(n, lo=0):
    return {"type": "string", "maxLength": n, **({"minLength": lo} if lo else {})}


def P(rx, sample):
    assert re.search(rx, sample), (rx, sample)
    SAMPLES[rx] = sample
    return {"type": "string", "pattern": rx}


def E(*v):
    return {"type": "string", "enum": list(v)}


def IE(*v):
    return {"type": "integer", "enum": list(v)}


def I(lo, hi):  # noqa: E743
    return {"type": "integer", "minimum": lo, "maximum": hi}


def N(lo, hi):
    return {"type": "number", "minimum": lo, "maximum": hi}


def NX(gt, hi):  # strictly greater than gt
    return {"type": "number", "exclusiveMinimum": gt, "maximum": hi}


def C(v):
    return {"const": v}


def A(item, hi, lo=0):
    return {"type": "array", "items": item, "maxItems": hi, **({"minItems": lo} if lo else {})}


def O(props, opt=(), closed=True):  # noqa: E743
    assert set(opt) <= set(props), opt
    o = {"type": "object", "properties": props, "required": [k for k in props if k not in opt]}
    return {**o, "additionalProperties": False} if closed else o


def R(name):
    return {"$ref": f"#/$defs/{name}"}


def NUL(s):
    return {"anyOf": [s, {"type": "null"}]}


def D(root, **defs):
    return {**root, "$defs": defs}


B = {"type": "boolean"}
DATE = P(r"^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$", "2024-03-15")
TIME = P(r"^([01][0-9]|2[0-3]):[0-5][0-9]$", "09:30")
STAMP = P(r"^20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9]Z$", "2024-03-15T09:30:00Z")
EMAIL = P(r"^[a-z0-9._]{1,20}@[a-z0-9-]{1,15}\.[a-z]{2,4}$", "ana.lopez@acme.com")
SEMVER = P(r"^[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{1,3}$", "2.14.0")
IPV4 = P(r"^([0-9]{1,3}\.){3}[0-9]{1,3}$", "10.0.12.7")
CIDR = P(r"^([0-9]{1,3}\.){3}[0-9]{1,3}/[0-9]{1,2}$", "10.0.0.0/16")
EMP = P(r"^E[0-9]{6}$", "E004217")
CURRENCY = E("EUR", "USD", "GBP", "CHF")
COUNTRY = E("DE", "FR", "NL", "GB", "US", "ES")
NAME = S(30, 1)
PERSON = O({"name": NAME, "email": EMAIL, "team": S(20)}, opt=("team",))
ADDRESS = O({"street": S(40, 1), "city": S(24, 1), "postal_code": P(r"^[0-9]{5}$", "10115"),
             "country": COUNTRY})
MONEY = O({"amount": NX(0, 1000000), "currency": CURRENCY})

# --- the set: (id, prompt, schema) ----------------------------------------------------------------

SET = [
    ("support_ticket", "Create a support ticket for a broken laptop screen as JSON.",
     O({"id": P(r"^TCK-[0-9]{5}$", "TCK-00042"), "title": S(40, 1),
        "priority": E("low", "medium", "high", "urgent"),
        "category": E("hardware", "software", "network", "access"),
        "reporter": O({"name": NAME, "email": EMAIL,
                       "department": E("sales", "finance", "engineering", "hr", "ops")}),
        "assignee": NUL(S(30)), "tags": A(S(15, 1), 3)}, opt=("assignee", "tags"))),
    ("ticket_thread", "Write a helpdesk ticket about a VPN outage with two comments, as JSON.",
     D(O({"id": P(r"^TCK-[0-9]{5}$", "TCK-00042"), "subject": S(40, 1), "reporter": R("person"),
          "status": E("open", "pending", "resolved", "closed"), "comments": A(R("comment"), 3, 1)}),
       person=PERSON, comment=O({"author": R("person"), "text": S(40, 1), "internal": B}))),
    ("bug_report", "File a bug report: the export button crashes the reports page. Answer in JSON.",
     O({"title": S(40, 1), "component": E("frontend", "backend", "api", "mobile"),
        "severity": IE(1, 2, 3, 4), "story_points": IE(1, 2, 3, 5, 8),
        "steps": A(S(40, 1), 5, 1), "expected": S(40), "actual": S(40),
        "environment": O({"browser": E("chrome", "firefox", "safari", "edge"), "version": SEMVER}),
        "regression": B}, opt=("story_points",))),
    ("invoice", "Create an invoice for 3 hours of consulting at 120 EUR per hour as JSON.",
     D(O({"number": P(r"^INV-20[0-9]{2}-[0-9]{6}$", "INV-2024-000123"), "type": C("invoice"),
          "issue_date": DATE, "billing_address": R("address"), "shipping_address": R("address"),
          "lines": A(R("line"), 3, 1), "vat_percent": IE(0, 7, 19, 20), "currency": CURRENCY,
          "notes": S(40)}, opt=("shipping_address", "notes")),
       address=ADDRESS,
       line=O({"description": S(40, 1), "quantity": I(1, 100), "unit_price": NX(0, 10000)}))),
    ("invoice_summary", "Summarize an unpaid invoice of 480 EUR due in 30 days as JSON.",
     O({"number": P(r"^INV-20[0-9]{2}-[0-9]{6}$", "INV-2024-000123"), "customer": S(40, 1),
        "total": NX(0, 1000000), "paid": B, "due_days": IE(14, 30, 60), "po_number": NUL(S(20))},
       opt=("po_number",))),
    ("credit_note", "Issue a credit note for a damaged item returned by a customer, as JSON.",
     O({"number": P(r"^CN-[0-9]{6}$", "CN-000017"),
        "invoice": P(r"^INV-20[0-9]{2}-[0-9]{6}$", "INV-2024-000123"),
        "reason": E("damaged", "wrong_item", "late_delivery", "goodwill"), "amount": MONEY,
        "restock": B})),
    ("inventory_item", "Give the inventory record for office chairs in the Berlin warehouse as JSON.",
     O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "CHR-0042"), "name": S(40, 1), "quantity": I(0, 100000),
        "reorder_level": I(0, 1000),
        "location": O({"warehouse": E("berlin", "madrid", "leeds"), "aisle": I(1, 40),
                       "bin": P(r"^[A-H][0-9]{2}$", "C07")}),
        "hazardous": B})),
    ("stock_transfer", "Move 20 monitors from Madrid to Leeds. Write the stock transfer as JSON.",
     D(O({"transfer_id": P(r"^TR-[0-9]{5}$", "TR-00311"), "from": R("site"), "to": R("site"),
          "items": A(O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "MON-0100"), "quantity": I(1, 1000)}), 5, 1),
          "urgent": B}),
       site=O({"warehouse": E("berlin", "madrid", "leeds"), "dock": I(1, 12)}))),
    ("stock_count", "Record a stock count of three products where one was short, as JSON.",
     O({"counted_by": NAME, "date": DATE,
        "lines": A(O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "KBD-0007"), "expected": I(0, 10000),
                      "counted": I(0, 10000)}), 5, 1),
        "discrepancy": B})),
    ("employee_record", "Create an HR record for a new software engineer as JSON.",
     D(O({"employee_id": EMP, "name": O({"first": S(20, 1), "last": S(20, 1)}),
          "department": E("engineering", "sales", "finance", "hr", "ops"), "grade": IE(1, 2, 3, 4, 5),
          "start_date": DATE, "manager_id": NUL(EMP), "salary": MONEY, "full_time": B,
          "home_address": R("address")}, opt=("home_address", "manager_id")),
       address=ADDRESS)),
    ("leave_request", "Request five days of vacation in August as JSON.",
     O({"employee_id": EMP, "kind": E("vacation", "sick", "parental", "unpaid"), "start": DATE,
        "end": DATE, "days": I(1, 30), "half_day": B, "approver": NUL(S(30))}, opt=("approver",))),
    ("timesheet", "Fill in a weekly timesheet for two projects as JSON.",
     O({"employee_id": EMP, "week": P(r"^20[0-9]{2}-W[0-5][0-9]$", "2024-W11"),
        "entries": A(O({"project": P(r"^PRJ-[0-9]{3}$", "PRJ-042"),
                        "day": E("mon", "tue", "wed", "thu", "fri"), "hours": NX(0, 12)}), 5, 1),
        "submitted": B})),
    ("performance_review", "Write a yearly performance review for a support agent as JSON.",
     D(O({"employee": R("person"), "reviewer": R("person"), "year": I(2020, 2030),
          "rating": IE(1, 2, 3, 4, 5),
          "goals": A(O({"title": S(40, 1), "status": E("met", "partly_met", "missed"),
                        "weight": I(0, 100)}), 4, 1),
          "promotion": B}),
       person=PERSON)),
    ("job_posting", "Draft a job posting for a data analyst as JSON.",
     O({"title": S(40, 1), "department": E("engineering", "sales", "finance", "hr", "ops"),
        "mode": E("onsite", "hybrid", "remote"), "city": S(24),
        "salary_range": O({"min": I(20000, 300000), "max": I(20000, 300000), "currency": CURRENCY}),
        "skills": A(S(20, 1), 5, 1), "visa_sponsorship": B}, opt=("city",))),
    ("interview_feedback", "Give interview feedback for a backend candidate as JSON.",
     O({"candidate": NAME, "stage": E("screen", "technical", "onsite", "final"),
        "scores": O({"technical": IE(1, 2, 3, 4, 5), "communication": IE(1, 2, 3, 4, 5),
                     "teamwork": IE(1, 2, 3, 4, 5)}),
        "recommendation": E("strong_hire", "hire", "no_hire"), "notes": S(40)}, opt=("notes",))),
    ("meeting_notes", "Write notes for a weekly team sync meeting as JSON.",
     O({"title": S(40, 1), "date": DATE, "attendees": A(NAME, 5, 1), "decisions": A(S(40, 1), 3),
        "action_items": A(O({"owner": NAME, "task": S(40, 1), "due": DATE}, opt=("due",)), 3)})),
    ("meeting_agenda", "Prepare the agenda for a quarterly planning meeting as JSON.",
     D(O({"title": S(40, 1), "chair": R("person"), "date": DATE, "start": TIME,
          "items": A(R("agenda_item"), 3, 1)}),
       person=PERSON,
       agenda_item=O({"topic": S(40, 1), "presenter": R("person"), "minutes": I(5, 60)}))),
    ("log_event", "Produce a structured log event for a failed login request as JSON.",
     O({"timestamp": STAMP, "level": E("debug", "info", "warn", "error"), "service": S(20, 1),
        "message": S(40, 1), "trace_id": P(r"^[0-9a-f]{16}$", "4bf92f3577b34da6"),
        "http": O({"method": E("GET", "POST", "PUT", "DELETE"),
                   "status": IE(200, 201, 204, 400, 401, 403, 404, 500, 503),
                   "latency_ms": NX(0, 60000)})}, opt=("http", "trace_id"))),
    ("audit_log", "Write an audit log entry for an admin deleting a user account, as JSON.",
     O({"timestamp": STAMP, "actor": O({"user_id": EMP, "role": E("admin", "manager", "user")}),
        "action": E("create", "update", "delete", "login", "export"),
        "resource": O({"type": E("user", "invoice", "report", "project"), "id": S(20, 1)}),
        "success": B, "ip": IPV4})),
    ("error_report", "Report a NullPointerException in the billing service as JSON.",
     O({"service": S(20, 1), "count": I(1, 100000), "first_seen": STAMP,
        "exception": O({"type": S(40, 1), "message": S(40),
                        "frames": A(O({"file": S(30, 1), "line": I(1, 100000), "function": S(30, 1)}),
                                    5, 1)})})),
    ("metric_sample", "Give a metric sample for API request latency as JSON.",
     O({"name": P(r"^[a-z][a-z_]{2,29}$", "api_latency_ms"), "value": N(-1000000, 1000000),
        "unit": E("ms", "s", "bytes", "count", "percent"),
        "labels": A(O({"key": S(15, 1), "value": S(20)}), 4), "timestamp": STAMP})),
    ("product_entry", "Add a product catalog entry for a wireless keyboard as JSON.",
     D(O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "KBD-0007"), "name": S(40, 1), "price": R("money"),
          "categories": A(E("accessories", "computers", "audio", "office", "networking"), 3, 1),
          "dimensions": O({"width_cm": NX(0, 500), "depth_cm": NX(0, 500), "weight_kg": NX(0, 100)}),
          "in_stock": B,
          "variants": A(O({"color": E("black", "white", "grey"), "layout": E("us", "de", "uk"),
                           "stock": I(0, 10000)}), 4)}, opt=("variants",)),
       money=MONEY)),
    ("product_review", "Write a customer review of a USB-C dock as JSON.",
     O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "DCK-0300"), "rating": IE(1, 2, 3, 4, 5), "title": S(40, 1),
        "pros": A(S(30, 1), 3), "cons": A(S(30, 1), 3), "verified_purchase": B})),
    ("price_list", "Give a price list for three office supplies as JSON.",
     O({"currency": C("EUR"), "valid_from": DATE,
        "prices": A(O({"sku": P(r"^[A-Z]{3}-[0-9]{4}$", "PEN-0001"), "price": NX(0, 10000),
                       "min_quantity": I(1, 1000)}, opt=("min_quantity",)), 5, 1)})),
    ("shipping_address", "Give the shipping address of a customer in Paris as JSON.",
     O({"recipient": NAME, "street": S(40, 1), "city": S(24, 1), "postal_code": P(r"^[0-9]{5}$", "75011"),
        "country": COUNTRY, "phone": NUL(P(r"^\+[0-9]{8,14}$", "+33142680000"))}, opt=("phone",))),
    ("contact_card", "Create an address book contact for a supplier's account manager as JSON.",
     D(O({"name": NAME, "company": S(30), "email": EMAIL, "primary_address": R("address"),
          "other_addresses": A(R("address"), 2), "favorite": B}, opt=("company", "other_addresses")),
       address=ADDRESS)),
    ("calendar_event", "Schedule a one-hour design review next Tuesday as a calendar event in JSON.",
     O({"title": S(40, 1), "date": DATE, "start": TIME, "end": TIME, "location": NUL(S(30)),
        "attendees": A(O({"email": EMAIL, "response": E("accepted", "declined", "tentative")}), 5),
        "recurrence": E("none", "daily", "weekly", "monthly"), "reminder_minutes": IE(0, 5, 10, 15, 30, 60)})),
    ("room_booking", "Book a meeting room for eight people tomorrow afternoon, as JSON.",
     O({"room": P(r"^[A-D][0-9]-[0-9]{2}$", "B2-14"), "date": DATE, "slot": O({"start": TIME, "end": TIME}),
        "seats": I(1, 40), "equipment": A(E("projector", "whiteboard", "video", "phone"), 4),
        "booked_by": EMAIL})),
    ("on_call_rota", "Plan a two-week on-call rota for the platform team as JSON.",
     D(O({"team": S(30, 1),
          "weeks": A(O({"week": P(r"^20[0-9]{2}-W[0-5][0-9]$", "2024-W11"), "primary": R("person"),
                        "secondary": R("person")}), 2, 1)}),
       person=PERSON)),
    ("sensor_reading", "Report a temperature reading from the server room sensor as JSON.",
     O({"sensor_id": P(r"^SN-[0-9]{6}$", "SN-000731"), "kind": E("temperature", "humidity", "pressure", "co2"),
        "value": N(-50, 5000), "unit": E("celsius", "percent", "hpa", "ppm"), "battery_pct": I(0, 100),
        "location": O({"building": S(20, 1), "floor": I(-2, 20), "room": S(10, 1)}), "ok": B})),
    ("sensor_batch", "Give three readings from a greenhouse climate sensor as JSON.",
     D(O({"device": O({"id": P(r"^SN-[0-9]{6}$", "SN-000731"), "firmware": SEMVER}),
          "readings": A(R("reading"), 5, 1)}),
       reading=O({"time": STAMP, "temperature": N(-40, 85), "humidity": N(0, 100)}))),
    ("machine_alarm", "Raise an alarm for an overheating press on production line 2, as JSON.",
     O({"code": P(r"^ALM-[0-9]{3}$", "ALM-112"), "machine": O({"line": IE(1, 2, 3), "station": I(1, 20)}),
        "severity": IE(1, 2, 3, 4), "threshold": O({"limit": N(-100, 1000), "exceeded_by": NX(0, 1000)}),
        "acknowledged": B})),
    ("expense_report", "Submit an expense report for a two-day trip to Munich as JSON.",
     O({"employee_id": EMP, "trip": S(40, 1),
        "expenses": A(O({"date": DATE, "category": E("travel", "hotel", "meals", "taxi", "other"),
                         "amount": NX(0, 5000), "receipt": B}), 5, 1),
        "total": NX(0, 25000), "currency": CURRENCY})),
    ("purchase_order", "Create a purchase order for 10 laptops from a supplier as JSON.",
     D(O({"po": P(r"^PO-[0-9]{6}$", "PO-004512"), "vendor": R("organization"), "ship_to": R("address"),
          "lines": A(O({"item": S(40, 1), "quantity": I(1, 1000), "unit_price": NX(0, 100000)}), 5, 1),
          "approved": B}),
       address=ADDRESS,
       organization=O({"name": S(40, 1), "vat_id": P(r"^[A-Z]{2}[0-9]{8,10}$", "DE123456789"),
                       "address": R("address")}))),
    ("vendor_record", "Create a vendor master record for a cleaning services company as JSON.",
     D(O({"name": S(40, 1), "vat_id": P(r"^[A-Z]{2}[0-9]{8,10}$", "NL0012345678"),
          "contacts": A(R("person"), 3, 1), "payment_terms_days": IE(15, 30, 45, 60),
          "rating": N(0, 5), "preferred": B}),
       person=PERSON)),
    ("contract", "Summarize a one-year software license contract between two companies as JSON.",
     D(O({"title": S(40, 1), "parties": A(R("party"), 2, 2), "start": DATE, "end": DATE,
          "value": MONEY, "auto_renew": B, "notice_days": I(0, 180),
          "status": E("draft", "signed", "expired", "terminated")}),
       party=O({"name": S(40, 1), "role": E("customer", "supplier"), "signatory": NAME}))),
    ("shipment", "Create a shipment record for two parcels sent from Berlin to Lyon, as JSON.",
     D(O({"tracking": P(r"^[A-Z]{2}[0-9]{9}[A-Z]{2}$", "JJ123456789DE"),
          "carrier": E("dhl", "ups", "fedex", "dpd"), "from": R("address"), "to": R("address"),
          "parcels": A(O({"weight_kg": NX(0, 70),
                          "dims_cm": {"type": "array", "prefixItems": [I(1, 200), I(1, 200), I(1, 200)],
                                      "items": False, "minItems": 3, "maxItems": 3}}), 5, 1),
          "status": E("created", "in_transit", "delivered", "returned")}),
       address=ADDRESS)),
    ("delivery_route", "Plan a delivery route with three stops for one van, as JSON.",
     D(O({"driver": NAME, "vehicle": P(r"^[A-Z]{1,3}-[A-Z]{1,2}-[0-9]{1,4}$", "B-HR-2041"),
          "stops": A(O({"sequence": I(1, 20), "address": R("address"),
                        "window": O({"from": TIME, "to": TIME})}), 3, 1)}),
       address=ADDRESS)),
    ("fleet_vehicle", "Add a company car to the vehicle fleet register as JSON.",
     O({"plate": P(r"^[A-Z]{1,3}-[A-Z]{1,2}-[0-9]{1,4}$", "M-AB-123"), "make": S(20, 1), "model": S(20, 1),
        "fuel": E("diesel", "petrol", "electric", "hybrid"), "mileage_km": I(0, 1000000),
        "next_service": DATE, "assigned_to": NUL(S(30))})),
    ("fuel_log", "Log three fuel purchases for a delivery van as JSON.",
     O({"plate": P(r"^[A-Z]{1,3}-[A-Z]{1,2}-[0-9]{1,4}$", "HH-XY-77"),
        "entries": A(O({"date": DATE, "liters": NX(0, 200), "price_per_liter": NX(0, 5), "full_tank": B}),
                     5, 1)})),
    ("work_order", "Open a maintenance work order for a leaking air conditioner, as JSON.",
     O({"id": P(r"^WO-[0-9]{5}$", "WO-01234"),
        "asset": O({"tag": P(r"^AS-[0-9]{5}$", "AS-00981"), "type": E("hvac", "electrical", "plumbing", "it"),
                    "site": O({"name": S(30, 1), "building": S(10, 1), "floor": I(-2, 20)})}),
        "priority": IE(1, 2, 3), "tasks": A(S(40, 1), 5, 1),
        "parts": A(O({"part_no": P(r"^[A-Z]{2}[0-9]{4}$", "FL2210"), "quantity": I(1, 50)}), 5),
        "estimated_hours": NX(0, 100)}, opt=("parts",))),
    ("safety_inspection", "Record a fire safety inspection of the warehouse as JSON.",
     D(O({"site": S(30, 1), "date": DATE, "inspector": R("person"),
          "checks": A(O({"item": S(40, 1), "result": E("pass", "fail", "na"), "note": NUL(S(40))}), 5, 1),
          "score": I(0, 100), "passed": B}),
       person=PERSON)),
    ("visitor_log", "Log a visitor from a partner company arriving at reception, as JSON.",
     O({"badge": P(r"^V[0-9]{4}$", "V0412"),
        "visitor": O({"name": NAME, "company": S(30, 1), "email": EMAIL}, opt=("email",)),
        "host_id": EMP, "arrival": TIME, "departure": NUL(TIME), "nda_signed": B})),
    ("badge_event", "Write a badge access event for a denied door entry at night, as JSON.",
     O({"badge": P(r"^B[0-9]{6}$", "B004711"), "door": P(r"^[A-D][0-9]-D[0-9]{2}$", "A1-D03"),
        "time": STAMP, "granted": B, "reason": NUL(E("expired", "no_permission", "after_hours"))})),
    ("kb_article", "Write a knowledge base article on resetting a password, as JSON.",
     O({"id": P(r"^KB-[0-9]{4}$", "KB-0105"), "title": S(40, 1),
        "product": E("email", "vpn", "laptop", "phone", "erp"), "audience": E("staff", "it", "managers"),
        "steps": A(S(40, 1), 5, 1), "related": A(P(r"^KB-[0-9]{4}$", "KB-0042"), 3), "schema_version": C(1)})),
    ("project_milestone", "Describe the beta launch milestone of a mobile app project as JSON.",
     D(O({"project": P(r"^PRJ-[0-9]{3}$", "PRJ-042"),
          "milestone": O({"name": S(40, 1), "due": DATE, "status": E("planned", "at_risk", "done")}),
          "deliverables": A(O({"name": S(40, 1), "done": B}), 5), "owner": R("person"),
          "budget": O({"planned": NX(0, 10000000), "spent": N(0, 10000000)})}),
       person=PERSON)),
    ("risk_entry", "Add a risk register entry about a key supplier going bankrupt, as JSON.",
     O({"id": P(r"^RSK-[0-9]{3}$", "RSK-017"), "description": S(40, 1), "likelihood": IE(1, 2, 3, 4, 5),
        "impact": IE(1, 2, 3, 4, 5), "owner": NAME, "mitigations": A(S(40, 1), 3),
        "status": E("open", "mitigated", "accepted", "closed")})),
    ("okr", "Write a quarterly OKR for the customer support team as JSON.",
     O({"team": S(30, 1), "year": I(2024, 2030), "quarter": IE(1, 2, 3, 4), "objective": S(40, 1),
        "key_results": A(O({"description": S(40, 1), "target": N(0, 1000000), "current": N(0, 1000000),
                            "unit": E("percent", "count", "hours", "eur")}), 4, 1)})),
    ("budget_line", "Give a budget line for the marketing travel cost center as JSON.",
     O({"cost_center": P(r"^CC-[0-9]{4}$", "CC-4100"), "category": E("travel", "software", "hardware", "events"),
        "planned": N(0, 1000000), "actual": N(0, 1000000),
        "variance_pct": {"type": "number", "exclusiveMinimum": -100, "exclusiveMaximum": 1000},
        "approved": B})),
    ("travel_booking", "Book a business trip from Frankfurt to London with a hotel, as JSON.",
     D(O({"traveler": R("person"), "flights": A(R("flight"), 4, 1),
          "hotel": NUL(O({"name": S(30, 1), "nights": I(1, 14)})), "total": MONEY}),
       person=PERSON,
       flight=O({"number": P(r"^[A-Z]{2}[0-9]{2,4}$", "LH920"), "from": P(r"^[A-Z]{3}$", "FRA"),
                 "to": P(r"^[A-Z]{3}$", "LHR"), "date": DATE, "cabin": E("economy", "premium", "business")}))),
    ("meal_order", "Order lunch for the team from the canteen as JSON.",
     O({"kind": C("lunch"), "office": E("berlin", "madrid", "leeds"), "delivery_time": TIME,
        "items": A(O({"dish": E("pasta", "salad", "curry", "soup", "sandwich"), "quantity": I(1, 10),
                      "vegetarian": B}), 5, 1)})),
    ("library_loan", "Record a loan of a management book from the office library, as JSON.",
     O({"book": O({"isbn": P(r"^97[89][0-9]{10}$", "9780134757599"), "title": S(40, 1), "author": S(30, 1)}),
        "borrower_id": EMP, "due": DATE, "renewals": IE(0, 1, 2), "returned": B})),
    ("payment", "Record a card payment of 59.90 EUR for an order as JSON.",
     O({"payment_id": P(r"^PAY-[0-9]{8}$", "PAY-00012345"), "amount": NX(0, 100000), "currency": CURRENCY,
        "method": {"anyOf": [
            O({"type": C("card"), "brand": E("visa", "mastercard", "amex"), "last4": P(r"^[0-9]{4}$", "4242")}),
            O({"type": C("bank_transfer"),
               "iban": P(r"^[A-Z]{2}[0-9]{2}[A-Z0-9]{10,20}$", "DE89370400440532013000")})]}})),
    ("refund", "Approve a partial refund for a late delivery as JSON.",
     O({"payment_id": P(r"^PAY-[0-9]{8}$", "PAY-00012345"), "amount": NX(0, 100000),
        "reason": E("late_delivery", "damaged", "duplicate", "cancelled"), "partial": B,
        "approved_by": NUL(S(30))})),
    ("subscription", "Create a yearly subscription for a team of 12 users as JSON.",
     O({"customer_id": P(r"^C[0-9]{7}$", "C0001234"), "plan": E("free", "team", "business", "enterprise"),
        "seats": I(1, 500), "billing": E("monthly", "yearly"),
        "addons": A(E("sso", "audit_log", "priority_support", "extra_storage"), 4),
        "trial_ends": NUL(DATE), "price": MONEY}, opt=("addons", "trial_ends"))),
    ("coupon", "Create a 15 percent discount coupon for new customers, as JSON.",
     O({"code": P(r"^[A-Z0-9]{6,10}$", "WELCOME15"),
        "discount": {"anyOf": [O({"kind": C("percent"), "value": I(1, 100)}),
                               O({"kind": C("fixed"), "amount": NX(0, 500)})]},
        "expires": DATE, "max_uses": I(1, 10000), "stackable": B})),
    ("customer_profile", "Create a customer profile with billing and shipping addresses as JSON.",
     D(O({"customer_id": P(r"^C[0-9]{7}$", "C0001234"),
          "name": O({"first": S(20, 1), "last": S(20, 1)}),
          "contact": O({"email": EMAIL, "phone": P(r"^\+[0-9]{8,14}$", "+4930123456")}, opt=("phone",)),
          "addresses": O({"billing": R("address"), "shipping": R("address")}),
          "segment": E("consumer", "smb", "enterprise"), "lifetime_value": N(0, 10000000),
          "marketing_opt_in": B}),
       address=ADDRESS)),
    ("loyalty_account", "Show a loyalty account with its recent points history as JSON.",
     O({"member": P(r"^M[0-9]{8}$", "M00451234"), "tier": E("bronze", "silver", "gold", "platinum"),
        "points": I(0, 1000000),
        "history": A(O({"date": DATE, "delta": I(-5000, 5000), "reason": E("purchase", "redeem", "bonus")}), 5)},
       closed=False)),
    ("deploy_record", "Record a production deployment of the payments service as JSON.",
     O({"service": S(30, 1), "version": SEMVER, "environment": E("dev", "staging", "prod"),
        "commit": P(r"^[0-9a-f]{7}$", "3f9c2ab"), "started": STAMP, "duration_s": I(1, 7200), "success": B,
        "rollback_of": NUL(SEMVER)}, opt=("rollback_of",))),
    ("feature_flag", "Define a feature flag for a new checkout page rolled out to 10 percent, as JSON.",
     O({"key": P(r"^[a-z][a-z0-9_]{2,30}$", "new_checkout"), "enabled": B, "rollout_pct": I(0, 100),
        "environments": A(E("dev", "staging", "prod"), 3, 1),
        "rules": A(O({"attribute": E("country", "plan", "user_id"), "operator": E("eq", "in"),
                      "values": A(S(20, 1), 3, 1)}), 3)}, opt=("rules",))),
    ("firewall_rule", "Write a firewall rule allowing HTTPS from the office network, as JSON.",
     O({"name": S(30, 1), "action": E("allow", "deny"), "protocol": E("tcp", "udp", "icmp"),
        "port": NUL(I(1, 65535)), "sources": A(CIDR, 4, 1), "priority": I(100, 4096), "logging": B})),
    ("vm_instance", "Describe a virtual machine for a staging database as JSON.",
     O({"name": P(r"^[a-z][a-z0-9-]{2,30}$", "staging-db-1"), "cpus": IE(1, 2, 4, 8, 16),
        "memory_gb": IE(2, 4, 8, 16, 32, 64),
        "disks": A(O({"size_gb": I(10, 2048), "type": E("ssd", "hdd")}), 4, 1),
        "network": O({"vpc": S(20, 1), "subnet": O({"cidr": CIDR, "zone": E("eu-1a", "eu-1b", "eu-1c")})}),
        "public_ip": NUL(IPV4)}, opt=("public_ip",))),
    ("backup_job", "Describe the nightly backup job for the file server as JSON.",
     O({"job": P(r"^BKP-[0-9]{3}$", "BKP-007"), "source": S(40, 1),
        "schedule": O({"frequency": E("hourly", "daily", "weekly"), "hour": I(0, 23)}),
        "retention_days": I(1, 365), "encrypted": B,
        "last_run": NUL(O({"status": E("ok", "failed", "partial"), "finished": STAMP, "size_gb": N(0, 100000)}))})),
    ("dns_record", "Add a DNS record pointing the intranet host to its server, as JSON.",
     O({"zone": P(r"^[a-z0-9-]{1,20}\.[a-z]{2,6}$", "acme.com"), "name": S(30, 1),
        "type": E("A", "AAAA", "CNAME", "MX", "TXT"), "value": S(40, 1), "ttl": IE(60, 300, 3600, 86400),
        "priority": NUL(I(0, 100))}, opt=("priority",), closed=False)),
    ("survey_response", "Fill in an employee engagement survey response as JSON.",
     O({"survey": C("engagement-2024"), "team": E("engineering", "sales", "finance", "hr", "ops"),
        "answers": O({"satisfaction": IE(1, 2, 3, 4, 5), "recommend": I(0, 10), "comment": NUL(S(40))}),
        "topics": A(E("workload", "pay", "growth", "tools", "culture"), 3)}, closed=False)),
    ("training_course", "Create a security awareness training course with two sessions, as JSON.",
     D(O({"course": P(r"^TRN-[0-9]{3}$", "TRN-101"), "title": S(40, 1),
          "level": E("beginner", "intermediate", "advanced"), "sessions": A(R("session"), 4, 1),
          "mandatory": B, "prerequisite": NUL(P(r"^TRN-[0-9]{3}$", "TRN-100"))}),
       person=PERSON,
       session=O({"date": DATE, "hours": NX(0, 8), "trainer": R("person")}))),
    ("incident_report", "Write an incident report for a 40-minute checkout outage, as JSON.",
     D(O({"id": P(r"^INC-[0-9]{5}$", "INC-00321"), "severity": IE(1, 2, 3, 4),
          "status": E("investigating", "mitigated", "resolved"), "commander": R("person"),
          "timeline": A(O({"time": STAMP, "event": S(40, 1)}), 3, 1), "affected": A(S(20, 1), 4, 1),
          "postmortem": O({"root_cause": S(40, 1), "actions": A(R("action"), 3)})}, opt=("postmortem",)),
       person=PERSON, action=O({"owner": R("person"), "task": S(40, 1)}))),
    ("release_notes", "Write release notes for version 3.2.0 of the mobile app as JSON.",
     O({"version": SEMVER, "date": DATE,
        "changes": A(O({"type": E("feature", "fix", "breaking"), "summary": S(40, 1),
                        "issue": P(r"^#[0-9]{1,5}$", "#1234")}, opt=("issue",)), 5, 1)})),
    ("db_migration", "Describe a database migration that adds an index to the orders table, as JSON.",
     O({"id": P(r"^[0-9]{4}_[a-z_]{3,30}$", "0042_orders_index"), "table": S(30, 1),
        "operations": A(O({"op": E("add_column", "drop_column", "add_index"), "column": S(30, 1),
                           "type": E("int", "text", "bool", "timestamp")}, opt=("type",)), 4, 1),
        "reversible": B})),
    ("api_key", "Issue a read-only API key for the reporting tool, as JSON.",
     O({"key_id": P(r"^ak_[a-z0-9]{8}$", "ak_7f3k9x2m"), "owner": EMAIL,
        "scopes": A(E("read", "write", "admin", "billing"), 4, 1), "expires_in_days": IE(30, 90, 365),
        "ip_allowlist": A(IPV4, 3)}, opt=("ip_allowlist",))),
]

# --- checks and features --------------------------------------------------------------------------

ALLOWED = {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
           "maxItems", "enum", "const", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
           "minLength", "maxLength", "pattern", "anyOf", "$ref", "$defs"}


def resolve(node, defs):
    while "$ref" in node:
        node = defs[node["$ref"].split("/")[-1]]
    return node


def subschemas(node):
    """The schema's direct subschemas (not following $ref, not $defs)."""
    if not isinstance(node, dict):
        return []
    subs = list(node.get("properties", {}).values()) + node.get("anyOf", []) + node.get("prefixItems", [])
    if isinstance(node.get("items"), dict):
        subs.append(node["items"])
    return subs


def walk(node):
    yield node
    for s in subschemas(node):
        yield from walk(s)


def depth(node, defs):
    """Objects nested in objects through properties (directly, via $ref or anyOf)."""
    node = resolve(node, defs)
    if "anyOf" in node:
        return max(depth(s, defs) for s in node["anyOf"])
    if node.get("type") != "object":
        return 0
    return 1 + max([depth(s, defs) for s in node["properties"].values()], default=0)


def features(schema):
    defs = schema.get("$defs", {})
    nodes = [n for root in [schema, *defs.values()] for n in walk(root)]
    refs = [n["$ref"].split("/")[-1] for n in nodes if "$ref" in n]
    f = set()
    for n in nodes:
        assert set(n) <= ALLOWED, set(n) - ALLOWED
        t = n.get("type")
        if t == "string" and "enum" not in n:
            assert "pattern" in n or n.get("maxLength", 99) <= 40, n
        if t == "object":
            f.add("additionalProperties_false" if n.get("additionalProperties") is False else "open_object")
            if set(n["properties"]) - set(n["required"]):
                f.add("optional")
        if t == "array":
            assert n["maxItems"] <= 5, n
            if "prefixItems" in n:
                f.add("tuple")
            else:
                f.add("array_of_objects" if resolve(n["items"], defs).get("type") == "object"
                      else "array_of_scalars")
            if n.get("minItems"):
                f.add("minItems")
        if "enum" in n:
            f.add("integer_enum" if t == "integer" else "string_enum")
        if "const" in n:
            f.add("const")
        if t in ("integer", "number") and ("minimum" in n or "maximum" in n or "exclusiveMinimum" in n):
            f.add(f"{t}_bounds")
        if "exclusiveMinimum" in n or "exclusiveMaximum" in n:
            f.add("exclusive_bounds")
        if "pattern" in n:
            f.add("pattern")
        if t == "boolean":
            f.add("boolean")
        if "anyOf" in n:
            f.add("anyOf_null" if {"type": "null"} in n["anyOf"] else "anyOf_union")
    d = depth(schema, defs)
    if d >= 2:
        f.add("nested")
    if d >= 3:
        f.add("nested_3")
    if refs:
        f.add("ref")
        assert set(refs) <= set(defs) and set(defs) <= set(refs), (refs, list(defs))
    if any(refs.count(r) > 1 for r in refs):
        f.add("ref_twice")
    if any("$ref" in n for root in defs.values() for n in walk(root)):
        f.add("nested_ref")
    return sorted(f)


def example(node, defs=None):
    """A valid instance: every property present, arrays at max(minItems, 1), numbers inside bounds."""
    defs = node.get("$defs", {}) if defs is None else defs
    node = resolve(node, defs)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    if "anyOf" in node:
        return example(node["anyOf"][0], defs)
    t = node["type"]
    if t == "object":
        return {k: example(v, defs) for k, v in node["properties"].items()}
    if t == "array":
        if "prefixItems" in node:
            return [example(s, defs) for s in node["prefixItems"]]
        return [example(node["items"], defs)] * max(node.get("minItems", 0), 1)
    if t == "string":
        return SAMPLES[node["pattern"]] if "pattern" in node else "x" * max(node.get("minLength", 0), 1)
    if t == "boolean":
        return True
    lo = node.get("minimum", node.get("exclusiveMinimum"))
    hi = node.get("maximum", node.get("exclusiveMaximum"))
    return (lo + hi) // 2 if t == "integer" else (lo + hi) / 2


OUT = pathlib.Path(__file__).with_name("schema_set.jsonl")


def check():
    """Every schema is valid Draft 2020-12 and its example validates (needs `jsonschema`)."""
    import jsonschema
    for item in map(json.loads, open(OUT)):
        jsonschema.Draft202012Validator.check_schema(item["schema"])
        jsonschema.Draft202012Validator(item["schema"]).validate(example(item["schema"]))
    print(f"{OUT.name}: all schemas valid and satisfiable")


def main():
    ids = [i for i, _, _ in SET]
    assert len(set(ids)) == len(ids), "duplicate id"
    counts = {}
    with open(OUT, "w") as f:
        for id_, prompt, schema in SET:
            item = {"id": id_, "features": features(schema), "prompt": prompt, "schema": schema}
            for k in item["features"]:
                counts[k] = counts.get(k, 0) + 1
            f.write(json.dumps(item) + "\n")
    print(f"{OUT.name}: {len(SET)} schemas")
    for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {k}: {n}")


if __name__ == "__main__":
    main()
