"""HTML pieces of report.html: the stylesheet, number formatting, tables, embedded images,
the settings and provenance blocks."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from raysae.results.vocabulary import Status

CSS = """
body{font:15px/1.5 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;color:#222;
 max-width:1020px;margin:2em auto;padding:0 1.2em;background:#fcfcfb}
h1{font-size:1.6em;margin-bottom:.1em} h2{margin-top:2em;border-bottom:1px solid #ddd;
 padding-bottom:.2em;font-size:1.2em} .sub{color:#777;margin-top:0}
.headline{background:#eef4fb;border-left:5px solid #1f5fa8;padding:.9em 1.2em;
 font-size:1.08em;border-radius:4px} .headline li{margin:.25em 0}
figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #e4e4e4;background:#fff}
figcaption{color:#555;font-size:.9em} table{border-collapse:collapse;margin:.6em 0;
 font-size:.88em} th,td{padding:.3em .7em;border-bottom:1px solid #e6e6e6;text-align:right}
th{background:#f1f1ef;text-align:center} td.l,th.l{text-align:left}
tr:nth-child(even) td{background:#f8f8f6} .good{color:#18794e;font-weight:600}
.bad{color:#b3261e} .note{color:#666;font-size:.9em}
.prov td{text-align:left;font-family:monospace;font-size:.85em}
.matrix td.ns{color:#777} .matrix td.good{background:#e3f3ea} .matrix td.bad{background:#fbe9e7}
h3{font-size:1em;margin:1.2em 0 .2em} details{margin:.4em 0}
details>summary{cursor:pointer;font-weight:600;padding:.3em 0;border-bottom:1px solid #eee}
"""


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def table(df: pd.DataFrame, cols: dict, signed: tuple = (), table_id: str = "",
           left: tuple = ()) -> str:
    """An HTML table of df[cols] headed cols.values(); signed columns green > 0 > red."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in cols.values())
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r.get(c, None)
            cls = "l" if c in left or not isinstance(v, (int, float, np.number)) else ""
            if c in signed and isinstance(v, float) and np.isfinite(v) and v != 0:
                cls = "good" if v > 0 else "bad"
            cells.append(f'<td class="{cls}">{fmt(v)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def settings_table(search: dict) -> pd.DataFrame:
    """The job's settings a researcher reads (search.json's ``settings``), one row each."""
    flat = pd.json_normalize(search.get("settings") or {}, sep=".")
    rows = [(k, json.dumps(v) if isinstance(v, (list, dict, tuple)) else v)
            for k, v in (flat.iloc[0].items() if len(flat) else [])]
    return pd.DataFrame(rows, columns=["setting", "value"])


def _time_parts(parts: dict) -> str:
    """'train 1200 (71%), eval 240 (14%), ...' of a stage's available core-seconds."""
    total = parts.get("available") or 0.0
    shown = [f"{k.replace('_', ' ')} {v:.0f}" + (f" ({v / total:.0%})" if total else "")
             for k, v in parts.items() if k != "available"]
    return ", ".join(shown) + f" of {total:.0f}"


def provenance_block(search: dict) -> str:
    """Versions, commit, hardware and wall time per stage, as a two-column table."""
    prov = search.get("provenance") or {}
    if not prov:
        return "<p class='note'>No provenance recorded (search.json predates it).</p>"
    rows = [("commit", prov.get("commit"))]
    rows += [(f"version of {k}", v) for k, v in (prov.get("versions") or {}).items()]
    rows += [(k, v) for k, v in (prov.get("hardware") or {}).items()]
    rows += [(f"wall time of stage {k}", f"{v:.0f} s")
             for k, v in (prov.get("stage_seconds") or {}).items()]
    rows += [(f"core-seconds of {stage}", _time_parts(parts))
             for stage, parts in (prov.get("core_seconds") or {}).items()]
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table class='prov' id='provenance'><tbody>{body}</tbody></table>"


def subtitle(results_dir, counts) -> str:
    """The folder and what its trials came to (``counts``: family x status): finished SAEs,
    diverged or errored ones, and proposals a multi-fidelity search stopped at their rung
    (no SAEs; not failures)."""
    stopped = int(counts[Status.STOPPED].sum()) if Status.STOPPED in counts else 0
    done = counts.drop(columns=[Status.FINISHED, Status.STOPPED], errors="ignore")
    bad = int(done.to_numpy().sum())
    more = f", {stopped} proposals stopped at their rung (no SAEs)" if stopped else ""
    return (f"<p class='sub'>{html.escape(str(results_dir))} · "
            f"{int(counts['finished'].sum())} finished SAEs, {bad} diverged or errored (left "
            f"out of every front){more}</p>")
