"""GET /ui: the live page, ui.html (package data: plain HTML, CSS and JavaScript, no build step).

The page is served without a key; its API calls send the key the user types (kept in sessionStorage).
It is sent with a Content-Security-Policy allowing only its own inline script and style (by hash) and
requests to this origin, so text from the API is never run as code (the page also sets textContent only).
"""
import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.responses import HTMLResponse

PAGE = "ui.html"
INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


def _sha256(text):
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.cache
def page():
    """(html, headers): the page and the headers it is sent with."""
    html = resources.files(__package__).joinpath(PAGE).read_text(encoding="utf-8")
    hashes = {"script": [], "style": []}
    for tag, body in INLINE.findall(html):
        hashes[tag].append(_sha256(body))
    policy = (f"default-src 'none'; script-src {' '.join(hashes['script'])}; style-src {' '.join(hashes['style'])}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
                  "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


async def ui(request):
    html, headers = page()
    return HTMLResponse(html, headers=headers)
