"""scripts/gpu_figures.py in its dry mode: every planned figure reported, floors computed from the cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_figures.py"
# The three kinds of per-frame FLOPs (whole, coarse-to-fine, slide); one torch.compile step.
FAMILIES = ["vfmnet_l16_512x1024", "vfmseg_l16_c2f_1024x2048", "depthforge_l16_512x1024"]
COMPILED = ["vfmnet_l16_512x1024"]
NOT_OK = {"error", "timeout", "skipped"}


def run_script(out: Path, work: Path, *args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work", str(work), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One dry run of three families (a couple of minutes on two cores): its JSON, markdown and work folder."""
    base = tmp_path_factory.mktemp("gpu_figures")
    proc = run_script(base / "out", base / "work", "--dry", "--families", ",".join(FAMILIES),
                      "--compile", ",".join(COMPILED), "--budget-s", "400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((base / "out" / "gpu_figures.json").read_text())
    return data, (base / "out" / "gpu_figures.md").read_text(), base / "work"


def expected_rows(families: list[str], compiled: list[str], precisions: list[str]) -> set[str]:
    rows = {"peak"}
    for fam in families:
        rows |= {f"{fam}.export", f"{fam}.eager.fp32", f"{fam}.eager.bf16"}
        rows |= {f"{fam}.bench.{p}" for p in precisions}
        if fam in compiled:
            rows.add(f"{fam}.eager.compile_bf16")
    return rows


def precisions_of(data: dict) -> list[str]:
    return ["bf16", "fp32"] if data["bench_precision_flag"] else ["n/a"]


def test_every_planned_figure_has_a_row_with_a_number_or_an_error(dry_run):
    data, md, _ = dry_run
    assert data["schema"] == "dgss_perception.gpu_figures/1" and data["dry"] is True and data["device"] == "cpu"
    ids = [r["id"] for r in data["rows"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected_rows(FAMILIES, COMPILED, precisions_of(data))
    for r in data["rows"]:
        if r["status"] == "ok":
            if r["step"] == "peak":
                assert r["peaks"]["fp32"]["best_tflops"] > 0 and r["peaks"]["bf16"]["best_tflops"] > 0
            elif r["step"] == "export":
                assert r["parity_ok"] and r["flops"] and r["seconds_export"] > 0
            else:
                assert r["ms"] > 0 and r["frames"] >= 1, r
        else:
            assert r["status"] in NOT_OK and r["error"].strip(), r
    # The eager reference is this script's own: on the CPU every one of its figures must come.
    assert all(r["status"] == "ok" for r in data["rows"] if r["step"] in ("peak", "export", "eager", "compile"))
    assert data["peak_tflops"]["fp32"] == data["rows"][0]["peaks"]["fp32"]["best_tflops"]
    # The markdown: the header facts and a table line per row, in the same order.
    for fact in ("- device: cpu", "- date: ", "- torch ", "- command: `python3 scripts/gpu_figures.py"):
        assert fact in md
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| family", "| ---"))]
    assert len(table) == len(data["rows"])
    for line, r in zip(table, data["rows"]):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[:4] == [r["family"] or "—", r["step"], r["backend"], r["precision"]]
        assert cells[-1].startswith(r["status"])
        if r.get("ratio") is not None:
            assert float(cells[4]) == pytest.approx(r["ms"], abs=0.006)
            assert float(cells[6]) == pytest.approx(r["ratio"], abs=0.006)


def card_flops_per_frame(card: dict, windows_refined_mean: float | None) -> float:
    """A frame's FLOPs, recomputed here from the card (whole; coarse + k × refine_per_window; windows × window)."""
    flops, mode = card["export"]["flops"], card["inference"]["mode"]
    if mode == "whole":
        return flops["whole"]
    if mode == "slide":
        return len(card["inference"]["params"]["windows"]) * flops["window"]
    assert mode == "coarse_to_fine" and windows_refined_mean is not None
    return flops["coarse"] + windows_refined_mean * flops["refine_per_window"]


def test_floor_and_ratio_are_the_cards_flops_over_the_measured_peak(dry_run):
    data, _, work = dry_run
    checked = set()
    for r in data["rows"]:
        if r["step"] not in ("bench", "eager", "compile") or r["status"] != "ok":
            continue
        card = json.loads((work / "packages" / r["family"] / "card.json").read_text())
        flops = card_flops_per_frame(card, r.get("windows_refined_mean"))
        precision = r.get("ran_at") or r["precision"]
        peak = data["peak_tflops"][precision]
        floor_ms = flops / (peak * 1e12) * 1e3
        assert r["flops_per_frame"] == pytest.approx(flops, rel=1e-9)
        assert r["peak_tflops"] == peak
        assert r["floor_ms"] == pytest.approx(floor_ms, rel=1e-4, abs=1e-4)
        assert r["ratio"] == pytest.approx(r["ms"] / floor_ms, rel=1e-3, abs=1e-3)
        if r["step"] == "bench":
            # The bench was given the same peak: its own compute floor is the same figure.
            assert r["bench_floor_ms"] == pytest.approx(floor_ms, rel=1e-4, abs=1e-4)
        checked.add(card["inference"]["mode"])
    assert checked == {"whole", "coarse_to_fine", "slide"}
    # A coarse-to-fine frame's FLOPs follow the windows it refined (between none and all of them).
    c2f = next(r for r in data["rows"] if r["id"] == "vfmseg_l16_c2f_1024x2048.eager.fp32")
    assert 0 <= c2f["windows_refined_mean"] <= 18
    # The CPU engine runs the TorchScript graphs: the fp32 bench row of VFMNet is a figure, not an error.
    assert next(r for r in data["rows"] if r["id"].startswith("vfmnet_l16_512x1024.bench."))["status"] == "ok"


def test_failing_steps_are_recorded_and_the_run_goes_on(tmp_path):
    """On a machine without CUDA, ``--device cuda`` makes the GPU steps fail: each records why, none stops the run.

    Also covers the spawned steps and the budget: what does not fit is recorded as skipped.
    """
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    proc = run_script(tmp_path / "out", tmp_path / "work", "--device", "cuda", "--isolation", "spawn",
                      "--families", FAMILIES[0], "--compile", "none", "--budget-s", "25", timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "gpu_figures.json").read_text())
    md = (tmp_path / "out" / "gpu_figures.md").read_text()
    assert {r["id"] for r in data["rows"]} == expected_rows(FAMILIES[:1], [], precisions_of(data))
    rows = {r["id"]: r for r in data["rows"]}
    assert rows["peak"]["status"] == "error" and "torch sees no CUDA device" in rows["peak"]["error"]
    assert data["peak_tflops"] is None
    for rid, r in rows.items():
        if rid != f"{FAMILIES[0]}.export":  # the export runs on the CPU: it may fit in the budget
            assert r["status"] in NOT_OK and r["error"].strip() and r["ms"] is None, r
            assert f"| {r['status']}: " in md
    assert "Errors (last lines):" in md
    assert data["elapsed_s"] < 25 + 15  # every step was held to what was left of the budget
