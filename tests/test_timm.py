"""`--model timm:NAME --weights FILE`: timm architectures with the user's weights, timm's
own preprocessing and IG equal to captum's. Random weights, built here; nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import timm  # the igd[timm] extra; `make test` installs it
from captum.attr import IntegratedGradients  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402

from daemon import Igd  # noqa: E402
from igd.engine.attribution import attribute  # noqa: E402
from igd.models import ModelError, load_model  # noqa: E402
from reference import read_result  # noqa: E402

# One of each family the issue names: a ResNet, a ConvNeXt, a ViT (DeiT) and an EfficientNet.
NAMES = ("resnet18", "convnext_atto", "deit_tiny_patch16_224", "efficientnet_b0")
CLASSES = tuple(f"kind {i}" for i in range(10))
STEPS = 8


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def build(name: str, num_classes: int = len(CLASSES), seed: int = 0) -> torch.nn.Module:
    """A timm model with random weights, as a user's fine-tuning would leave it (random
    BatchNorm statistics too, so that normalisation layers do something)."""
    torch.manual_seed(seed)
    module = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    with torch.no_grad():
        for buffer_name, buffer in module.named_buffers():
            if buffer_name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif buffer_name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return module


class Saved:
    """A model built here and its weights saved as timm users save them."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.module = build(name)
        state = {key: value.contiguous() for key, value in self.module.state_dict().items()}
        self.pth = directory / f"{name}.pth"
        self.safetensors = directory / f"{name}.safetensors"
        torch.save(state, self.pth)
        save_file(state, str(self.safetensors))
        self.classes = directory / "classes.txt"
        self.classes.write_text("\n".join(CLASSES) + "\n")

    def weights(self, kind: str) -> Path:
        return self.pth if kind == "pth" else self.safetensors

    def reference_input(self, image: Image.Image) -> torch.Tensor:
        """timm's own eval transform of ``image`` for this model: what it would be fed."""
        return create_transform(**resolve_data_config({}, model=self.module))(image).unsqueeze(0)


@pytest.fixture(scope="module")
def chelsea(fixtures: Path) -> Image.Image:
    return Image.open(fixtures / "images" / "chelsea.png").convert("RGB")


