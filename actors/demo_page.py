"""``GET /demo``: the live shop page, served by the same app as the API.

Plain HTML, CSS and JavaScript from ``actors/static/`` (packaged with ``actors``, so every
replica finds them next to this module; no build step). The page talks only to the public API,
relative to where it is served (so it works under any ``route_prefix``), and sends the key typed
into its key field as ``X-API-Key``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse

from graph.errors import NotFoundError

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The page's files, by the name in the URL: nothing else under static/ is served.
ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}


def add_demo_routes(api: FastAPI) -> None:
    """Register ``GET /demo`` (the page) and ``GET /demo/{asset}`` (its script and style)."""

    @api.get("/demo", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "demo.html", media_type="text/html")

    @api.get("/demo/", include_in_schema=False)
    async def demo_slash() -> RedirectResponse:
        return RedirectResponse("../demo")

    @api.get("/demo/{asset}", include_in_schema=False)
    async def demo_asset(asset: str) -> FileResponse:
        media_type = ASSETS.get(asset)
        if media_type is None:
            raise NotFoundError(f"no demo file {asset!r}; the page is GET /demo", field="asset")
        return FileResponse(STATIC_DIR / asset, media_type=media_type)
