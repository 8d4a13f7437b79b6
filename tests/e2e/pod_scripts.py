"""Python programs the end-to-end tests run inside pods (`python -c SCRIPT ARGS`)."""

CALLS = """
import sys, urllib.request, urllib.error
out = []
for _ in range(int(sys.argv[1])):
    try:
        with urllib.request.urlopen(sys.argv[2], timeout=5) as r:
            out.append(f"{r.status} {r.read().decode().strip()}")
    except urllib.error.HTTPError as e:
        out.append(f"{e.code} {e.headers.get('l5d-proxy-error', '')}")
print("\\n".join(out))
"""
"""GET argv[2] argv[1] times; one line per call: the status and the body, or for an
HTTP error the status and the proxy's l5d-proxy-error."""

GET = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""
"""Print the body of GET argv[1]."""

LOAD = """
import http.client, json, select, sys, time, uuid
host, interval, seconds, count, post_every = (sys.argv[1], float(sys.argv[2]),
                                              float(sys.argv[3]), int(sys.argv[4]),
                                              int(sys.argv[5]))
start = next_at = time.monotonic()
print(json.dumps({"start": start}), flush=True)
for n in range(count):
    if time.monotonic() - start > seconds or select.select([sys.stdin], [], [], 0)[0]:
        break
    method = "POST" if post_every and n % post_every == post_every - 1 else "GET"
    record = {"n": n, "t": round(time.monotonic() - start, 3), "method": method}
    body = None
    if method == "POST":
        record["id"] = body = uuid.uuid4().hex
    conn = http.client.HTTPConnection(host, 80, timeout=15)
    try:
        conn.request(method, "/", body=body)
        r = conn.getresponse()
        text = r.read().decode().split()
        record["status"] = r.status
        if r.status == 200:
            record["pod"] = text[2] if method == "GET" else text[3]
        else:
            record["error"] = r.headers.get("l5d-proxy-error", "")
    except OSError as e:
        record.update(status=0, error=repr(e))
    finally:
        conn.close()
    record["took"] = round(time.monotonic() - start - record["t"], 3)
    print(json.dumps(record), flush=True)
    # A fixed rate, without a burst to catch up after a slow request.
    next_at = max(next_at + interval, time.monotonic())
    time.sleep(max(0.0, next_at - time.monotonic()))
print(json.dumps({"done": round(time.monotonic() - start, 3)}), flush=True)
"""
"""Steady load on http://argv[1]/: one request every argv[2] seconds, every argv[5]-th a
POST carrying a unique id, until argv[3] seconds or argv[4] requests have passed or a
line arrives on stdin. Prints ``{"start": its monotonic clock}``, then one JSON line
per request as it ends: its number `n`, start `t` and duration `took` (s), method,
status, the answering `pod` or the proxy's `error`, and a POST's `id`; then
``{"done": seconds}``."""