@pytest.fixture(scope="module", params=NAMES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return Saved(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
def test_the_input_is_timms_transform_and_classes_come_from_the_file(saved: Saved, kind: str,
                                                                     chelsea: Image.Image) -> None:
    loaded = load_model(model=f"timm:{saved.name}", weights=saved.weights(kind), classes_file=saved.classes)
    assert (loaded.family, loaded.name) == ("timm", f"timm:{saved.name}")
    assert loaded.preprocessing.origin == f"timm data config ({saved.name})"
    assert loaded.preprocessing.interpolation == "bicubic"  # all four: timm's default configs
    ours, theirs = loaded.preprocess(chelsea), saved.reference_input(chelsea)
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert float((ours - theirs).abs().max()) <= 1e-6
    assert loaded.class_names == CLASSES and loaded.classes_source == str(saved.classes)
    assert loaded.class_index("Kind 7") == 7
    state = saved.module.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.module.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(theirs), saved.module(theirs))


def test_integrated_gradients_equal_captums_on_the_timm_module(saved: Saved, chelsea: Image.Image) -> None:
    loaded = load_model(model=f"timm:{saved.name}", weights=saved.safetensors, classes_file=saved.classes)
    x = loaded.preprocess(chelsea)
    with torch.no_grad():
        target = int(saved.module(x).argmax())
    ours = attribute(loaded.module, x, target, n_steps=STEPS, rule="gausslegendre")
    theirs = IntegratedGradients(saved.module).attribute(x, target=target, n_steps=STEPS, method="gausslegendre")
    assert theirs.abs().sum() > 0
    assert rel_l2(ours.integrated_grads, theirs) <= 1e-5


def test_a_thousand_outputs_are_imagenet_and_other_heads_need_names(tmp_path: Path) -> None:
    torch.save(build("test_resnet", num_classes=1000).state_dict(), tmp_path / "in1k.pth")
    loaded = load_model(model="timm:test_resnet", weights=tmp_path / "in1k.pth")
    assert len(loaded.class_names) == 1000 and loaded.class_names[282] == "tiger cat"
    assert loaded.preprocessing.interpolation == "bilinear" and loaded.input_shape == (3, 160, 160)
    torch.save(build("test_resnet", num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(ModelError, match=r"7 outputs and no class names; give --classes FILE"):
        load_model(model="timm:test_resnet", weights=tmp_path / "seven.pth")
    named = load_model(model="timm:test_resnet", weights=tmp_path / "seven.pth", index_names=True)
    assert named.class_names[6] == "class_6"


def test_a_pretrained_tag_picks_its_data_config(tmp_path: Path, fixtures: Path) -> None:
    """resnet18's default tag (a1_in1k) has bicubic at crop_pct 0.95; torchvision's
    weights (tv_in1k) bilinear at 0.875: the tag the user fine-tuned from decides."""
    image = Image.open(fixtures / "images" / "coffee.png").convert("RGB")
    module = build("resnet18.tv_in1k")
    torch.save({"model": module.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")  # a training checkpoint
    loaded = load_model(model="timm:resnet18.tv_in1k", weights=tmp_path / "checkpoint.pth", index_names=True)
    assert (loaded.preprocessing.interpolation, loaded.preprocessing.crop_pct) == ("bilinear", 0.875)
    reference = create_transform(**resolve_data_config({}, model=module))(image).unsqueeze(0)
    assert float((loaded.preprocess(image) - reference).abs().max()) <= 1e-6


def test_weights_as_timm_users_save_them(tmp_path: Path) -> None:
    """timm's train.py checkpoint (its args as an argparse.Namespace, EMA weights beside the
    model's), DataParallel's `module.` keys in a safetensors file named .pt, and the
    `_orig_mod.` keys of a torch.compile'd model's state dict."""
    import argparse

    module, ema = build("test_resnet", seed=1), build("test_resnet", seed=2)
    torch.save({"epoch": 9, "arch": "test_resnet", "state_dict": module.state_dict(), "state_dict_ema": ema.state_dict(),
                "args": argparse.Namespace(model="test_resnet", lr=0.1, mean=None), "version": 2, "metric": 61.5},
               tmp_path / "model_best.pth.tar")
    save_file({f"module.{key}": value.contiguous() for key, value in module.state_dict().items()},
              str(tmp_path / "renamed.pt"))
    torch.save({f"_orig_mod.{key}": value for key, value in module.state_dict().items()}, tmp_path / "compiled.pth")
    x = torch.randn(2, 3, 160, 160)
    for weights in ("model_best.pth.tar", "renamed.pt", "compiled.pth"):
        loaded = load_model(model="timm:test_resnet", weights=tmp_path / weights, index_names=True)
        with torch.no_grad():
            torch.testing.assert_close(loaded.module(x), module(x))


def test_squash_configs_stretch_as_timm_does(tmp_path: Path, chelsea: Image.Image) -> None:
    """crop_mode 'squash' (ConvNeXt and CLIP ViTs at 384): both sides resized to
    floor(size / crop_pct), then cropped. Only the transform is compared: the model is big."""
    from igd.models.timm_models import preprocessing_from

    for name in ("vit_medium_patch16_gap_384.sw_in12k_ft_in1k", "convnext_tiny.fb_in22k_ft_in1k_384"):
        config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        ours = preprocessing_from(config, name)(chelsea)
        theirs = create_transform(**config)(chelsea).unsqueeze(0)
        assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) <= 1e-6, name
        assert config["crop_mode"] == "squash" and config["input_size"] == (3, 384, 384), name


@pytest.mark.slow  # a daemon of its own
def test_a_daemon_serves_a_timm_model_and_attributes_timms_input(tmp_path: Path, fixtures: Path,
                                                                 chelsea: Image.Image) -> None:
    saved = Saved("resnet18", tmp_path)
    with Igd("--model", "timm:resnet18", "--weights", str(saved.pth), "--classes", str(saved.classes),
             "--max-batch", "8") as igd:
        out = igd.igctl("attribute", str(fixtures / "images" / "chelsea.png"), "kind 3", "-o", str(tmp_path / "out.gzip"),
                        "--steps", str(STEPS))
        assert out.returncode == 0, out.stderr.decode() + igd.log()
    result = read_result(tmp_path / "out.gzip")
    assert result["target_class"] == 3 and result["target_name"] == "kind 3"
    assert result["model"] == "timm:resnet18"
    reference = saved.reference_input(chelsea)
    assert float((result["input"].reshape(reference.shape) - reference).abs().max()) <= 1e-6
    with torch.no_grad():
        torch.testing.assert_close(result["output"].reshape(1, -1), saved.module(reference), rtol=1e-5, atol=1e-5)


# --- mistakes -----------------------------------------------------------------------


def test_an_unknown_name_suggests_timms_own(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"timm has no architecture 'resnet81'; did you mean .*resnet18"):
        load_model(model="timm:resnet81", weights=tmp_path / "never-read.pth")
    with pytest.raises(ModelError, match=r"convnext_atto has no pretrained tag 'nope' \(its tags: .*d2_in1k"):
        load_model(model="timm:convnext_atto.nope", weights=tmp_path / "never-read.pth")
    with pytest.raises(ModelError, match=r"hub ids and paths are not read \(igd never downloads\)"):
        load_model(model="timm:hf-hub:timm/resnet18.a1_in1k", weights=tmp_path / "never-read.pth")


def test_no_weights_is_refused() -> None:
    with pytest.raises(ModelError, match=r"^timm:resnet18 needs --weights FILE; igd never downloads weights$"):
        load_model(model="timm:resnet18")


def test_weights_of_another_architecture_say_what_does_not_fit(tmp_path: Path) -> None:
    torch.save(build("test_resnet").state_dict(), tmp_path / "resnet.pth")
    # No head where a ConvNeXt has one (head.fc): load_strict lists what is missing and what is extra.
    with pytest.raises(ModelError, match=r"resnet\.pth does not fit timm's test_convnext: missing keys: stem\.0\.weight"
                                         r".*unexpected keys: conv1\.0\.weight"):
        load_model(model="timm:test_convnext", weights=tmp_path / "resnet.pth")
    # The same head key (fc), another depth: the head is read, the body does not fit.
    torch.save(build("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ModelError, match=r"does not fit timm's resnet34 with 10 classes: missing keys: layer1\.2\.conv1"):
        load_model(model="timm:resnet34", weights=tmp_path / "resnet18.pth")


def test_without_timm_the_message_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(ModelError, match=r"needs the timm library: pip install 'igd\[timm\]'"):
        load_model(model="timm:resnet18", weights=tmp_path / "w.pth")
