"""Coarse-to-fine inference: the exported two-graph runtime against the plain PyTorch reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_C2F_CONFIG
from dgss_perception.card import CardError, load_card
from dgss_perception.engine import Segmenter
from training.checkpoint import load_state_dict_file
from training.config import config_from_dict
from training.inference import Predictor, window_grid

FRAME = (112, 224)


@pytest.fixture(scope="module")
def c2f(tiny_c2f_dir):
    """(config, weights path, exported coarse-to-fine package) for the tiny VFMNet + MGRNet."""
    assert load_card(tiny_c2f_dir).inference_mode == "coarse_to_fine"
    return config_from_dict(TINY_C2F_CONFIG), tiny_c2f_dir.parent / "weights.safetensors", tiny_c2f_dir


def frames(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random frames (blobs of colour), so labels and confidence vary over the image."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(7, 14, 3), dtype=np.uint8)
        big = torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None].float(), size=FRAME,
                                              mode="bilinear", align_corners=False)
        noise = rng.normal(0, 12, size=(*FRAME, 3))
        out.append(np.clip(big[0].permute(1, 2, 0).numpy() + noise, 0, 255).astype(np.uint8))
    return out


def test_window_grid_is_flush_with_the_border():
    columns = (0, 320, 640, 960, 1280, 1536)
    assert window_grid(1024, 2048, 512, 320) == [(y, x) for y in (0, 320, 512) for x in columns]
    assert window_grid(112, 224, 56, 35)[-1] == (56, 168)
    assert window_grid(56, 56, 56, 35) == [(0, 0)]
    with pytest.raises(ValueError, match="smaller than"):
        window_grid(40, 100, 56, 35)


def test_card_and_parity(c2f):
    _, _, package = c2f
    card = load_card(package)
    assert card.available_modes == ("coarse", "coarse_to_fine")
    assert (card.input_height, card.input_width) == FRAME
    assert card.inference_params["windows"] == [list(w) for w in window_grid(*FRAME, 56, 35)]
    parity = card.export["parity"]
    assert {r["graph"] for r in parity} == {"coarse/onnx", "coarse/torchscript", "refine/onnx", "refine/torchscript"}
    assert all(r["ok"] for r in parity)
    # A package whose window table does not fit its frame is refused.
    data = json.loads((package / "card.json").read_text())
    data["inference"]["params"]["windows"].append([100, 0])
    bad = package.parent / "bad"
    bad.mkdir(exist_ok=True)
    for f in package.iterdir():
        if f.name != "card.json":
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "card.json").write_text(json.dumps(data))
    with pytest.raises(CardError, match="windows"):
        load_card(bad)


def split_between(values: np.ndarray, gap: float) -> float:
    """A threshold near the median of ``values`` that no value comes within ``gap`` of.

    Thresholds on a value itself would let float rounding (1e-7 between graph and reference)
    flip a pixel or a window and make the comparison meaningless.
    """
    v = np.unique(values)
    order = np.argsort(np.abs(np.arange(len(v) - 1) - (len(v) - 1) / 2))
    for i in order:
        if v[i + 1] - v[i] > 2 * gap:
            return float((v[i] + v[i + 1]) / 2)
    raise AssertionError("no threshold separates the values")


def gate(package, frame: np.ndarray) -> tuple[float, float]:
    """θ and C_τ that send about half of this frame's windows to the refine graph."""
    engine = Segmenter(package, backend="onnx", inference_mode="coarse")
    confidence = engine.segment(frame).network_confidence
    theta = split_between(confidence.ravel(), 1e-5)
    windows = window_grid(*FRAME, 56, 35)
    fractions = np.array([(confidence[y:y + 56, x:x + 56] > theta).mean() for y, x in windows])
    return theta, split_between(fractions, 1e-3)


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_runtime_matches_reference(c2f, backend):
    """Batched windows gated in the graph give the labels of the plain per-window loop."""
    cfg, weights, package = c2f
    state = load_state_dict_file(weights)
    for i, frame in enumerate(frames(3, seed=11)):
        theta, c_tau = gate(package, frame)
        engine = Segmenter(package, backend=backend, theta=theta, c_tau=c_tau)
        assert engine.mode == "coarse_to_fine"
        result = engine.segment(frame)
        reference = Predictor(cfg, state, mode="coarse_to_fine", theta=theta, c_tau=c_tau)
        labels, confidence = reference.predict(frame)
        assert 0 < result.windows_refined < 18, "the gate should refine some windows and keep others"
        assert result.windows_refined == reference.windows_refined
        assert np.abs(result.confidence - confidence).max() < 1e-4
        # Labels may differ only where the top two classes tie (float summation order).
        assert (result.labels != labels).mean() < 1e-3, f"frame {i}"
        coarse_only = Segmenter(package, backend=backend, inference_mode="coarse").segment(frame)
        assert (coarse_only.labels != result.labels).any(), "refinement changed nothing: the test proves little"


