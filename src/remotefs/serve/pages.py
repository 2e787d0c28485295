"""The pages of the HTTP server that are not files: directory indexes and the status page.

* Every directory (``/`` and ``/DIR/``) is an HTML index of its entries, with sizes and how
  much of each file is cached, or the same as JSON when the client prefers
  ``application/json`` (`wants_json`).
* ``/_remotefs/status`` is a live page for people: one row per file with a progress bar, its
  state, download rate and bytes from the origin, and the cache's use; it fetches
  ``/_remotefs/status.json`` every second and redraws itself. That JSON is the control
  socket's own ``status`` answer (`remotefs.daemon.control`), so it carries only redacted
  URLs, plus where the daemon listens.

Names and URLs reach HTML only through `html.escape` (server side) or ``textContent`` (in the
page's script): a file name is data, never markup. Every page is built from data the caller
passes in, so nothing here touches the engine.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..units import human_size as human

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { padding: 0.2em 0.8em; text-align: left; white-space: nowrap; }
th { border-bottom: 1px solid #999; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; width: 12em; height: 0.9em; background: #ddd;
       vertical-align: middle; border-radius: 2px; overflow: hidden; }
.fill { height: 100%; background: #2a7; }
.muted { color: #777; }
.error { color: #b00; }
"""


@dataclass(frozen=True)
class Entry:
    """One entry of a directory index."""

    name: str
    is_dir: bool
    size: int = 0
    cached_bytes: int = 0

    @property
    def percent(self) -> float:
        return percent(self.cached_bytes, self.size)


def percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 100.0


def quote_path(parts: Sequence[str], *, directory: bool = False) -> str:
    """The percent-encoded URL path of *parts*: ``/a%20b/c`` (``/`` for the root)."""
    path = "/" + "/".join(urllib.parse.quote(part, safe="") for part in parts)
    if directory and not path.endswith("/"):
        path += "/"
    return path


def wants_json(accept: str | None) -> bool:
    """True when ``Accept`` prefers ``application/json`` to HTML (by q-value; a tie, or
    ``*/*`` beside an explicit JSON, goes to JSON)."""
    if not accept:
        return False
    best: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (piece.strip() for piece in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[kind.lower()] = max(best.get(kind.lower(), 0.0), quality)
    as_json = best.get("application/json", 0.0)
    as_html = max(best.get("text/html", 0.0), best.get("*/*", 0.0) if not as_json else 0.0)
    return as_json > 0 and as_json >= as_html


def _page(title: str, body: str, script: str = "") -> bytes:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}{script}</body></html>\n"
    ).encode()


def index_json(parts: Sequence[str], entries: Sequence[Entry]) -> bytes:
    """A directory as JSON: its path and its entries (files with sizes and cache figures)."""
    rows: list[dict[str, Any]] = []
    for entry in entries:
        href = quote_path([*parts, entry.name], directory=entry.is_dir)
        if entry.is_dir:
            rows.append({"name": entry.name, "type": "directory", "href": href})
        else:
            rows.append(
                {
                    "name": entry.name,
                    "type": "file",
                    "href": href,
                    "size": entry.size,
                    "cached_bytes": entry.cached_bytes,
                    "percent": entry.percent,
                }
            )
    answer = {"path": quote_path(parts, directory=True), "entries": rows}
    return json.dumps(answer, indent=1).encode() + b"\n"


def index_html(parts: Sequence[str], entries: Sequence[Entry], query: str = "") -> bytes:
    """A directory as an HTML table; *query* (``?token=...``) is carried on every link."""
    title = quote_path(parts, directory=True)
    shown = "/" + "/".join(parts) + ("/" if parts else "")
    rows = []
    if parts:
        rows.append(f'<tr><td><a href="../{query}">../</a></td><td></td><td></td></tr>')
    for entry in entries:
        href = html.escape(quote_path([*parts, entry.name], directory=entry.is_dir) + query)
        name = html.escape(entry.name + ("/" if entry.is_dir else ""))
        if entry.is_dir:
            rows.append(f'<tr><td><a href="{href}">{name}</a></td><td></td><td></td></tr>')
            continue
        rows.append(
            f'<tr><td><a href="{href}">{name}</a></td>'
            f'<td class="num">{human(entry.size)}</td>'
            f'<td class="num">{entry.percent:.1f}%</td></tr>'
        )
    status = html.escape("/_remotefs/status" + query)
    body = (
        f"<h1>Index of {html.escape(shown)}</h1>"
        '<table><tr><th>Name</th><th class="num">Size</th><th class="num">Cached</th></tr>'
        + "".join(rows)
        + f'</table><p class="muted"><a href="{status}">cache status</a></p>'
    )
    return _page(f"remotefs {title}", body)


