"""ASGI middleware: the Swagger UI page (`/`) and `/docs.json` describe this service, not
BentoML: our title, description, version and tag descriptions (BentoML drops the mounted
FastAPI app's), and a bearer-key security scheme, so the UI's *Authorize* button sends the API
key with every request it makes."""
from __future__ import annotations

import html
import json

_PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css" />
    <link rel="stylesheet" type="text/css" href="./static_content/index.css" />
    <style>
      /* BentoML's index.css hides the info title (its stock description carries a heading) */
      .swagger-ui .info .main .title, .swagger-ui .info .main .title span {{ visibility: visible; position: static; }}
    </style>
    <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32" />
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""


class DocsPage:
    def __init__(self, app, title: str, description: str, version: str | None = None,
                 tags: list[dict] | tuple = ()):
        self.app, self.title, self.description = app, title, description
        self.version, self.tags = version, list(tags)
        self.page = _PAGE.format(title=html.escape(title)).encode()
        self.spec: bytes | None = None  # /docs.json as rewritten, once: the spec does not change

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        if scope["path"] == "/":
            return await _respond(send, 200, "text/html; charset=utf-8", self.page)
        if scope["path"] != "/docs.json":
            return await self.app(scope, receive, send)
        if self.spec is not None:
            return await _respond(send, 200, "application/json", self.spec)
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            spec = json.loads(body)
            info = spec.setdefault("info", {})
            info["title"], info["description"] = self.title, self.description
            info.pop("contact", None)
            if self.version or info.get("version") in (None, "None"):
                info["version"] = self.version or "dev"
            tags = {t["name"]: t for t in spec.get("tags", [])}
            tags.update({t["name"]: t for t in self.tags})  # ours describe BentoML's too
            spec["tags"] = list(tags.values())
            schemes = spec.setdefault("components", {}).setdefault("securitySchemes", {})
            schemes["bearer"] = {"type": "http", "scheme": "bearer",
                                 "description": "The API key, when the server has one."}
            spec["security"] = [{"bearer": []}, {}]  # {}: none needed without a key
            body = self.spec = json.dumps(spec).encode()
        await _respond(send, start.get("status", 500), "application/json", body)


async def _respond(send, status: int, kind: str, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