def test_gate_extremes(c2f):
    """C_τ = 0 never refines (stage 1 alone); C_τ = 1 with θ near 1 refines every window."""
    cfg, weights, package = c2f
    frame = frames(1, seed=5)[0]
    coarse = Segmenter(package, backend="onnx", inference_mode="coarse").segment(frame)
    none = Segmenter(package, backend="onnx", c_tau=0.0).segment(frame)
    assert none.windows_refined == 0 and np.array_equal(none.labels, coarse.labels)
    every = Segmenter(package, backend="onnx", theta=0.999999, c_tau=1.0).segment(frame)
    assert every.windows_refined == 18
    reference = Predictor(cfg, load_state_dict_file(weights), mode="coarse_to_fine", theta=0.999999, c_tau=1.0)
    labels, _ = reference.predict(frame)
    assert (every.labels != labels).mean() < 1e-3


def test_reference_coarse_mode_matches_the_coarse_graph(c2f):
    cfg, weights, package = c2f
    frame = frames(1, seed=8)[0]
    labels, confidence = Predictor(cfg, load_state_dict_file(weights), mode="coarse").predict(frame)
    result = Segmenter(package, backend="onnx", inference_mode="coarse").segment(frame)
    assert np.abs(result.confidence - confidence).max() < 1e-4
    assert (result.labels != labels).mean() < 1e-3


def test_mode_not_offered_is_refused(c2f, tiny_model_dir):
    with pytest.raises(CardError, match="not offered"):
        Segmenter(tiny_model_dir, inference_mode="coarse_to_fine")
    with pytest.raises(CardError, match="not offered"):
        Segmenter(c2f[2], inference_mode="whole")


def test_working_size_keeps_the_aspect_like_mmseg():
    from training.inference import working_size

    assert working_size((1080, 1920), (1024, 2048), keep_ratio=True) == (1024, 1820)
    assert working_size((1024, 2048), (1024, 2048), keep_ratio=True) == (1024, 2048)
    assert working_size((3000, 4000), (1024, 2048), keep_ratio=True) == (1024, 1364)  # Mapillary-like 4:3
    assert working_size((720, 1280), (1024, 2048), keep_ratio=False) == (1024, 2048)


def test_refine_graph_is_deterministic_on_overlapping_windows(c2f):
    """Overlapping refined windows give the same result on every run and equal eager PyTorch.

    ONNX Runtime's multithreaded ScatterND(add) loses updates to repeated indices; the graph
    scatters one group of disjoint windows at a time so no index repeats.
    """
    import onnxruntime as ort

    from training.export_wrappers import disjoint_groups

    windows = window_grid(*FRAME, 56, 35)
    groups = disjoint_groups(windows, 56)
    for g in set(groups):
        members = [w for w, gg in zip(windows, groups) if gg == g]
        assert all(abs(a[0] - b[0]) >= 56 or abs(a[1] - b[1]) >= 56 for a in members for b in members if a != b)
    _, _, package = c2f
    options = ort.SessionOptions()
    options.intra_op_num_threads = 4
    refine = ort.InferenceSession(str(package / "refine.onnx"), options, providers=["CPUExecutionProvider"])
    coarse = ort.InferenceSession(str(package / "coarse.onnx"), providers=["CPUExecutionProvider"])
    image = frames(1, seed=2)[0][None]
    logits = coarse.run(None, {"image": image, "theta": np.array([0.5], np.float32)})[2]
    selected = np.array([1, 2, 7, 8, 13, 14, 15], np.int64)  # neighbours overlap in rows and columns
    runs = [refine.run(None, {"image": image, "coarse_logits": logits, "windows": selected})[1] for _ in range(20)]
    assert max(float(np.abs(r - runs[0]).max()) for r in runs) == 0.0
    ts = torch.jit.load(str(package / "refine.ts"))
    with torch.no_grad():
        eager = ts(torch.from_numpy(image), torch.from_numpy(logits), torch.from_numpy(selected))[1].numpy()
    assert np.abs(runs[0] - eager).max() < 1e-4


