"""raysae.analysis.report and `raysae report`: the page, its edge cases, a real headless browser."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_pareto import SPACE, TARGETS, make_results, make_trials

from raysae import cli
from raysae.analysis import claims, pareto, report
from raysae.core.metrics import metric_names

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--remote-debugging-pipe"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("results"))
    return root, report.write_report(root)


def test_page_states_the_answer_from_pareto(results):
    root, page = results
    text = page.read_text()
    res = pareto.load_results(root)
    curves = pareto.matched_l0(pareto.points_table(res.trials, res.ablations))
    sw = pareto.switch_point(curves, "sqrt")
    assert f"<b>sqrt</b> beats L1 {sw['side']} L0 ≈ <b>{sw['l0']:.3g}</b>" in text
    assert "3 diverged or errored" in text and "64 finished SAEs" in text
    n_img = len(re.findall(r'<img [^>]*src="data:image/png;base64,', text))
    assert n_img == len(list((root / "figures").glob("*.png"))) == 10
    # top down: the answer, the figures, then the tables folded away
    assert (text.index("class='headline'") < text.index("Frontier")
            < text.index("Search history") < text.index("<details>")
            < text.index('id="summary"'))
    assert "search.num_trials" in text and "http" not in text  # settings shown; nothing external


def test_importances_need_enough_trials():
    trials = make_trials(0)
    imp = report.param_importances(trials, SPACE)
    assert set(imp) == {"power.p", "power.eps"} and sum(imp.values()) == pytest.approx(1.0)
    assert report.param_importances(trials.head(5), SPACE) is None
    assert report.param_importances(trials, []) is None  # a sweep proposes nothing


def test_importances_of_a_halving_search_use_the_rung_scores():
    """Under successive halving every proposal ended at its rung (status stopped, no final
    objective): the importances are over the rung scores Optuna saw, and equal the ones
    over the same numbers as finished objectives."""
    import numpy as np

    trials = make_trials(0)
    finished = trials[(trials["experiment"] == "syn") & (trials["status"] == "finished")
                      ].assign(stage="search")
    stopped = finished.assign(status="stopped", rung_objective=finished["objective"],
                              objective=np.nan, trial_objective=np.nan)
    assert report.param_importances(stopped, SPACE) == pytest.approx(
        report.param_importances(finished.assign(trial_objective=np.nan), SPACE))


def test_sparse_directories_still_give_a_page(tmp_path):
    make_results(tmp_path, extras=False)  # no ablations, feature stats or samples
    (tmp_path / "search.json").unlink()
    text = report.write_report(tmp_path).read_text()
    assert text.count("<img ") == 5 and 'id="summary"' in text  # no space: no importances
    only = make_trials(0)
    only = only[only["family"] == "power"]  # no L1 at all
    only.to_parquet(tmp_path / "trials.parquet")
    text = report.write_report(tmp_path).read_text()
    assert "Lowest CE at matched L0" in text and "CE difference to L1" not in text


def test_cli_writes_the_page_and_rejects_bad_input(results, tmp_path, capsys):
    root, _ = results
    assert cli.main(["report", str(root), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 100_000
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "trials.parquet not found" in capsys.readouterr().err
    bad = make_trials(0).assign(status="diverged")
    bad.to_parquet(tmp_path / "trials.parquet")
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no finished trial" in capsys.readouterr().err

TRAMPOLINE = ("import os, sys; a, b = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
              "os.dup2(a, 3); os.dup2(b, 4); os.set_inheritable(3, True); "
              "os.set_inheritable(4, True); os.execv(sys.argv[3], sys.argv[3:])")


class PipeCDP:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, 4 out)."""

    def __init__(self, binary: str, profile: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        # chromium reads commands on fd 3 and answers on fd 4: a tiny exec trampoline puts
        # the pipe ends there (no preexec_fn, no shell: dash rejects fd numbers above 9).
        self.proc = subprocess.Popen(
            [sys.executable, "-c", TRAMPOLINE, str(cmd_r), str(resp_w), binary,
             *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(cmd_r, resp_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(resp_w)
        self._buf, self._id, self.events = b"", 0, []

    def _next(self, deadline: float, what: str) -> dict:
        """The next message from chromium (reply or event), reading the pipe as needed."""
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._resp_r], [], [], left)[0]:
                raise TimeoutError(f"chromium sent no {what}")
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, timeout: float = 30, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline, f"reply to {method}")
            if reply.get("id") != self._id:
                self.events.append(reply)
            elif "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            else:
                return reply["result"]

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._next(deadline, method))

    def close(self):
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._resp_r)