STATUS_SCRIPT = r"""
<script>
"use strict";
const query = new URLSearchParams(location.search).get("token");
const suffix = query ? "?token=" + encodeURIComponent(query) : "";
function human(n) {
  if (n < 1024) return n.toFixed(0) + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i];
}
function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}
function render(s) {
  const t = s.totals;
  const head = [];
  head.push(t.files + (t.files === 1 ? " file" : " files") + ", " + t.complete + " complete");
  head.push("cached " + human(t.cached_bytes) + " of " + human(t.size) +
            " (" + t.percent.toFixed(1) + "%)");
  const cap = t.cache_max_size ? " of " + human(t.cache_max_size) + " cap" : "";
  head.push("cache use " + human(t.cache_used) + cap);
  head.push(human(t.origin_bytes) + " from origins");
  if (t.rate) head.push(human(t.rate) + "/s now");
  const http = s.daemon && s.daemon.http;
  if (http) head.push(http.responses_in_flight + " HTTP responses in flight");
  document.getElementById("summary").textContent = head.join("; ");
  const body = document.getElementById("rows");
  body.replaceChildren();
  for (const f of s.files) {
    const row = document.createElement("tr");
    row.dataset.path = f.path;
    const name = cell(row, "");
    const link = document.createElement("a");
    link.href = "/" + f.path.split("/").map(encodeURIComponent).join("/") + suffix;
    link.textContent = f.path;
    name.appendChild(link);
    cell(row, human(f.size), "num");
    cell(row, human(f.cached_bytes), "num");
    const progress = cell(row, "");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", String(f.percent));
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = f.percent + "%";
    bar.appendChild(fill);
    progress.appendChild(bar);
    cell(row, " " + f.percent.toFixed(1) + "%", "num");
    cell(row, f.state, f.state === "error" ? "error" : "");
    cell(row, f.rate ? human(f.rate) + "/s" : "-", "num");
    cell(row, human(f.origin_bytes), "num");
    cell(row, f.url, "muted");
    body.appendChild(row);
    const note = f.error || f.note;
    if (note) {
      const extra = document.createElement("tr");
      const td = cell(extra, note, f.error ? "error" : "muted");
      td.colSpan = 9;
      body.appendChild(extra);
    }
  }
  document.getElementById("hidden").textContent =
    s.hidden ? s.hidden + " more files (status.json?all=1 has every one)" : "";
  document.body.dataset.updated = String(Date.now());
}
async function refresh() {
  try {
    const answer = await fetch("/_remotefs/status.json" + suffix, {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
    document.getElementById("problem").textContent = "";
  } catch (err) {
    document.getElementById("problem").textContent = "not updating: " + err.message;
  }
}
render(JSON.parse(document.getElementById("initial").textContent));
setInterval(refresh, 1000);
</script>
"""


def status_html(status: dict[str, Any]) -> bytes:
    """The live status page, with *status* (the status.json answer) as its first state."""
    initial = json.dumps(status).replace("<", "\\u003c")  # no "</script>" inside the script
    where = ", ".join(html.escape(address) for address in status.get("listen") or [])
    mounted = status.get("mountpoint")
    also = f" and mounted at {html.escape(str(mounted))}" if mounted else ""
    body = (
        "<h1>remotefs</h1>"
        f'<p class="muted">pid {int(status.get("pid", 0))}, serving on {where}{also}</p>'
        '<p id="summary"></p><p id="problem" class="error"></p>'
        '<table><thead><tr><th>Path</th><th class="num">Size</th>'
        '<th class="num">Cached</th><th>Progress</th><th class="num">%</th><th>State</th>'
        '<th class="num">Rate</th><th class="num">From origin</th><th>URL</th></tr></thead>'
        '<tbody id="rows"></tbody></table><p id="hidden" class="muted"></p>'
        "<noscript><p>This page updates itself with JavaScript; without it, see "
        '<a href="/_remotefs/status.json">status.json</a>.</p></noscript>'
        f'<script id="initial" type="application/json">{initial}</script>'
    )
    return _page("remotefs status", body, STATUS_SCRIPT)


def message_html(status: int, title: str, text: str) -> bytes:
    """A small error page (404, 503, ...)."""
    return _page(
        f"{status} {title}", f"<h1>{status} {html.escape(title)}</h1><p>{html.escape(text)}</p>"
    )
