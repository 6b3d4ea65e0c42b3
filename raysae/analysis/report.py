"""`raysae report RESULTS_DIR`: one offline HTML page answering "which penalty wins where".

The page leads with a sentence that states the answer (computed by raysae.analysis.pareto), then the
frontier figure, the tables (best penalty per target L0, who wins where, hypervolumes,
trial counts, search settings) and the remaining figures. Images are embedded as base64
data URIs, so report.html is one self-contained file; the PNGs also stay in figures/.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from raysae import io
from raysae.analysis import claims, pareto, plots
from raysae.analysis.confidence import per_seed_table
from raysae.analysis.html_parts import CSS, img, provenance_block, settings_table, subtitle, table
from raysae.core import metrics as metric_table
from raysae.results import contract
from raysae.results.vocabulary import Stage, Status
from raysae.settings import UserError

MIN_TRIALS_FOR_IMPORTANCE = 8
TIE_TOL = 0.005  # nats: a family takes the lead only when lower by more than this


def representatives(trials: pd.DataFrame, table: pd.DataFrame | None) -> dict:
    """Per family, the finished SAE in `table` whose L0 is closest (in log) to a common L0."""
    if table is None or not len(table):
        return {}
    done = trials[(trials["status"] == Status.FINISHED) & (trials["l0"] > 0)]
    done = done[done["trial_id"].isin(set(table["trial_id"]))]
    if not len(done):
        return {}
    centre = np.exp(np.median(np.log(done["l0"])))
    out = {}
    for fam in pareto.families(done):
        sub = done[done["family"] == fam]
        r = sub.loc[np.abs(np.log(sub["l0"] / centre)).idxmin()]
        out[fam] = (r["trial_id"], float(r["l0"]))
    return out


def param_importances(trials: pd.DataFrame, space: list[dict] | None) -> dict | None:
    """Optuna's importances for the objective, over the parameters the search really
    proposed (search.json's ``space``) and per family; None when too few usable trials."""
    if not space or "experiment" not in trials:
        return None
    if "stage" in trials and trials["stage"].notna().any():  # Optuna's own proposals only
        trials = trials[trials["stage"] == Stage.SEARCH]
        stopped = trials["status"] == Status.STOPPED
        if "rung_objective" in trials and len(trials) and stopped.all():
            # successive halving: every proposal ended at its rung, scored as Optuna saw it
            trials = trials.assign(status=Status.FINISHED, objective=trials["rung_objective"])
    else:
        trials = trials[~trials["experiment"].astype(str).str.endswith("_refs")]
    ok = trials[(trials["status"] == Status.FINISHED) & np.isfinite(trials["objective"])]
    if "tune_trial_id" in ok and ok["tune_trial_id"].notna().all():  # one score per trial
        ok = ok.drop_duplicates("tune_trial_id").assign(objective=lambda d: d[
            "trial_objective"].where(d["trial_objective"].notna(), d["objective"]))
    out: dict[str, float] = {}
    for family in {s["family"] for s in space if s["family"]}:
        items = [s for s in space if s["family"] in (family, None)]
        cols = {s["name"]: s["name"].split(".", 1)[-1] for s in items}
        sub = ok[ok["penalty"] == family]
        if not all(c in sub for c in cols.values()):
            continue
        sub = sub[sub[list(cols.values())].notna().all(axis=1)]
        if len(sub) < MIN_TRIALS_FOR_IMPORTANCE:
            continue
        dists = {s["name"]: optuna.distributions.FloatDistribution(
            min(s["low"], sub[cols[s["name"]]].min()), max(s["high"], sub[cols[s["name"]]].max()),
            log=s["log"]) for s in items}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize")
        study.add_trials([optuna.trial.create_trial(
            params={k: float(r[cols[k]]) for k in dists}, distributions=dists,
            value=float(r["objective"])) for _, r in sub.iterrows()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                imp = optuna.importance.get_param_importances(study)
            except (ValueError, RuntimeError):
                continue
        out.update({k: float(v) for k, v in imp.items()})
    return out if out and sum(out.values()) > 0 else None


def _has(df: pd.DataFrame, col: str) -> bool:
    return col in df and bool(df[col].notna().any())


def analyse(res: pareto.Results) -> dict:
    """Everything the page shows, computed once: fronts, curves, crossovers, tables."""
    pts = pareto.points_table(res.trials, res.ablations)
    if not len(pts):
        raise UserError("no finished trial with l0 > 0 and finite ce_sae; nothing to report")
    curves = pareto.matched_l0(pts)
    fams = pareto.families(pts)
    switch = pd.DataFrame([pareto.switch_point(curves, f) for f in fams if f != "L1"],
                          columns=list(pareto.switch_point(curves, "").keys()))
    targets = res.search.get("targets") or pareto.default_targets(res.trials, pts)
    ys = [y for y in metric_table.frontier_metrics() if _has(pts, y)]  # ce_sae's: "fronts"
    return {"points": pts, "fronts": pareto.fronts(pts), "curves": curves, "switch": switch,
            **{f"fronts_{y}": pareto.fronts(pts, y) for y in ys if y != "ce_sae"},
            "wins": pareto.win_ranges(curves, fams, TIE_TOL), "direction": "minimize",
            "summary": pareto.summary_table(res.trials, pts, [float(t) for t in targets]),
            "hv": pd.concat([pareto.hypervolumes(pts, y).assign(metric=y) for y in ys],
                            ignore_index=True),
            "importance": param_importances(res.trials, res.search.get("space"))}


def _versus_l1(r) -> str:
    """One clause from a pareto.switch_point row: where a family beats L1, by how much."""
    gain = (f", by up to {r.max_gain:.3g} nats at L0 {r.max_gain_l0:.3g}"
            if r.max_gain > 0 else "")
    span = f"L0 {r.l0_min:.3g}–{r.l0_max:.3g}"
    cross = f"; the fronts cross {r.n_crossings} times" if r.n_crossings > 1 else ""
    if r.side in ("above", "below"):
        return (f"<b>{r.family}</b> beats L1 {r.side} L0 ≈ <b>{r.l0:.3g}</b>{gain} "
                f"(compared over {span}{cross}).")
    say = {"everywhere": "beats L1 everywhere in", "nowhere": "never beats L1 in",
           "middle": "beats L1 only inside"}[r.side]
    return f"<b>{r.family}</b> {say} {span}{gain}{cross}."


def _vs(saved: float, family: str) -> str:
    word = "below" if saved >= 0 else "above"
    return f"{abs(saved):.3g} nats {word} {family}"


def headline(a: dict) -> str:
    """The answer in a few sentences (HTML list items)."""
    items = [_versus_l1(r) for r in a["switch"].dropna(subset=["l0_min"]).itertuples()]
    w = a["wins"]
    if len(w):
        spans = "; ".join(f"<b>{r.family}</b> for L0 {r.l0_from:.3g}–{r.l0_to:.3g}"
                          + (" (alone there)" if np.isnan(r.max_margin) else "")
                          for r in w.itertuples())
        items.append(f"Lowest CE at matched L0 (leads under {TIE_TOL} nats count as ties): "
                     f"{spans}.")
    s = a["summary"].dropna(subset=["saved_vs_L1"])
    if len(s):
        r = s.loc[s["saved_vs_L1"].idxmax()]
        vs_sqrt = (f" and {_vs(r['saved_vs_sqrt'], 'sqrt')}"
                   if np.isfinite(r.get("saved_vs_sqrt", np.nan)) else "")
        label = html.escape(str(r.get("label", r["family"])))
        items.append(f"Best penalty found: <b>{label}</b> at "
                     f"L0 {r['l0']:.3g} (target {r['target_l0']:.3g}): CE {r['ce_sae']:.4g}, "
                     f"<b>{_vs(r['saved_vs_L1'], 'L1')}</b>{vs_sqrt} at the same L0.")
    if not items:
        items.append("Too little overlapping data to compare families; see the frontier.")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def make_figures(res: pareto.Results, a: dict, out_dir: Path) -> list[tuple[str, str, Path]]:
    """Draw every figure the data allows; returns (title, caption, png) in page order."""
    t, d, figs = res.trials, out_dir, []
    ce_clean = float(t["ce_clean"].median()) if "ce_clean" in t else None
    best = a["summary"].dropna(subset=["l0"])
    figs.append(("Frontier", ("CE vs L0 for every SAE (faint: threshold sweeps); lines: each "
                 "family's Pareto front; stars: best penalty found near each target L0."),
                 plots.frontier(a["points"], a["fronts"], d / "frontier.png", best=best,
                                ce_clean=ce_clean)))
    if res.comparisons is not None and len(res.comparisons):
        figs.append(("CE difference to L1 with intervals", (
            "Paired by seed (same init and data order), per target L0; bands: 95% intervals "
            "including the held-out set's sampling noise."),
            plots.delta_bands(res.comparisons, d / "delta_bands.png")))
    if any(c.startswith("delta_") for c in a["curves"]):
        figs.append(("CE difference to L1", ("Each front minus L1's at the same L0, "
                     "interpolated in log(L0); dashed lines: where a family starts to win."),
                     plots.delta_to_baseline(a["curves"], a["switch"], d / "delta_l1.png")))
    for y in (y for y in metric_table.frontier_metrics() if f"fronts_{y}" in a):
        figs.append((f"Frontier of {y}", f"{metric_table.label(y)} vs L0.", plots.frontier(
            a["points"], a[f"fronts_{y}"], d / f"frontier_{y}.png", y)))
    shown = [metric_table.label(m) for m in plots.panel_metrics() if m in a["points"]]
    figs.append(("Reconstruction metrics", f"Trained SAEs only (no threshold sweeps): "
                 f"{', '.join(shown)}.", plots.metrics_vs_l0(a["points"], d / "metrics.png")))
    fam_of = dict(zip(t["trial_id"], t["family"], strict=True))
    if res.ablations is not None and len(res.ablations):
        figs.append(("Threshold removal, every SAE", "Global threshold raised from 0 (dot).",
                     plots.ablation_curves(res.ablations, fam_of, d / "ablation_curves.png")))
        n = res.ablations.groupby("trial_id")["method"].nunique()
        if n.max() > 1:
            figs.append(("Four removal methods", "On the SAE with the most methods swept.",
                         plots.ablation_methods(res.ablations, n.idxmax(), d / "methods.png")))
    reps = representatives(t, res.feature_stats)
    if reps:
        figs.append(("Feature frequency", "One SAE per family, chosen nearest a common L0.",
                     plots.feature_frequency(res.feature_stats, reps, d / "frequency.png")))
    reps = representatives(t, res.activation_samples)
    if reps:
        s = res.activation_samples
        med = {f: float(s.loc[(s.trial_id == tid) & (s.activation > 0), "activation"].median())
               for f, (tid, _) in reps.items()}
        figs.append(("Activation histograms", "Nonzero activations of the first tokens.",
                     plots.activation_hist(s, reps, med, d / "activations.png")))
    if "objective" in t:
        figs.append(("Search history", f"Objective ({a['direction']}) per trial.",
                     plots.optuna_history(t, d / "history.png", a["direction"])))
    if a["importance"]:
        figs.append(("Parameter importance", "optuna.importance on the finished trials.",
                     plots.importance(a["importance"], d / "importance.png")))
    return figs


def _refs(hv: pd.DataFrame) -> str:
    return "; ".join(f"{y}: log10 L0 = {g['ref_log10_l0'].iloc[0]:.3g}, {y} = "
                     f"{g['ref_' + y].iloc[0]:.4g}" for y, g in hv.groupby("metric", sort=False))


def render(results_dir: Path, res: pareto.Results, a: dict, figs: list) -> str:
    """The page as one HTML string."""
    counts = res.trials.groupby(["family", "status"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=sorted({*counts.columns, Status.FINISHED}), fill_value=0)
    fig_html = [f'<figure id="fig-{i}"><img alt="{html.escape(ti)}" src="{img(p)}">'
                f"<figcaption><b>{html.escape(ti)}.</b> {html.escape(cap)}</figcaption></figure>"
                for i, (ti, cap, p) in enumerate(figs)]
    y = "ce_sae"
    summ = {"target_l0": "target L0", "trial_id": "best trial", "family": "family",
            "label": "penalty", "lam": "λ", "l0": "L0", y: "CE", f"{y}_L1": "CE of L1 front",
            "saved_vs_L1": "saved vs L1", f"{y}_sqrt": "CE of sqrt front",
            "saved_vs_sqrt": "saved vs sqrt", "n_near": "trials near"}
    files = ("<p class='note'>The rows behind every table: <a href='trials.parquet'>"
             "trials.parquet</a>, <a href='comparisons.parquet'>comparisons.parquet</a> "
             "(this folder).</p>")
    parts = [
        f"<h1>Which sparsity penalty wins?</h1>{subtitle(results_dir, counts)}",
        f"<div class='headline'>{_claims_or_headline(res, a)}</div>",
        *_matrix_sections(res.comparisons),
        "<h2>Figures</h2>", *fig_html,
        "<h2>Tables</h2>", files,
        *_fold_each(_interval_sections(res)),
        *_folded(["<h2>Best penalty per target L0</h2>",
        table(a["summary"], summ, ("saved_vs_L1", "saved_vs_sqrt"), "summary"),
        ("<p class='note'>Best = lowest CE among finished SAEs whose L0 is within 25% of the "
         "target; savings compare with a family's front at that SAE's own L0 (positive = "
         "better). Fronts include threshold sweeps of each family's SAEs.</p>")]),
        *_folded(["<h2>Who wins where</h2>",
        "<p class='note'>L0 ranges where each family's front has the lowest CE.</p>",
        table(a["wins"], {"family": "family", "l0_from": "from L0", "l0_to": "to L0",
                           "max_margin": "max CE margin"}, table_id="wins"),
        ("<p class='note'>Each family against L1: the L0 beyond which it is better at every "
        "matched L0 (its last or first crossing), and its largest CE gain.</p>"),
        table(a["switch"], {"family": "family", "side": "beats L1", "l0": "L0",
                             "max_gain": "max CE gain", "max_gain_l0": "at L0",
                             "n_crossings": "crossings", "l0_min": "compared from L0",
                             "l0_max": "to L0"}, table_id="switch")]),
        *_folded(["<h2>Hypervolume</h2>", table(a["hv"], {"metric": "metric",
               "family": "family", "n_points": "points", "n_front": "on front",
               "hypervolume": "hypervolume"}),
        ("<p class='note'>Area dominated in (log10 L0, metric) space, bounded by a reference "
         "point shared by all families: the maximum of each axis over all finished points plus "
         f"10% of its range ({_refs(a['hv'])}). Larger is better.</p>")]),
        *_folded(["<h2>Trials</h2>", table(counts.reset_index(), {c: c for c in
                                                         ["family", *counts.columns]})]),
        *_folded(["<h2>Search settings</h2>", table(settings_table(res.search),
                                                    {"setting": "setting", "value": "value"},
                                                    table_id="settings", left=("value",))]),
        *_folded(["<h2>Provenance</h2>", provenance_block(res.search)])]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>raysae report"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def _folded(section: list[str]) -> list[str]:
    """A section (its <h2> first) folded into <details>, its heading the summary: the
    tables are there to check the claims, not to stand between them and the figures."""
    if not section:
        return []
    title = section[0].removeprefix("<h2>").removesuffix("</h2>")
    return [f"<details><summary>{title}</summary>", *section[1:], "</details>"]


def _fold_each(parts: list[str]) -> list[str]:
    """Each <h2> section of ``parts`` folded on its own (``_folded``)."""
    sections: list[list[str]] = []
    for part in parts:
        if part.startswith("<h2>") or not sections:
            sections.append([])
        sections[-1].append(part)
    return [piece for section in sections for piece in _folded(section)]


def _matrix_cell(cell) -> str:
    if not isinstance(cell, tuple):
        return "<td class='na'>–</td>"
    delta, call = cell
    cls, mark = {-1: ("good", "better"), 1: ("bad", "worse"), 0: ("ns", "n.s.")}[call]
    return f"<td class='{cls}' title='{mark}'>{delta:+.3f}{'' if call else ' ·'}</td>"


def _matrix_sections(comparisons) -> list[str]:
    """One matrix per reference (label x target L0, and the ladder mean): the difference
    in CE on the claims' basis and its call, coloured (better, worse, not called)."""
    out = []
    for ref in claims.comparison_references():
        m = claims.reference_matrix(comparisons, ref)
        if not len(m):
            continue
        head = "".join(f"<th>{'ladder' if c == 'ladder' else f'{c:g}'}</th>"
                       for c in m.columns)
        rows = "".join(f"<tr><td class='l'>{html.escape(str(label))}</td>"
                       + "".join(_matrix_cell(cell) for cell in row) + "</tr>"
                       for label, row in m.iterrows())
        out.append(f"<h3>Against {html.escape(ref)}</h3><table class='matrix' "
                   f"id='matrix-{html.escape(ref)}'><thead><tr><th class='l'>label \\ "
                   f"target L0</th>{head}</tr></thead><tbody>{rows}</tbody></table>")
    if not out:
        return []
    return ["<h2>Against each reference</h2>",
            ("<p class='note'>CE(label) - CE(reference) in nats at the reference's achieved "
             "L0, mean over paired seeds (a searched proposal: its fresh seeds only). "
             "<span class='good'>Green</span>: the label is better, <span class='bad'>red"
             "</span>: worse, both called under false-discovery-rate control across the "
             "run; ·: no detectable difference. Intervals: the claims above and the "
             "comparisons table.</p>"), *out]


def _claims_or_headline(res: pareto.Results, a: dict) -> str:
    """Interval-backed claims when comparisons exist; else the frontier's description,
    marked as single SAEs without intervals (a sweep)."""
    items = claims.headline(res.comparisons)
    if items:
        return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
    return ("<p class='note'>Single SAEs without seed replicates: descriptive only, no "
            "intervals (run a search with --seeds to get claims).</p>" + headline(a))


def _interval_sections(res: pareto.Results) -> list[str]:
    """The ladder table, per-target winners, every comparison and the per-seed table."""
    if res.comparisons is None or not len(res.comparisons):
        return []
    ladder = claims.ladder_table(res.trials)
    winners = claims.target_winners(res.comparisons)
    comp = res.comparisons.sort_values(["reference", "basis", "target_l0", "delta_ce_mean"])
    seeds = per_seed_table(res.trials[res.trials["target_l0"].notna()])
    return [
        "<h2>Every family at every target L0</h2>",
        table(ladder, {c: c for c in ladder.columns}, table_id="ladder", left=("label",)),
        ("<p class='note'>Mean CE over seeds (its mean L0, number of SAEs). Each SAE was "
         "trained for its target (lambda driven to it by the controller).</p>"),
        "<h2>Winner per target L0 (paired differences, FDR-controlled calls)</h2>",
        table(winners, {c: c for c in winners.columns}, table_id="winners",
              left=("label", "family", *(c for c in winners.columns if c.startswith("vs_")))),
        "<h2>All comparisons</h2>",
        ("<p class='note'>Basis <i>matched_l0</i> (what the claims above use): the penalty's "
         "CE read off its own ladder at the reference's achieved held-out L0 (linear in log "
         "L0 between its rungs, never beyond them), seed by seed; <i>target</i>: both trained "
         "for the same target, so an L0 miss counts as CE. A searched proposal's seeds are "
         "only those that played no part in choosing it. Calls: Benjamini-Hochberg at a 5% "
         "false discovery rate across every comparison of the run on its basis; intervals: "
         "false-coverage-rate adjusted to the level shown (Benjamini and Yekutieli 2005), so "
         "an interval excludes 0 exactly when its row is called. The raw 95% intervals are "
         "columns ci_low_raw and ci_high_raw of comparisons.parquet.</p>"),
        table(comp, {"label": "penalty", "family": "family", "reference": "vs",
                     "basis": "basis", "target_l0": "target L0 (– = ladder mean)",
                     "l0_reference": "at L0", "n_seeds": "seeds",
                     "delta_ce_mean": "ΔCE", "ci_low": "adjusted low", "ci_high": "adjusted high",
                     "ci_level": "level", "significant": "called (FDR 5%)",
                     "significant_raw": "95% excludes 0", "interval": "noise covered",
                     "fresh_seeds_only": "fresh seeds only"},
              table_id="comparisons"),
        *_budget_section(res.comparisons),
        "<h2>Per seed</h2>",
        table(seeds, {c: c for c in seeds.columns}, table_id="per_seed",
              left=("label", "family"))]


def _budget_section(comparisons) -> list[str]:
    """The budget check (--budget-check k): every claim at 1x and at k x tokens."""
    rows = claims.budget_table(comparisons)
    if not len(rows):
        return []
    kept = int((rows["same sign"] & rows["significance kept"]).sum())
    return ["<h2>Budget check: do the claims survive longer training?</h2>",
            (f"<p class='note'>The references and the best proposal retrained with "
             f"{rows['budget'].iloc[0]} the training tokens, paired seeds; {kept} of "
             f"{len(rows)} comparisons keep their sign and their significance (target L0 "
             "– = ladder mean).</p>"),
            table(rows, {c: c for c in rows.columns}, table_id="budget",
                  left=("label", "reference", "at 1x", "at k x"))]


def write_report(results_dir, out: Path | None = None) -> Path:
    """Analyse results_dir and write report.html (and figures/) into it; returns the page."""
    root = Path(results_dir)
    res = pareto.load_results(root)
    a = analyse(res)
    figs = make_figures(res, a, root / contract.FIGURES_DIR)
    return io.write_text(Path(out) if out else root / contract.REPORT_FILE,
                         render(root, res, a, figs))
