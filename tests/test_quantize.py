"""INT8: the post-training files run and agree with fp32; BatchNorm folding and QAD keep the model's function."""
import pytest
import torch

from engine.export import Deployable, to_onnx, to_pt2
from engine.qad import FakeQuant, QADModel, fold_batchnorm
from engine.quantize import Runner, calibration_images, int8_file, measure
from models import build_model
from tests.engine_helpers import device_sets, train

# A trained plain-2 on the tiny data: INT8 must pick the same class for nearly every test image, and its logits
# stay within a small share of their range.
MIN_AGREEMENT, MAX_LOGIT_ERROR = 0.95, 0.02


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_dir):
    from engine.config import DataConfig

    data_cfg = DataConfig(source_dir=str(fashion_dir), root=str(tmp_path_factory.mktemp("raw")))
    model, _ = train(data_cfg, epochs=2)
    splits, train_set, _, test = device_sets(data_cfg)
    mean, std = splits.mean_std()
    return Deployable(model, mean, std), train_set, test


def test_int8_files_run_and_agree_with_fp32(trained, tmp_path, monkeypatch):
    model, train_set, test = trained
    images, labels = test.x.float() / 255, test.y
    to_onnx(model, images[:4], tmp_path / "model.onnx")
    to_pt2(model, images[:4], tmp_path / "model.pt2")
    files = {"onnx": int8_file(tmp_path / "model.onnx", calibration_images(train_set, 256, 0)),
             "pt2": tmp_path / "model.pt2"}  # the fp32 program runs through the same Runner
    with torch.no_grad():
        fp32 = model(images)
    span = (fp32.max() - fp32.min()).item()
    for path in files.values():
        logits = Runner(path).logits(images)
        assert (logits.argmax(1) == fp32.argmax(1)).float().mean() >= MIN_AGREEMENT, path
        assert (logits - fp32).abs().max() / span <= MAX_LOGIT_ERROR, path
    import engine.quantize

    timed = []  # each timing runs the file on its batch once, and is 2 ms
    monkeypatch.setattr(engine.quantize, "median_seconds", lambda fn, repeats: (timed.append(fn()), 0.002)[1])
    onnx = measure(files["onnx"], images, labels, fp32.argmax(1), speed_repeats=2)
    weights = sum(p.numel() for p in model.parameters())
    fp32_size = (tmp_path / "model.onnx").stat().st_size
    # int8 weights: the file sheds three of the four bytes of nearly every weight (a few KB of graph stay)
    assert fp32_size - onnx["size_bytes"] >= 0.9 * 3 * weights, (fp32_size, onnx["size_bytes"], weights)
    assert onnx["agreement"] >= MIN_AGREEMENT
    assert [t.shape[0] for t in timed] == [1, 256]
    assert onnx["latency_ms_b1"] == pytest.approx(2.0) and onnx["throughput_b256"] == pytest.approx(128_000)


@pytest.mark.parametrize("arch", ["air-32"])
def test_int8_serves_the_other_families(arch, tmp_path):
    """Pooling before BatchNorm, GELU, a reshape ONNX Runtime's symbolic shape inference could not read."""
    model = Deployable(_with_batchnorm_statistics(arch), [0.3], [0.3])
    images = torch.rand(64, 1, 28, 28)
    to_onnx(model, images[:4], tmp_path / "model.onnx")
    int8 = int8_file(tmp_path / "model.onnx", images)
    with torch.no_grad():
        fp32 = model(images)
    span = (fp32.max() - fp32.min()).item()
    assert (Runner(int8).logits(images) - fp32).abs().max() / span <= 0.1


