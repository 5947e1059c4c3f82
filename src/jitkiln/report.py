"""Report: where the build time went (critical path, slowest units, hits and misses, unused candidates),
as text, JSON, and a timeline picture (PNG with matplotlib, or a self-contained HTML page)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .errors import UsageError
from .store import Store


def load_record(which: str | None, store: Store) -> dict[str, Any]:
    """A build record: a path, or ``last`` / None for the newest one in the store."""
    if which in (None, "last"):
        last = store.root / "builds" / "last"
        if not last.is_file():
            raise UsageError(f"no build recorded in {store.base}",
                             hint="run `jitkiln build ...` first, or pass a build record's path")
        try:
            which = last.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{last} does not name a build record ({e})",
                             hint="run `jitkiln build ...` again, or pass a build record's path") from None
        if not which or "\0" in which:
            raise UsageError(f"{last} does not name a build record",
                             hint="run `jitkiln build ...` again, or pass a build record's path")
    p = Path(which)
    try:
        rec = json.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no build record at {p}", hint="pass the path `jitkiln build` printed") from None
    except IsADirectoryError:
        raise UsageError(f"{p} is a folder, not a build record",
                         hint="pass the build record's .json file (in the cache's v1/builds/)") from None
    except OSError as e:
        raise UsageError(f"cannot read build record {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"build record {p} is not UTF-8 text: not a jitkiln build record") from None
    except ValueError as e:
        raise UsageError(f"build record {p} is not valid JSON ({e})") from None
    why = _record_problem(rec)
    if why:
        raise UsageError(f"{p} is not a jitkiln build record ({why})",
                         hint="pass the path `jitkiln build` printed")
    rec["_path"] = str(p)
    return rec


_NUM = (int, float)
_UNIT_FIELDS = {"name": str, "status": str, "seconds": _NUM, "start": _NUM, "end": _NUM, "peak_rss": _NUM}
_REC_FIELDS = {"family": str, "variant": str, "module_key": str, "wall_s": _NUM, "critical_path_s": _NUM}


def _bad_type(v: Any, t) -> bool:
    return isinstance(v, bool) or not isinstance(v, t)


def _record_problem(rec: Any) -> str:
    """Why ``rec`` is not a build record this report can read ('' if it is)."""
    if not isinstance(rec, dict):
        return f"JSON {type(rec).__name__}, not an object"
    if "units" not in rec:
        return "no 'units'"
    for k, t in _REC_FIELDS.items():
        if _bad_type(rec.get(k), t):
            return f"no valid {k!r}"
    units = rec["units"]
    if not isinstance(units, list) or not units:
        return "no units"
    for u in units:
        if not isinstance(u, dict) or any(_bad_type(u.get(k), t) for k, t in _UNIT_FIELDS.items()):
            return "a unit without name, status, times or memory"
    for k in ("cache_hits", "failed", "unused"):
        if not isinstance(rec.get(k, []), list):
            return f"{k!r} is not a list"
    if not all(isinstance(u, dict) and isinstance(u.get("name"), str) and isinstance(u.get("reason"), str)
               for u in rec.get("unused", [])):
        return "a malformed 'unused' entry"
    return ""


def summarize(rec: dict[str, Any], top: int = 5) -> dict[str, Any]:
    units = rec["units"]
    compiled = sorted((u for u in units if u["status"] == "compiled"), key=lambda u: -u["seconds"])
    crit = compiled[0] if compiled else None
    return {
        "family": rec["family"], "variant": rec["variant"], "module": rec.get("module"),
        "module_key": rec["module_key"], "wall_s": rec["wall_s"], "critical_path_s": rec["critical_path_s"],
        "critical_unit": crit["name"] if crit else None,
        "compiler_cpu_s": rec.get("compiler_cpu_s"), "jobs": rec.get("jobs"),
        "compiled": len(compiled), "cache_hits": len(rec.get("cache_hits", [])),
        "failed": rec.get("failed", []),
        "slowest": [{"name": u["name"], "seconds": u["seconds"], "peak_rss_mb": round(u["peak_rss"] / 2**20),
                     "phases": u.get("phases", {})} for u in compiled[:top]],
        "unused": rec.get("unused", []),
        "record": rec.get("_path"),
    }


def format_text(rec: dict[str, Any], top: int = 5) -> str:
    s = summarize(rec, top)
    lines = [f"build of {s['family']}/{s['variant']} ({s['module']} module {s['module_key'][:16]}), "
             f"{s['jobs']} jobs",
             f"  wall {s['wall_s']:.2f} s; critical path {s['critical_path_s']:.2f} s"
             + (f" ({s['critical_unit']})" if s["critical_unit"] else "")
             + f"; compiler CPU {s['compiler_cpu_s'] or 0:.1f} s",
             f"  compiled {s['compiled']}, cache hits {s['cache_hits']}"
             + (f", FAILED {len(s['failed'])}: {', '.join(s['failed'])}" if s["failed"] else "")]
    if s["slowest"]:
        lines.append("  slowest units:")
        for u in s["slowest"]:
            ph = ", ".join(f"{k} {v:.1f}" for k, v in sorted(u["phases"].items(), key=lambda kv: -kv[1])[:4])
            lines.append(f"    {u['seconds']:7.2f} s  {u['peak_rss_mb']:5d} MB  {u['name']}" + (f"  [{ph}]" if ph else ""))
    if s["unused"]:
        lines.append(f"  unused candidates ({len(s['unused'])}), not built:")
        for u in s["unused"]:
            lines.append(f"    {u['name']}: {u['reason']}")
    lines.append(f"  record: {s['record']}")
    return "\n".join(lines)


def _rows(rec: dict[str, Any]):
    units = rec["units"]
    compiled = [u for u in units if u["status"] == "compiled"]
    crit = max(compiled, key=lambda u: u["seconds"])["name"] if compiled else None
    rows = sorted(compiled, key=lambda u: u["start"])
    rows += [u for u in units if u["status"] != "compiled"]
    return rows, crit


def timeline_png(rec: dict[str, Any], out: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the PNG timeline needs matplotlib",
                         hint="`pip install 'jitkiln[report]'`, or ask for HTML: --timeline out.html") from None
    rows, crit = _rows(rec)
    unused = rec.get("unused", [])
    n = len(rows) + len(unused)
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.38 * max(n, 1)))
    y = 0
    labels = []
    for u in rows:
        if u["status"] == "compiled":
            color = "#d62728" if u["name"] == crit else ("#ff7f0e" if u.get("urgent") else "#1f77b4")
            ax.barh(y, max(u["end"] - u["start"], 0.01), left=u["start"], color=color, edgecolor="black", lw=0.4)
            ax.text(u["end"], y, f" {u['seconds']:.1f}s", va="center", fontsize=7)
        else:
            ax.barh(y, 0.05 * max(rec["wall_s"], 0.1), left=0, color="#2ca02c")
            ax.text(0.06 * max(rec["wall_s"], 0.1), y, f" {u['status']}", va="center", fontsize=7)
        labels.append(u["name"])
        y += 1
    for u in unused:
        ax.text(0, y, "  unused: not built (" + u["reason"][:90] + ")", va="center", fontsize=7, color="#777777")
        labels.append(u["name"])
        y += 1
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([l[:60] for l in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since build start")
    ax.set_title(f"{rec['family']}/{rec['variant']} build: wall {rec['wall_s']:.1f} s, critical path "
                 f"{rec['critical_path_s']:.1f} s (red), urgent (orange), cache hits (green), {rec.get('jobs')} jobs",
                 fontsize=9)
    ax.set_xlim(0, max(rec["wall_s"], 0.1) * 1.12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def timeline_html(rec: dict[str, Any], out: str) -> str:
    rows, crit = _rows(rec)
    wall = max(rec["wall_s"], 0.001)
    parts = ["<html><head><meta charset='utf-8'><title>jitkiln build</title><style>"
             "body{font:12px sans-serif} .r{position:relative;height:18px;border-bottom:1px solid #eee}"
             ".b{position:absolute;height:14px;top:2px} .l{position:absolute;left:0;width:38%;overflow:hidden;"
             "white-space:nowrap} .t{position:absolute;left:40%;right:0;height:18px}</style></head><body>",
             f"<h3>{html.escape(rec['family'])}/{html.escape(rec['variant'])}: wall {rec['wall_s']:.2f} s, "
             f"critical path {rec['critical_path_s']:.2f} s</h3>"]
    for u in rows:
        if u["status"] == "compiled":
            left, width = 100 * u["start"] / wall, max(100 * (u["end"] - u["start"]) / wall, 0.3)
            color = "#d62728" if u["name"] == crit else ("#ff7f0e" if u.get("urgent") else "#1f77b4")
            bar = (f"<div class='b' style='left:{left:.2f}%;width:{width:.2f}%;background:{color}' "
                   f"title='{u['seconds']:.2f} s'></div>")
        else:
            bar = f"<div class='b' style='left:0;width:1%;background:#2ca02c' title='{u['status']}'></div>"
        parts.append(f"<div class='r'><div class='l'>{html.escape(u['name'])}</div><div class='t'>{bar}</div></div>")
    for u in rec.get("unused", []):
        parts.append(f"<div class='r' style='color:#888'><div class='l'>{html.escape(u['name'])}</div>"
                     f"<div class='t'>unused, not built: {html.escape(u['reason'])}</div></div>")
    parts.append("</body></html>")
    Path(out).write_text("\n".join(parts))
    return out


TIMELINE_SUFFIXES = (".html", ".htm", ".png", ".svg", ".pdf")


def check_timeline_path(out: str) -> None:
    """Refuse a --timeline path that cannot be written, before any work (one line, the reason)."""
    p = Path(out)
    if not p.name or p.suffix.lower() not in TIMELINE_SUFFIXES:
        raise UsageError(f"--timeline {out}: unknown picture type {p.suffix or '(no suffix)'!r}",
                         hint="give a file ending in .html (self-contained) or .png (needs matplotlib)")
    if p.is_dir():
        raise UsageError(f"--timeline {out} is a folder", hint="give a file path such as build.html")
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(f"--timeline {out}: the folder {parent} does not exist or is not a folder",
                         hint="create the folder first, or write the timeline elsewhere")


def timeline(rec: dict[str, Any], out: str) -> str:
    check_timeline_path(out)
    try:
        if out.lower().endswith((".html", ".htm")):
            return timeline_html(rec, out)
        return timeline_png(rec, out)
    except OSError as e:
        raise UsageError(f"cannot write the timeline {out}: {e.strerror or e}") from None
