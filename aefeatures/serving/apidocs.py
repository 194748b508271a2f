"""`GET /docs`: the OpenAPI description as one self-contained HTML page.

FastAPI's own pages (Swagger UI, ReDoc) load their scripts and styles from a CDN, so they stay
blank on a machine without internet access. This page is rendered on the server from
``app.openapi()`` with no script and no external asset: every endpoint with its summary,
parameters, request body and answers, and links to ``/openapi.json``.
"""

from __future__ import annotations

import html
import json
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
h2{border-top:1px solid #ddd;padding-top:1rem;font-size:1.1rem}
code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
pre{padding:.6rem;overflow-x:auto}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}
.method{font-weight:bold;text-transform:uppercase;margin-right:.5rem}
"""


def render(spec: dict[str, Any]) -> str:
    """The page for an OpenAPI 3 document ``spec`` (a dict as ``FastAPI.openapi()`` returns)."""
    info = spec.get("info", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(info.get('title', 'API'))}</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>{_e(info.get('title', 'API'))} <small>{_e(info.get('version', ''))}</small></h1>",
             f"<p>{_e(info.get('description', ''))}</p>",
             "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Errors are "
             "<code>{\"error\": {\"status\", \"code\", \"message\"}}</code>.</p>"]
    schemas = spec.get("components", {}).get("schemas", {})
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><span class='method'>{_e(method)}</span><code>{_e(path)}</code></h2>")
            parts.append(f"<p>{_e(op.get('summary', ''))}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>default</th>"
                             "<th>description</th></tr>")
                for p in params:
                    schema = p.get("schema", {})
                    default = json.dumps(schema["default"]) if "default" in schema else ("required" if p.get("required") else "")
                    parts.append(f"<tr><td><code>{_e(p['name'])}</code></td><td>{_e(p.get('in', ''))}</td>"
                                 f"<td>{_e(_type(schema, schemas))}</td><td>{_e(default)}</td>"
                                 f"<td>{_e(p.get('description', schema.get('description', '')))}</td></tr>")
                parts.append("</table>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append("<p>JSON body:</p>" + _fields(_resolve(body, schemas), schemas))
            answers = ", ".join(f"{_e(code)} {_e(r.get('description', ''))}" for code, r in op.get("responses", {}).items())
            parts.append(f"<p>Answers: {answers}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def _fields(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    props = schema.get("properties", {})
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{_e(name)}</code></td><td>{_e(_type(p, schemas))}</td>"
        f"<td>{'required' if name in required else _e(json.dumps(p.get('default')))}</td>"
        f"<td>{_e(p.get('description', ''))}</td></tr>" for name, p in props.items())
    return ("<table><tr><th>field</th><th>type</th><th>default</th><th>description</th></tr>" + rows + "</table>"
            if rows else "")


def _resolve(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    return schemas.get(ref.rsplit("/", 1)[-1], {}) if ref else schema


def _type(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    schema = _resolve(schema, schemas) if "$ref" in schema else schema
    if "anyOf" in schema:
        return " or ".join(_type(s, schemas) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}), schemas)}"
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    return schema.get("type", schema.get("title", "any"))


def _e(value: Any) -> str:
    return html.escape(str(value))
