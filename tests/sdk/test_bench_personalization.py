"""``edgetune bench personalization`` end to end on a tiny Llama and the real Debian ``fortunes``
text: every setting × α is a point, the plot is a real PNG, and the markdown section replaces
itself in a docs file."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

from edgetune.bench.personalization import BEGIN, END, settings_table, write_docs  # noqa: E402
from edgetune.cli import main  # noqa: E402
from edgetune.data.fortunes import FORTUNES  # noqa: E402

pytestmark = pytest.mark.skipif(not (FORTUNES / "computers").is_file(),
                                reason="needs the Debian 'fortunes' package (.ci/run installs it)")


def test_the_benchmark_sweeps_plots_and_writes_its_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"# Benchmarks\n\n{BEGIN}\nold numbers\n{END}\n\n## Another section\n")
    code = main(["bench", "personalization", "--model", "tiny-llama", "--categories", "computers,science",
                 "--max-texts", "40", "--seq-len", "32", "--rounds", "1", "--fed-steps", "2", "--steps", "1,3",
                 "--adamw-lrs", "1e-2", "--sgd-lrs", "1", "--l2", "0,100", "--alphas", "0,0.5,1",
                 "--eval-blocks", "2", "--out", str(tmp_path / "out"), "--docs", str(docs)])
    assert code == 0
    results = json.loads((tmp_path / "out" / "personalization.json").read_text())
    # 2 optimizers × 1 lr × 2 step counts × 2 λ × 3 α, on each of 2 devices
    assert len(results["points"]) == 2 * 2 * 2 * 3 * 2
    assert len(settings_table(results)) == 2 * 2 * 2 * 3
    assert len(results["chosen"]) == 2 * 2 * 2 * 2
    # α = 0 is the global adapter itself, on every device and setting
    for p in results["points"]:
        if p["alpha"] == 0.0:
            assert p["own_ppl"] == pytest.approx(results["global"][p["device"]]["own_ppl"], rel=1e-5)
            assert p["others_ppl"] == pytest.approx(results["global"][p["device"]]["others_ppl"], rel=1e-5)
    png = (tmp_path / "out" / "personalization.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    text = docs.read_text()
    assert "old numbers" not in text and text.count(BEGIN) == 1 and "## Another section" in text
    assert "](out/personalization.png)" in text and "**Local fine-tuning trades robustness for personalization**" in text
    write_docs((tmp_path / "out" / "personalization.md").read_text(), docs)  # idempotent
    assert docs.read_text() == text