CHECK_JS = """
new Promise(done => {
  const finish = () => {
    const imgs = [...document.images];
    const rows = [...document.querySelectorAll('#summary tbody tr')];
    done(JSON.stringify({
      images: imgs.map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                              alt: i.alt})),
      targets: rows.map(r => r.cells[0].textContent.trim()),
      headline: document.querySelector('.headline').innerText,
      height: document.documentElement.scrollHeight}));
  };
  if (document.readyState === 'complete') finish();
  else window.addEventListener('load', finish);
})
"""


def test_report_renders_in_headless_chromium(results, tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium not installed (apt-get install -y chromium) - browser test skipped")
    _, page = results
    cdp = PipeCDP(binary, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", url="about:blank")["targetId"]
        sid = cdp.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        cdp.send("Page.enable", sid)
        cdp.send("Emulation.setDeviceMetricsOverride", sid, width=1200, height=900,
                 deviceScaleFactor=1, mobile=False)
        cdp.send("Page.navigate", sid, url=page.as_uri())
        cdp.wait_event("Page.loadEventFired")
        out = cdp.send("Runtime.evaluate", sid, expression=CHECK_JS, awaitPromise=True,
                       returnByValue=True)
        assert "exceptionDetails" not in out, out.get("exceptionDetails")
        state = json.loads(out["result"]["value"])
        shot = cdp.send("Page.captureScreenshot", sid, format="png", captureBeyondViewport=True)
    finally:
        cdp.close()
    png = base64.b64decode(shot["data"])
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report_screenshot.png").write_bytes(png)
    (tmp_path / "report_screenshot.png").write_bytes(png)
    assert len(state["images"]) == 10
    assert all(i["ok"] for i in state["images"]), [i for i in state["images"] if not i["ok"]]
    assert [float(t) for t in state["targets"]] == list(TARGETS)  # one row per target L0
    assert "beats L1" in state["headline"] and state["height"] > 3000
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 100_000


def _ladder_results(root):
    """A searched ladder with 4 paired seeds: sqrt beats L1 clearly at 16, not at 8."""
    from raysae.analysis import confidence
    from raysae.results import contract

    rng = np.random.default_rng(0)
    rows = []
    for seed in range(4):
        for target, gap in ((8.0, 0.0), (16.0, -0.06)):
            for label, family, delta in (("L1", "L1", 0.0), ("sqrt", "sqrt", gap),
                                         ("power(p=0.4, eps=0.1)", "power", gap / 2)):
                base = 4.5 - 0.1 * np.log2(target) + rng.normal(0, 0.004)
                blocks = (base + delta + rng.normal(0, 0.02, 16)).tolist()
                rows.append({"trial_id": f"{label}-{seed}-{target}", "status": "finished",
                             "family": family, "label": label, "penalty": "power",
                             "seed": seed, "target_l0": target, "l0": target * 1.01,
                             "ce_sae": float(np.mean(blocks)), "ce_sae_blocks": blocks,
                             "experiment": "x_refs", "objective": float(np.mean(blocks))})
    trials = pd.DataFrame(rows)
    for col in contract.trial_columns(metric_names()):
        trials[col] = trials.get(col, np.nan)
    contract.write_trials(trials, root, metric_names())
    contract.write_comparisons(confidence.compare(trials), root)
    return root


def test_report_claims_carry_intervals(tmp_path):
    text = report.write_report(_ladder_results(tmp_path)).read_text()
    assert "sqrt vs L1</b> at each target" in text
    head = text[text.index("class='headline'"):text.index("</div>", text.index("headline"))]
    # L0 8: no true difference; L0 16: sqrt is better, and the sentence gives the interval.
    assert "L0 8: no detectable difference to L1" in head
    assert "L0 16: <b>beats L1</b> by -0.0" in head and "4 seeds" in head
    for table_id in ("ladder", "winners", "comparisons", "per_seed"):
        assert f'id="{table_id}"' in text
    assert "No provenance recorded" in text
    # The matrix against L1 says the same as the claims: better at 16 (called), n.s. at 8.
    comparisons = pd.read_parquet(tmp_path / "comparisons.parquet")
    m = claims.reference_matrix(comparisons, "L1")
    assert m.at["sqrt", 16.0][1] == -1 and m.at["sqrt", 8.0][1] == 0
    matrix = text[text.index("id='matrix-L1'"):]
    matrix = matrix[:matrix.index("</table>")]
    row = matrix[matrix.index(">sqrt</td>"):]
    row = row[:row.index("</tr>")]
    assert row.count("class='good'") >= 1 and "class='ns'" in row
    assert text.index("Against each reference") < text.index("<details>")


def test_stopped_proposals_are_counted_apart_from_failures(tmp_path):
    """A multi-fidelity search's proposals stopped at their rung have no SAEs: the page says
    how many, and does not count them as diverged or errored."""
    root = make_results(tmp_path, extras=False)
    trials = pd.read_parquet(root / "trials.parquet")
    stopped = trials.iloc[[0]].assign(status="stopped", trial_id="stopped-m0", l0=np.nan,
                                      ce_sae=np.nan, target_l0=np.nan, rung_objective=0.1)
    pd.concat([trials, stopped], ignore_index=True).to_parquet(root / "trials.parquet")
    text = report.write_report(root).read_text()
    assert "3 diverged or errored" in text
    assert "1 proposals stopped at their rung" in text


def test_a_small_job_makes_its_claims_on_matched_l0(tiny_model_dir, ray_local, tmp_path):
    """End to end, the basis the claims use: a job with a 2-rung ladder and 2 paired seeds
    writes matched-L0 comparisons (each label's CE read at the reference's achieved L0),
    under false-discovery-rate control, and the report's claims are those rows."""
    from raysae.analysis import claims
    from raysae.results import contract

    args = ["search", "--model", str(tiny_model_dir), "--hook", "blocks.0.hook_resid_post",
            "--context-length", "32", "--targets", "4", "16", "--num-trials", "1",
            "--rung", "0", "--seeds", "2", "--baselines", "topk", "--max-concurrent", "2",
            "--total-tokens", "61440", "--cache-tokens", "61440", "--batch-size", "256",
            "--eval-blocks", "8",
            "--storage", str(tmp_path / "tune"), "--results", str(tmp_path / "results")]
    assert cli.main(args) == 0
    out = tmp_path / "results"
    comparisons = contract.read_comparisons(out)
    matched = comparisons[comparisons["basis"] == "matched_l0"]
    assert len(matched) and (matched["n_seeds"] <= 2).all() and (matched["n_seeds"] == 2).any()
    called = matched[matched["interval"].isin(["seeds", "seeds+blocks"])]
    assert called["ci_level"].notna().all() and called["p_value"].between(0, 1).all()
    widened = called["ci_high"] - called["ci_low"] >= called["ci_high_raw"] - called["ci_low_raw"]
    assert widened.all()
    rows = claims.claim_rows(comparisons)
    assert set(rows["basis"]) == {"matched_l0"} and len(rows) == len(
        matched[matched["budget"] == 1.0])
    page = (out / "report.html").read_text()
    assert "sqrt vs L1</b> at each target" in page


def test_the_plain_answer_says_target_by_target_whether_a_penalty_reaches_topk():
    def row(label, target, delta, called):
        return {"family": label, "label": label, "reference": "TopK", "basis": "matched_l0",
                "target_l0": target, "n_seeds": 4, "delta_ce_mean": delta,
                "ci_low": delta - 0.01, "ci_high": delta + 0.01, "significant": called,
                "ci_level": 0.97, "fresh_seeds_only": True}
    comparisons = pd.DataFrame([row("sqrt", 8.0, 0.10, True), row("L1", 8.0, 0.15, True),
                                row("sqrt", 32.0, -0.02, True), row("L1", 32.0, 0.0, False),
                                row("BatchTopK", 8.0, -0.05, True)])
    first, second = claims.baseline_reach(comparisons, "TopK")
    assert first.startswith("<b>L0 8</b>: no penalty is detectably better than TopK; the "
                            "closest: sqrt +0.100 nats")
    assert "L1" not in first and "BatchTopK" not in first + second  # baselines apart
    assert second.startswith("<b>L0 32</b>: better than TopK: sqrt -0.020 nats")
    assert claims.headline(comparisons)[0].startswith("Does any penalty reach <b>TopK</b>?")
