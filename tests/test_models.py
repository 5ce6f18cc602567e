"""Models: the predecessor's checkpoints compute what the original code did; the default
model is a real classifier; bring-your-own works; bad files get clear errors."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from PIL import Image

from igd.engine.attribution import attribute
from igd.models import CIFAR10_CLASSES, ModelError, UnknownClass, load_model, resolve_device
from igd.models.bit import ResNetV2
from igd.models.lanet import NetworkCIFAR
from igd.output.results import result_dict
from reference import assert_reproduces

CAT = 3


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def chelsea(fixtures: Path) -> Image.Image:
    return Image.open(fixtures / "images" / "chelsea.png").convert("RGB")


@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_fixture_checkpoints_reproduce_the_original_code(fixtures: Path, family: str) -> None:
    model = load_model(**{f"{family}_path": fixtures / f"{family}-tiny.pth"})
    reference = np.load(fixtures / f"{family}-tiny.reference.npz")
    x = model.preprocess(chelsea(fixtures))
    assert np.abs(x.numpy() - reference["input"]).max() < 1e-6
    with torch.no_grad():
        logits = model.module(x).numpy()
    assert rel_l2(logits, reference["logits"]) < 1e-5
    result = attribute(model.module, x, CAT, n_steps=50, rule="gausslegendre")
    assert_reproduces(result_dict(result), reference)
    assert model.class_names == CIFAR10_CLASSES
    assert model.input_shape == (3, 32, 32)
    assert not model.module.training
    assert not any(p.requires_grad for p in model.module.parameters())


def test_fixture_configurations_are_inferred(fixtures: Path) -> None:
    bit = load_model(bit_path=fixtures / "bit-tiny.pth")
    lanet = load_model(lanet_path=fixtures / "lanet-tiny.pth")
    facts = json.loads((fixtures / "fixtures.json").read_text())
    assert bit.name == "bit-r14x1" and bit.num_parameters == facts["bit-tiny"]["params"]
    assert lanet.name == "lanet-c16-l6"


def keys_table(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    rows = path.read_text().splitlines()[1:]
    table = []
    for row in rows:
        key, shape, dtype = row.split("\t")
        dims = tuple(int(d) for d in shape.split(",")) if shape else ()
        table.append((key, dims, dtype))
    return table


def our_table(state: dict[str, torch.Tensor], prefix: str = "") -> list[tuple[str, tuple[int, ...], str]]:
    return [(prefix + k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]


@pytest.mark.slow  # a full-size model
def test_full_size_bit_matches_the_original_checkpoint_layout(fixtures: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = ResNetV2((3, 4, 23, 3), 3, 10)
    state = net.state_dict()
    expected = keys_table(fixtures / "bit-s-r101x3.keys.tsv")
    assert our_table(state, "module.") == expected
    assert our_table(state) == [(k.removeprefix("module."), s, d) for k, s, d in expected]
    path = tmp_path / "bit-s-r101x3.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as DataParallel saved it
    del net
    loaded = load_model(bit_path=path)
    assert loaded.name == "bit-r101x3"
    assert loaded.num_parameters == json.loads((fixtures / "fixtures.json").read_text())["bit-s-r101x3"]["params"]
    assert torch.equal(loaded.module.state_dict()["head.conv.weight"], state["head.conv.weight"])


@pytest.mark.slow  # a full-size model
def test_full_size_lanet_matches_the_original_checkpoint_layout(fixtures: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = NetworkCIFAR(128, 10, 24, auxiliary=True)
    state = net.state_dict()
    assert our_table(state) == keys_table(fixtures / "lanet-c128-l24.keys.tsv")
    path = tmp_path / "lanet.pth"
    torch.save({"epoch": 600, "model_state_dict": state, "optimizer_state_dict": {}, "best_acc_top1": 99.03}, path)
    loaded = load_model(lanet_path=path)
    assert loaded.name == "lanet-c128-l24"
    assert loaded.num_parameters == json.loads((fixtures / "fixtures.json").read_text())["lanet-c128-l24"]["params"]


def test_bit_checkpoint_without_prefix_loads(fixtures: Path, tmp_path: Path) -> None:
    state = torch.load(fixtures / "bit-tiny.pth", weights_only=True)
    path = tmp_path / "plain.pth"
    torch.save({k.removeprefix("module."): v for k, v in state.items()}, path)
    assert load_model(bit_path=path).name == "bit-r14x1"


@pytest.fixture(scope="module")
def default_model():
    return load_model()


@pytest.mark.parametrize(
    "image,expected",
    [("chelsea.png", {"tiger cat", "Egyptian cat", "tabby"}), ("coffee.png", {"espresso"})],
)
def test_default_model_recognises_the_photos(default_model, fixtures: Path, image: str, expected: set[str]) -> None:
    x = default_model.preprocess(Image.open(fixtures / "images" / image).convert("RGB"))
    with torch.no_grad():
        top = default_model.top_classes(default_model.module(x)[0], 3)
    assert top[0][1] in expected
    if image == "coffee.png":
        assert top[0][2] > 0.9
    else:
        assert {name for _, name, _ in top} == expected


@pytest.mark.slow  # a full-size model
def test_default_model_ig_agrees_with_captum(default_model, fixtures: Path) -> None:
    x = default_model.preprocess(chelsea(fixtures))
    with torch.no_grad():
        target = int(default_model.module(x).argmax())
    # 16 steps, in chunks of 10 (10 + 6 for captum): the same check as at 50, a third of the passes
    ours = attribute(default_model.module, x, target, n_steps=16, max_batch=10)
    theirs = IntegratedGradients(default_model.module).attribute(
        x, target=target, n_steps=16, internal_batch_size=10
    )
    assert rel_l2(ours.integrated_grads.numpy(), theirs.numpy()) < 1e-4


def test_default_model_facts(default_model) -> None:
    assert default_model.name == "efficientnet-lite0"
    assert len(default_model.class_names) == 1000
    assert default_model.input_shape == (3, 224, 224)
    assert default_model.class_index("Tiger Cat") == 282
    assert default_model.class_index("282") == 282
    with pytest.raises(UnknownClass, match="did you mean 'espresso'"):
        default_model.class_index("expresso")
    with pytest.raises(UnknownClass, match="out of range"):
        default_model.class_index(1000)


# --- bring your own model ---------------------------------------------------------


class SmallNet(torch.nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


SIDECAR = {"input_size": [20, 24], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2],
           "classes": ["ant", "bee", "cat", "dog"]}


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_own_program_with_sidecar(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    net = SmallNet().eval()
    if kind == "torchscript":
        path = tmp_path / "net.pt"
        torch.jit.script(net).save(str(path))
    else:
        path = tmp_path / "net.pt2"
        batch = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
        program = torch.export.export(net, (torch.zeros(2, 3, 20, 24),), dynamic_shapes=batch)
        torch.export.save(program, str(path))
    (tmp_path / f"{path.name}.json").write_text(json.dumps(SIDECAR))
    model = load_model(model=str(path))
    assert model.family == ("torchscript" if kind == "torchscript" else "torch.export")
    assert model.class_names == ("ant", "bee", "cat", "dog")
    assert model.input_shape == (3, 20, 24)
    x = torch.randn(2, 3, 20, 24)
    ours = attribute(model.module, x, [1, 2], n_steps=8)
    eager = attribute(net, x, [1, 2], n_steps=8)
    torch.testing.assert_close(ours.integrated_grads, eager.integrated_grads, rtol=1e-5, atol=1e-6)


def test_exported_program_with_a_fixed_batch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(SmallNet().eval(), (torch.zeros(1, 3, 20, 24),)), str(path))
    (tmp_path / "fixed.json").write_text(json.dumps(SIDECAR))
    with pytest.raises(ModelError, match="must accept any batch size"):
        load_model(model=str(path))


def test_toml_sidecar_and_classes_file(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.jit.script(SmallNet().eval()).save(str(path))
    (tmp_path / "names.txt").write_text("one\ntwo\n\nthree\nfour\n")
    (tmp_path / "net.toml").write_text(
        'input_size = [16, 16]\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n'
        'resize = "crop"\nclasses_file = "names.txt"\n'
    )
    model = load_model(model=str(path))
    assert model.class_names == ("one", "two", "three", "four")
    assert model.preprocessing.resize == "crop"


def test_torchvision_architecture_with_state_dict(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "resnet18-7.pth"
    torch.save(net.state_dict(), path)
    with pytest.raises(ModelError, match="7 outputs and no class names"):
        load_model(model="resnet18", weights=path)
    model = load_model(model="resnet18", weights=path, index_names=True)
    assert model.class_names[-1] == "class_6" and model.input_shape == (3, 224, 224)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(7)))
    assert load_model(model="resnet18", weights=path, classes_file=names).class_names[2] == "kind 2"


def test_classes_file_must_match_the_head(fixtures: Path, tmp_path: Path) -> None:
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(ModelError, match="names 3 classes, but the model has 10 outputs"):
        load_model(bit_path=fixtures / "bit-tiny.pth", classes_file=names)
    names.write_text("\n".join(f"c{i}" for i in range(10)))
    assert load_model(bit_path=fixtures / "bit-tiny.pth", classes_file=names).class_names[3] == "c3"


def test_program_without_sidecar_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.jit.script(SmallNet()).save(str(path))
    with pytest.raises(ModelError, match="needs a sidecar"):
        load_model(model=str(path))


# --- bad inputs -------------------------------------------------------------------


def test_random_bytes(tmp_path: Path) -> None:
    # CI once drew random bytes that torch's weights-only unpickler failed on with an IndexError
    # (NEWOBJ on an empty stack): that one, and 300 seeded draws, all said the same.
    draws = [b"\x80\x02\x81" + bytes(64)] + [random.Random(seed).randbytes(4096) for seed in range(300)]
    path = tmp_path / "random.pth"
    for data in draws:
        path.write_bytes(data)
        with pytest.raises(ModelError, match=f"{path}: not a PyTorch checkpoint"):
            load_model(bit_path=path)


def test_truncated_checkpoint(fixtures: Path, tmp_path: Path) -> None:
    data = (fixtures / "lanet-tiny.pth").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=f"{path}: the checkpoint is truncated or corrupt"):
        load_model(lanet_path=path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="is empty"):
        load_model(bit_path=empty)
    with pytest.raises(ModelError, match="no such file"):
        load_model(lanet_path=tmp_path / "missing.pth")


def test_state_dict_of_another_architecture(fixtures: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a BiT ResNetV2 state dict"):
        load_model(bit_path=fixtures / "lanet-tiny.pth")
    with pytest.raises(ModelError, match="not a LaNet state dict"):
        load_model(lanet_path=fixtures / "bit-tiny.pth")


def test_bit_checkpoint_with_damaged_tensors_names_the_keys(fixtures: Path, tmp_path: Path) -> None:
    state = torch.load(fixtures / "bit-tiny.pth", weights_only=True)
    state["module.body.block2.unit01.conv2.weight"] = torch.zeros(3, 3, 3, 3)
    del state["module.body.block3.unit01.gn1.bias"]
    state["module.extra.weight"] = torch.zeros(1)
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    with pytest.raises(ModelError) as error:
        load_model(bit_path=path)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: body.block3.unit01.gn1.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "body.block2.unit01.conv2.weight (3, 3, 3, 3) (expected (128, 128, 3, 3))" in message


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # runs at unpickling time, if anything unpickles it
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, path)
    with pytest.raises(ModelError, match="refused: the checkpoint holds Python objects"):
        load_model(lanet_path=path)
    assert not marker.exists()


def test_one_source_only_and_devices(fixtures: Path) -> None:
    with pytest.raises(ModelError, match="give one model source"):
        load_model(bit_path=fixtures / "bit-tiny.pth", lanet_path=fixtures / "lanet-tiny.pth")
    with pytest.raises(ModelError, match="neither a model file nor a torchvision"):
        load_model(model="no-such-net")
    with pytest.raises(ModelError, match="; did you mean resnet18"):
        load_model(model="resnet-18")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device"):
        resolve_device("tpu:9")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_preprocessing_halves_compose(fixtures: Path) -> None:
    model = load_model(lanet_path=fixtures / "lanet-tiny.pth")
    image = chelsea(fixtures)
    pixels = model.preprocessing.to_pixels(image)
    assert pixels.shape == (1, 3, 32, 32) and 0 <= pixels.min() and pixels.max() <= 1
    torch.testing.assert_close(model.preprocessing.normalize(pixels), model.preprocess(image))


@pytest.mark.parametrize("family", ["bit", "lanet"])
def test_standardised_weights_are_cached_only_while_frozen(family: str) -> None:
    from igd.models.bit import StdConv2d
    from igd.models.lanet import UnbiasedStdConv2d

    torch.manual_seed(0)
    conv = (StdConv2d if family == "bit" else UnbiasedStdConv2d)(4, 8, 3, bias=False)
    x = torch.randn(2, 4, 9, 9)
    conv.eval().weight.requires_grad_(False)
    first = conv(x)
    cached = conv._cached[1]
    torch.testing.assert_close(cached, conv.standardize(conv.weight))
    assert torch.equal(conv(x), first) and conv._cached[1] is cached  # reused
    with torch.no_grad():
        conv.weight.mul_(-2.0).add_(0.1)  # an in-place update bumps the version
    after = conv(x)
    assert conv._cached[1] is not cached
    torch.testing.assert_close(after, torch.nn.functional.conv2d(x, conv.standardize(conv.weight)))
    conv.train().weight.requires_grad_(True)
    conv(x).sum().backward()  # training: standardised on the fly, differentiably
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_loaded_models_fold_standardisation_without_changing_results(fixtures: Path) -> None:
    from igd.models.bit import ResNetV2
    from igd.models.standardized import StandardizedConv2d

    model = load_model(bit_path=fixtures / "bit-tiny.pth")
    state = {k.removeprefix("module."): v for k, v in torch.load(fixtures / "bit-tiny.pth", weights_only=True).items()}
    plain = ResNetV2((1, 1, 1, 1), 1, 10).eval()
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    convolutions = [m for m in model.module.modules() if isinstance(m, StandardizedConv2d)]
    assert convolutions and all(conv.folded for conv in convolutions)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), plain(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="folded for inference"):
        model.module.train()(x)


def test_serving_a_checkpoint_never_imports_torchvision(fixtures: Path) -> None:
    """Importing torchvision costs seconds of CPU (its ops import torch._dynamo): the daemon,
    a fixture checkpoint's loading, preprocessing and a straight-line attribution do without
    it (the geometry is Pillow's, equal to torchvision's: tests/test_model_files.py)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "import igd.serve.daemon, igd.cli\n"
            "from PIL import Image\n"
            "from igd.engine.attribution import attribute\n"
            "from igd.models import load_model\n"
            f"model = load_model(lanet_path={str(fixtures / 'lanet-tiny.pth')!r})\n"
            f"x = model.preprocess(Image.open({str(fixtures / 'images' / 'chelsea.png')!r}).convert('RGB'))\n"
            "attribute(model.module, x, 3, n_steps=4)\n"
            "print('torchvision' in sys.modules, 'torch._dynamo' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]
