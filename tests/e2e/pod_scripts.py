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
