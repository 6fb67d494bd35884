"""Schemathesis hooks for the node's API contract test (tests/api_contract.rs).

Two checks beyond schemathesis' own:
- rejected_write_has_no_effect: a write answered 4xx or 5xx leaves stock and sales as they were;
- error_body_shape: every error is JSON {"error": str, "message": str}.
Each request sent is also logged (method, path, status) to $STALLMESH_CONTRACT_LOG, so the Rust
test counts what was really sent.

Snapshots are per thread and the node is shared: run with --workers 1, or another worker's write
lands between a snapshot and its re-check.
"""
import json
import os
import threading
from urllib.parse import urlsplit

import requests
import schemathesis

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
STATE_PATHS = ("/api/v1/stock", "/api/v1/sales?limit=10000")
_local = threading.local()
_session = requests.Session()  # these reads do not pass through schemathesis
LOG = os.environ.get("STALLMESH_CONTRACT_LOG")


def _origin(case):
    u = urlsplit(case.operation.schema.get_base_url())
    return f"{u.scheme}://{u.netloc}"


def _snapshot(case):
    state = {}
    for path in STATE_PATHS:
        r = _session.get(_origin(case) + path, timeout=10)
        r.raise_for_status()
        state[path] = r.json()
    return state


def _whole_floats_to_ints(v):
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    if isinstance(v, list):
        return [_whole_floats_to_ints(x) for x in v]
    if isinstance(v, dict):
        return {k: _whole_floats_to_ints(x) for k, x in v.items()}
    return v


@schemathesis.hook
def before_call(context, case, kwargs):
    # Schemathesis writes 3.0 for an integer; serde refuses it (422). Valid data is made to look
    # like what a till sends, so that the linked create -> restock -> sell flows get through.
    if isinstance(case.body, (dict, list)):
        case.body = _whole_floats_to_ints(case.body)
    _local.before = (case.id, _snapshot(case)) if case.method.upper() in WRITE_METHODS else None


@schemathesis.hook
def after_call(context, case, response):
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{case.method.upper()} {case.path} {response.status_code}\n")


@schemathesis.check
def rejected_write_has_no_effect(ctx, response, case):
    if case.method.upper() not in WRITE_METHODS or response.status_code < 400:
        return None
    before = getattr(_local, "before", None)
    if before is None or before[0] != case.id:
        return None
    after = _snapshot(case)
    for path in STATE_PATHS:
        if before[1][path] != after[path]:
            raise AssertionError(
                f"{case.method} {case.formatted_path} -> {response.status_code} but {path} changed:\n"
                f"before: {json.dumps(before[1][path])[:500]}\nafter:  {json.dumps(after[path])[:500]}"
            )
    return None


@schemathesis.check
def error_body_shape(ctx, response, case):
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:200]!r}")
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not isinstance(body.get("message"), str):
        raise AssertionError(f"{response.status_code} body lacks string error/message: {response.content[:200]!r}")
    return None