class FixedLogits(torch.nn.Module):
    """A stand-in network whose ``coarse`` returns the same logits whatever it is fed, and keeps its input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen: torch.Tensor | None = None

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.logits.clone()


def smooth_logits(classes: int, height: int, width: int, seed: int) -> torch.Tensor:
    """(1, C, h, w) logits varying smoothly, scaled so the max softmax spreads over (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randn(1, classes, max(2, height // 3), max(2, width // 3), generator=gen)
    return 3.0 * torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)


# Frame, window, stride, coarse logits: the tiny package's sizes, and sizes that divide nothing
# (frame 100×150 from 13×19 logits, windows of 48 every 29 with the last flush against the border).
GATE_CASES = [((112, 224), 56, 35, (14, 28)), ((100, 150), 48, 29, (13, 19)), ((97, 203), 40, 27, (11, 23))]


@pytest.mark.parametrize("frame_size, window, stride, logits_size", GATE_CASES)
def test_coarse_graph_equals_its_reference_on_the_same_logits(frame_size, window, stride, logits_size):
    """Given the same stage-1 logits, the fast coarse graph's labels, confidence and window shares are the
    reference's bit for bit (the same upsample and reductions, in place), at θ values that send some
    windows either way."""
    from training.export_wrappers import CoarseGraph, CoarseGraphReference

    windows = window_grid(*frame_size, window, stride)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for seed in range(3):
        network = FixedLogits(smooth_logits(19, *logits_size, seed))
        fast = CoarseGraph(network, mean, std, (logits_size[0] * 4, logits_size[1] * 4), windows, window).eval()
        plain = CoarseGraphReference(network, mean, std, fast.coarse_size, windows, window).eval()
        image = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (1, *frame_size, 3), dtype=np.uint8))
        with torch.no_grad():
            ref = plain(image, torch.tensor([0.5]))
            thetas = torch.quantile(ref[1].flatten(), torch.tensor([0.2, 0.5, 0.8])).tolist()
            for theta in thetas:
                got = fast(image, torch.tensor([theta]))
                want = plain(image, torch.tensor([theta]))
                assert torch.equal(got[0], want[0])
                assert torch.equal(got[1], want[1])
                assert torch.equal(got[2], want[2])
                assert got[3].shape == (1, len(windows)) and got[3].dtype == torch.float32
                assert torch.equal(got[3], want[3]), (frame_size, seed, theta)
                assert 0.0 < float(want[3].max()) and float(want[3].min()) < 1.0
        # Its network input is the reference's: normalising after the resize differs by float rounding only.
        assert network.seen is not None and network.seen.shape == (1, 3, *fast.coarse_size)
        with torch.no_grad():
            plain(image, torch.tensor([0.5]))
            seen_plain = network.seen
            fast(image, torch.tensor([0.5]))
        assert float((network.seen - seen_plain).abs().max()) < 1e-5


def test_coarse_graph_matches_its_reference_with_the_network(c2f):
    """End to end with the tiny VFMNet: the same window decisions and labels but where the top two tie."""
    from training.export_wrappers import CoarseGraph, CoarseGraphReference
    from training.inference import model_at_size

    cfg, weights, _ = c2f
    inf = cfg.inference
    model = model_at_size(cfg, load_state_dict_file(weights), tuple(inf.coarse_size))
    windows = window_grid(*FRAME, inf.window, inf.stride)
    args = (model, cfg.model.mean, cfg.model.std, tuple(inf.coarse_size), windows, inf.window)
    fast, plain = CoarseGraph(*args).eval(), CoarseGraphReference(*args).eval()
    for frame in frames(2, seed=21):
        image = torch.from_numpy(frame)[None]
        with torch.no_grad():
            confidence = plain(image, torch.tensor([0.5]))[1].numpy()
            theta = torch.tensor([split_between(confidence.ravel(), 1e-5)])
            got, want = fast(image, theta), plain(image, theta)
        assert float((got[2] - want[2]).abs().max()) < 1e-4
        assert float((got[1] - want[1]).abs().max()) < 1e-5
        assert float((got[0] != want[0]).float().mean()) < 1e-3
        # θ lies more than 1e-5 from every confidence, farther than the two differ: no pixel changes side.
        assert torch.equal(got[3], want[3])
        assert torch.equal(got[3] < inf.c_tau, want[3] < inf.c_tau)


def test_labels_and_confidence_overwriting_equals_the_plain_form():
    from training.export_wrappers import labels_and_confidence

    logits = torch.randn(2, 19, 33, 47, generator=torch.Generator().manual_seed(4)) * 6
    logits[0, 4, :5] = logits[0, 7, :5] = 50.0
    want = labels_and_confidence(logits)
    scratch = logits.clone()
    got = labels_and_confidence(scratch, overwrite=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(scratch, logits)  # it did work in place
