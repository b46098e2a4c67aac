"""scripts/gpu_figures.py in its dry mode: every planned figure reported, floors computed from the cards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_figures.py"
SCAN_ROWS = ("triton.fwd.fp32", "triton.fwd.bf16", "chunked.fwd.fp32", "mamba.fwd.fp32", "triton.fwdbwd.fp32",
             "chunked.fwdbwd.fp32")
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


def expected_rows(families: list[str], compiled: list[str], precisions: list[str], pt2: list[str]) -> set[str]:
    rows = {"peak"} | {f"scan.{r}" for r in SCAN_ROWS}
    for fam in families:
        rows |= {f"{fam}.export", f"{fam}.eager.fp32", f"{fam}.eager.bf16"}
        rows |= {f"{fam}.bench.{p}" for p in precisions}
        rows |= {f"{fam}.pt2.{m}" for m in pt2}
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
    assert data["pt2_modes"] == ["none"]  # the dry run's default: the compilers are test_torch_export's
    assert set(ids) == expected_rows(FAMILIES, COMPILED, precisions_of(data), ["none"])
    for r in data["rows"]:
        if r["status"] == "ok":
            if r["step"] == "peak":
                assert r["peaks"]["fp32"]["best_tflops"] > 0 and r["peaks"]["bf16"]["best_tflops"] > 0
            elif r["step"] == "export":
                assert r["parity_ok"] and r["flops"] and r["seconds_export"] > 0
                assert r["formats"] == ["torchscript", "pt2"]
            else:
                assert r["ms"] > 0 and r["frames"] >= 1, r
        else:
            assert r["status"] in NOT_OK and r["error"].strip(), r
    # The eager reference is this script's own: on the CPU every one of its figures must come.
    assert all(r["status"] == "ok" for r in data["rows"] if r["step"] in ("peak", "export", "eager", "compile"))
    # The pt2 backend ran the exported programs in the engine.
    pt2 = [r for r in data["rows"] if ".pt2." in r["id"]]
    assert len(pt2) == len(FAMILIES) and all(r["status"] == "ok" and r["step"] == "bench" for r in pt2)
    assert all("--backend pt2" in r["command"] and "--torch-compile none" in r["command"] for r in pt2)
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
    planned = expected_rows(FAMILIES[:1], [], precisions_of(data), ["inductor_cg", "aoti", "none"])
    assert {r["id"] for r in data["rows"]} == planned
    rows = {r["id"]: r for r in data["rows"]}
    assert rows["peak"]["status"] == "error" and "torch sees no CUDA device" in rows["peak"]["error"]
    assert all("torch sees no CUDA device" in rows[f"scan.{r}"]["error"] for r in SCAN_ROWS)
    assert data["peak_tflops"] is None
    for rid, r in rows.items():
        if rid != f"{FAMILIES[0]}.export":  # the export runs on the CPU: it may fit in the budget
            assert r["status"] in NOT_OK and r["error"].strip() and r["ms"] is None, r
            assert f"| {r['status']}: " in md
    assert "Errors (last lines):" in md
    assert data["elapsed_s"] < 25 + 15  # every step was held to what was left of the budget


def test_packages_are_made_beside_the_gpu_steps_and_each_bench_waits_for_its_own(dry_run):
    data, _, _ = dry_run
    rows = {r["id"]: r for r in data["rows"]}
    assert data["serial"] is False
    for fam in FAMILIES:
        made = rows[f"{fam}.export"]["ended_s"]
        for r in data["rows"]:
            if r["family"] == fam and r["step"] == "bench":
                assert r["started_s"] >= made, (r["id"], r["started_s"], made)
    # The second package was being made when the first family's benches began (the scan ran meanwhile).
    assert rows[f"{FAMILIES[1]}.export"]["started_s"] <= rows[f"{FAMILIES[0]}.bench.bf16"]["started_s"]


def test_the_scan_is_timed_through_the_kernels_and_checked_against_float64(dry_run):
    """The scan rows: the Triton kernels (in Triton's interpreter here) and the chunked scan, each within tolerance."""
    data, md, _ = dry_run
    rows = {r["id"]: r for r in data["rows"] if r["step"] == "scan"}
    assert set(rows) == {f"scan.{r}" for r in SCAN_ROWS}
    # mamba-ssm needs CUDA: a reason, not a figure.
    assert rows["scan.mamba.fwd.fp32"]["status"] == "skipped" and "CUDA" in rows["scan.mamba.fwd.fp32"]["error"]
    for rid, r in rows.items():
        if rid == "scan.mamba.fwd.fp32":
            continue
        assert r["status"] == "ok" and r["ms"] > 0 and r["shape"] == [1, 8, 45, 4], r
        # fp32 outputs and gradients as exact as the chunked scan; bf16 operands round to 8 bits of mantissa.
        assert r["max_rel_error"] < (2e-2 if r["dtype"] == "bfloat16" else 1e-5), r
    assert "| — | scan | triton selective scan, fwd + bwd | fp32 |" in md


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_figures_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are made
    spec.loader.exec_module(module)
    return module


def test_the_plan_brings_every_familys_product_figures_before_the_references(tmp_path):
    """Tiers: peak, scan; each family's package, TorchScript bf16, first pt2 mode; other compiled modes; the rest."""
    gf = load_script()
    families = list(gf.FAMILIES)
    steps, rows = gf.plan(families, False, "cuda", tmp_path, ["bf16", "fp32"], "inductor", None,
                          ["inductor_cg", "aoti", "none"])
    names = [s.name for s in steps]
    keys = [f.key for f in families]
    assert names[:2] == ["peak", "scan"]
    core = [f"{k}.{what}" for k in keys for what in ("export", "bench.bf16", "pt2.inductor_cg")]
    assert names[2:2 + len(core)] == core
    assert names[2 + len(core):2 + len(core) + len(keys)] == [f"{k}.pt2.aoti" for k in keys]
    rest = names[2 + len(core) + len(keys):]
    assert rest[-len([f for f in families if f.compile]):] == [f"{f.key}.compile" for f in families if f.compile]
    assert {f"{k}.{w}" for k in keys for w in ("bench.fp32", "pt2.none", "eager")} <= set(rest)
    assert len(names) == len(set(names))
    # Every bench of a family waits on its package; the pt2 runs say how to compile.
    by_name = {s.name: s for s in steps}
    for k in keys:
        assert by_name[f"{k}.export"].args["formats"] == ["torchscript", "pt2"]
        assert by_name[f"{k}.pt2.inductor_cg"].after == f"{k}.export"
        assert by_name[f"{k}.pt2.inductor_cg"].args["options"] == ["--torch-compile", "inductor", "--cuda-graph"]
        assert by_name[f"{k}.pt2.aoti"].args["options"] == ["--torch-compile", "aoti"]
    # Without pt2 no program is exported and no pt2 row planned.
    steps, rows = gf.plan(families[:1], False, "cuda", tmp_path, ["bf16"], "inductor", None, [])
    assert steps[2].args["formats"] == ["torchscript"] and not [r for r in rows if ".pt2." in r["id"]]


def test_unknown_pt2_modes_are_refused(tmp_path):
    for bad in ("inductor,fast", "aoti,aoti"):
        proc = run_script(tmp_path / "out", tmp_path / "work", "--dry", "--pt2", bad, timeout=120)
        assert proc.returncode == 2 and "--pt2" in proc.stderr, proc.stderr


def test_the_gpu_session_script_runs_the_figures_then_the_gpu_tests(tmp_path):
    """scripts/gpu_session.sh end to end in its dry mode: the figures' report, then ``pytest -m gpu`` (skipped here)."""
    import os

    env = dict(os.environ, DRY="1", INSTALL_WHEELS="0", PYTHON=sys.executable, WORK=str(tmp_path / "work"),
               GPU_TESTS_S="300")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), str(tmp_path / "out"), "300"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "figures" / "gpu_figures.json").read_text())
    assert data["dry"] and {r["id"] for r in data["rows"] if r["status"] == "ok"} >= {"peak", "scan.triton.fwd.fp32"}
    assert (tmp_path / "out" / "device.txt").read_text().startswith("torch ")
    log = (tmp_path / "out" / "gpu_tests.log").read_text()
    # Without CUDA every GPU test is collected and skipped, none errors.
    assert "skipped" in log and "error" not in log.lower() and "failed" not in log, log[-2000:]
    assert "gpu tests: exit 0" in proc.stdout
