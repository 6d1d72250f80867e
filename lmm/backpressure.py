"""A bound on the requests the API service works on at once (``api.max_concurrency``).

Past it a request gets 429 with Retry-After in the one error shape at once, rather than
queueing; the openai SDK retries 429 by itself. (BentoML's own ``max_concurrency`` answers with
a bare ``{"error": "Too many requests"}`` and no Retry-After, so the API service does not use it;
the runners do, and the API turns their 429 into this same answer.) Health probes, the docs and
/metrics are not counted.
"""

from __future__ import annotations

from lmm.errors import TooManyRequests, json_error

EXEMPT = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json"})


class ConcurrencyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit, self.in_flight = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in EXEMPT:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            refused = TooManyRequests(f"the server is at its limit of {self.limit} requests in "
                                      "flight (api.max_concurrency); retry shortly.")
            return await json_error(refused)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