def test_calibration_sample_is_seeded(trained):
    _, train_set, _ = trained
    a, b, c = (calibration_images(train_set, 32, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape[0] == 32 and 0 <= a.min() and a.max() <= 1


def _with_batchnorm_statistics(arch: str) -> torch.nn.Module:
    from models import build_model

    model = build_model(arch, 1, 10, 28, seed=0)
    with torch.no_grad():
        for m in model.modules():  # a BatchNorm far from the identity, so that folding it matters
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
        for _ in range(3):
            model(torch.randn(32, 1, 28, 28) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("arch", ["plain-2", "resnet-8", "air-32"])
def test_folding_batchnorm_keeps_the_function(arch):
    model = _with_batchnorm_statistics(arch)
    x = torch.randn(8, 1, 28, 28)
    folded, pairs = fold_batchnorm(model, x)
    assert pairs and all(isinstance(folded.get_submodule(bn), torch.nn.Identity) for bn in pairs.values())
    assert torch.allclose(folded(x), model(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["plain-2", "air-32"])
def test_qad_weights_return_to_the_architecture(arch):
    """After some fake-quantized steps, the float model computes what the QAD model does without fake quantization."""
    model = _with_batchnorm_statistics(arch)
    qad = QADModel(model, torch.randn(2, 1, 28, 28)).train()
    opt = torch.optim.SGD(qad.parameters(), lr=0.05)
    x = torch.randn(32, 1, 28, 28)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(qad(x), torch.arange(32) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    back = qad.to_float().eval()
    qad.eval()
    qad.input_quant = torch.nn.Identity()
    for m in qad.modules():
        if isinstance(m, FakeQuant):
            m.forward = lambda x: x  # the same weights, unrounded
    with torch.no_grad():
        assert not torch.allclose(back(x), model(x), atol=1e-3)  # it trained
        assert torch.allclose(back(x), qad(x), atol=1e-5)
    assert type(back) is type(model) and back.arch == model.arch


def test_observers_are_still_in_evaluation():
    qad = QADModel(_with_batchnorm_statistics("plain-2"), torch.randn(2, 1, 28, 28)).train()
    with torch.no_grad():
        qad(torch.randn(16, 1, 28, 28))  # ranges observed in training
    qad.eval()
    before = {k: v.clone() for k, v in qad.state_dict().items()}
    with torch.no_grad():
        qad(torch.randn(16, 1, 28, 28) * 50)
    assert all(torch.equal(before[k], v) for k, v in qad.state_dict().items())


def test_the_report_pairs_ptq_and_qad_by_seed_and_leaves_qad_out_when_it_is_off():
    from tasks.config import load_config
    from tasks.report import comparison, int8_comparison
    from tasks.stages import specs

    cfg = load_config(None, {})
    evals = {}
    for name, s in specs(cfg).items():
        acc = 0.90 + 0.001 * (s.seed or 0)
        evals[name] = {"test_acc": acc, "arch": "plain-2", "int8_test_acc": acc - (0.004 if s.method == "FT" else 0.001)}
    table = int8_comparison(cfg, evals)
    assert [r["variant"] for r in table["rows"]] == ["fp32", "ptq", "qad", "qad_fp32"]
    by = {(c["a"], c["b"]): c for c in table["contrasts"]}
    assert by[("qad", "ptq")]["mean"] == pytest.approx(0.003) and by[("ptq", "fp32")]["mean"] == pytest.approx(-0.004)
    assert by[("qad", "ptq")]["n"] == len(cfg.student.seeds)
    off = load_config(None, {"quantize.qad_epochs": 0})
    assert [r["variant"] for r in int8_comparison(off, evals)["rows"]] == ["fp32", "ptq"]
    assert "takd_qad" not in {r["variant"] for r in comparison(off, evals)["rows"]}
    assert "takd_qad" in {r["variant"] for r in comparison(cfg, evals)["rows"]}
    assert int8_comparison(load_config(None, {"quantize.evaluate": False}), evals) is None


def test_preparing_qad_leaves_trainings_in_other_threads_alone():
    """The flow trains in threads: preparing QAD must not touch anything global (torch.fx tracing would)."""
    import threading

    from models import build_model

    other, x, errors, stop = build_model("plain-2", 1, 10, 28, seed=1), torch.randn(4, 1, 28, 28), [], threading.Event()

    def train_elsewhere():
        while not stop.is_set():
            try:
                other(x).sum().backward()
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(e))
                return

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often, as they would over a long training
    thread = threading.Thread(target=train_elsewhere)
    thread.start()
    try:
        for _ in range(10):
            QADModel(_with_batchnorm_statistics("plain-2"), torch.randn(2, 1, 28, 28))
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert errors == []


def test_fake_quantization_rounds_to_the_int8_grid_and_resumes_its_ranges():
    """Activations land on 256 levels spanning the observed range (0 included), weights on 255 symmetric levels
    per output channel; gradients pass straight through; a saved range loads into a fresh model (a resumed or
    best-epoch QAD training)."""
    act = FakeQuant.activation()
    x = torch.linspace(-1.0, 3.0, 1000, requires_grad=True)
    y = act(x)
    scale = 4.0 / 255
    assert torch.allclose(torch.round(y.detach() / scale) * scale, y.detach(), atol=1e-6)
    assert len(torch.unique(y.detach())) <= 256 and (y.detach() - x.detach()).abs().max() <= scale / 2 + 1e-6
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))

    weight = FakeQuant.weight()
    w = torch.stack([torch.linspace(-0.5, 0.2, 500), torch.linspace(-2, 8, 500)])
    q = weight(w)
    for row, got, span in zip(w, q, (0.5, 8.0)):
        step = span / 127
        assert torch.allclose(torch.round(got / step) * step, got, atol=1e-6) and (got - row).abs().max() <= step / 2 + 1e-6

    model = build_model("plain-2", 1, 10, 28, seed=0)
    qad = QADModel(model, torch.randn(2, 1, 28, 28)).train()
    qad(torch.randn(8, 1, 28, 28))
    fresh = QADModel(model, torch.randn(2, 1, 28, 28))
    fresh.load_state_dict(qad.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(fresh.eval()(x), qad.eval()(x))
