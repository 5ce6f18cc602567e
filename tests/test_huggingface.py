"""Hugging Face save_pretrained directories (igd.models.huggingface): a small ViT and a
small ConvNeXt with random weights, saved with their image processors; no network.

What igd attributes equals the processor's pixel_values (its PIL backend, the same
resampler: <= 1e-6), IG equals captum on ``model(pixel_values=x).logits``, targets go by
id2label name, through the real daemon, igctl and ``igd batch``; each mistake gets its message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import transformers  # the igd[hf] extra; `make test` installs it

from captum.attr import IntegratedGradients  # noqa: E402

from daemon import IGD, Igd  # noqa: E402
from reference import read_result  # noqa: E402
from igd.engine.attribution import attribute  # noqa: E402
from igd.models.checkpoints import ModelError  # noqa: E402
from igd.models.huggingface import is_saved_model, translate, verify  # noqa: E402
from igd.models.preprocessing import Preprocessing  # noqa: E402
from igd.models.registry import LoadedModel, UnknownClass, load_model  # noqa: E402

LABELS = {0: "tabby", 1: "teapot", 2: "golden retriever"}
TARGET = "golden retriever"
MAJOR = int(transformers.__version__.split(".")[0])
PIL_BACKEND = {"backend": "pil"} if MAJOR >= 5 else {"use_fast": False}


def _labels() -> dict[str, object]:
    return {"num_labels": len(LABELS), "id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}


def save_vit(directory: Path) -> Path:
    """ViT on 32x32 (8x8 patches, 2 layers of width 32), stretched like ViTImageProcessor does."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, **_labels())
    transformers.ViTForImageClassification(config).save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def save_convnext(directory: Path) -> Path:
    """ConvNeXt (2 stages, widths 8 and 16) on 64x64: shorter side to int(64 / 0.875) = 73,
    bicubic, centre crop: ConvNextImageProcessor's crop_pct rule."""
    torch.manual_seed(1)
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **_labels())
    transformers.ConvNextForImageClassification(config).save_pretrained(directory)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875).save_pretrained(directory)
    return directory


SAVERS = {"vit": save_vit, "convnext": save_convnext}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: save(root / name) for name, save in SAVERS.items()}


@pytest.fixture(scope="module")
def chelsea(fixtures: Path) -> Path:
    return fixtures / "images" / "chelsea.png"


def pixel_values(directory: Path, image: Image.Image, **backend: object) -> torch.Tensor:
    """The reference: the directory's own image processor, loaded by transformers."""
    processor = transformers.AutoImageProcessor.from_pretrained(directory, local_files_only=True, **(backend or PIL_BACKEND))
    return processor(image, return_tensors="pt")["pixel_values"]


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", SAVERS)
def test_the_input_is_the_processors_pixel_values(saved: dict[str, Path], chelsea: Path, name: str) -> None:
    directory = saved[name]
    model = load_model(model=str(directory))
    image = rgb(chelsea)
    reference = pixel_values(directory, image)
    ours = model.preprocess(image)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-6
    # A portrait, a small image (upsampled), and for ConvNeXt a margin of 107 - 64 = 43 (3 mod 4)
    # on the longer side: transformers floors the crop offset to 21, torchvision would round to 22.
    for other in (image.crop((40, 0, 240, 290)), image.resize((23, 19)), image.crop((0, 0, 440, 300))):
        assert (model.preprocess(other) - pixel_values(directory, other)).abs().max() <= 1e-6
    assert model.family == "huggingface" and model.class_names == tuple(LABELS.values())
    assert model.classes_source == f"id2label of {directory / 'config.json'}"
    assert model.source == str(directory / "model.safetensors")
    assert model.weights_sha256 == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert model.preprocessing.origin == f"Hugging Face image processor ({directory})"
    assert model.preprocessing.interpolation == {"vit": "bilinear", "convnext": "bicubic"}[name]
    if MAJOR >= 5:
        # transformers 5's default backend resizes uint8 tensors with torchvision, not PIL:
        # it rounds a few values one uint8 level (1/255/std = 0.0078 here) the other way.
        fast = pixel_values(directory, image, backend="torchvision")
        apart = (ours - fast).abs()
        assert apart.max() <= 1.01 * 2 / 255 and (apart > 1e-6).float().mean() < 0.01


@pytest.mark.parametrize("name", SAVERS)
def test_integrated_gradients_equal_captums(saved: dict[str, Path], chelsea: Path, name: str) -> None:
    loaded = load_model(model=str(saved[name]))
    x = loaded.preprocess(rgb(chelsea))
    target = loaded.class_index(TARGET)
    ours = attribute(loaded.module, x, target, n_steps=16)
    # captum on the model as transformers loads it, independently of igd's loader
    model = transformers.AutoModelForImageClassification.from_pretrained(saved[name], local_files_only=True).eval()
    theirs = IntegratedGradients(lambda inputs: model(pixel_values=inputs).logits).attribute(
        x, target=target, n_steps=16, method="gausslegendre"
    )
    assert theirs.abs().sum() > 0
    assert rel_l2(ours.integrated_grads, theirs) <= 1e-5
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(pixel_values=x).logits, rtol=0, atol=1e-6)


def test_targets_by_id2label_name(saved: dict[str, Path]) -> None:
    loaded: LoadedModel = load_model(model=f"hf:{saved['vit']}")  # the hf: prefix says the same
    assert [loaded.class_index(n) for n in ("tabby", "Golden Retriever", "teapot", "2")] == [0, 2, 1, 2]
    with pytest.raises(UnknownClass, match=r"\(3 classes: 'tabby', 'teapot', 'golden retriever'\); "
                                           "did you mean 'golden retriever'"):
        loaded.class_index("retriever")
    assert loaded.name == "vit" and "ViTForImageClassification" in loaded.description


@pytest.mark.slow  # a daemon of its own
def test_served_and_asked_by_igctl(saved: dict[str, Path], chelsea: Path, tmp_path: Path) -> None:
    directory = saved["convnext"]
    with Igd("--model", str(directory), "--max-batch", "8") as igd:
        run = igd.igctl("attribute", str(chelsea), TARGET, "-o", str(tmp_path / "out.gzip"), "--steps", "8")
        assert run.returncode == 0, run.stderr
        status = json.loads(igd.igctl("status", "--json").stdout)
    result = read_result(tmp_path / "out.gzip")
    assert result["target_name"] == TARGET and result["target_class"] == 2
    assert (result["input"] - pixel_values(directory, rgb(chelsea))).abs().max() <= 1e-6
    assert tuple(result["integrated_grads"].shape) == (1, 3, 64, 64)
    assert result["weights_sha256"] == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert status["model"]["family"] == "huggingface"
    assert status["model"]["preprocessing"] == "resize shorter side to 73 (bicubic), centre-crop 64x64 (offsets floored)"


@pytest.mark.slow  # igd batch processes of its own
def test_igd_batch_over_a_folder(saved: dict[str, Path], chelsea: Path, tmp_path: Path) -> None:
    directory = saved["vit"]
    images = tmp_path / "images"
    images.mkdir()
    photo = rgb(chelsea)
    variants = {"chelsea.png": photo, "flipped.png": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                "portrait.png": photo.crop((100, 0, 300, 300))}
    for file, image in variants.items():
        image.save(images / file)
    out = tmp_path / "out"
    run = subprocess.run([IGD, "batch", str(images), str(out), "--model", str(directory), "-t", TARGET,
                          "--steps", "8", "--max-batch", "8"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "3 pairs: 3 done now, 0 done before, 0 failed" in run.stdout
    records = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["ok"] and r["target_name"] == TARGET for r in records)
    for record in records:
        result = read_result(out / record["output"])
        expected = pixel_values(directory, rgb(images / record["id"]))
        assert (result["input"] - expected).abs().max() <= 1e-6, record["id"]


# ---- mistakes: each gets its message, before anything runs -----------------------------------------


def copy_without(saved: Path, tmp_path: Path, *names: str) -> Path:
    directory = tmp_path / f"{saved.name}-copy"
    shutil.copytree(saved, directory)
    for name in names:
        (directory / name).unlink()
    return directory


def test_a_directory_without_config_json_says_what_one_holds(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_without(saved["vit"], tmp_path, "config.json")
    assert not is_saved_model(directory) and is_saved_model(saved["vit"])
    with pytest.raises(ModelError) as error:
        load_model(model=f"hf:{directory}")
    message = str(error.value)
    assert f"{directory} is not a Hugging Face save_pretrained directory: it has no config.json" in message
    assert all(part in message for part in ("id2label", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json"))
    with pytest.raises(ModelError, match="no such directory"):
        load_model(model=f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(ModelError, match="is a file, not a Hugging Face save_pretrained directory; give the directory"):
        load_model(model=f"hf:{saved['vit'] / 'model.safetensors'}")


def test_a_missing_preprocessor_config_is_named(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_without(saved["vit"], tmp_path, "preprocessor_config.json")
    with pytest.raises(ModelError, match=r"has no preprocessor_config.json: igd takes the model's preprocessing .* "
                                         r"never guesses it; .*image_processor.save_pretrained\(DIR\)"):
        load_model(model=str(directory))


def test_missing_weights_are_named(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_without(saved["vit"], tmp_path, "model.safetensors")
    with pytest.raises(ModelError, match="has config.json but no weights; a save_pretrained directory holds"):
        load_model(model=str(directory))


def test_weights_do_not_go_with_a_directory(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"--weights does not go with a Hugging Face directory: .* holds its own weights"):
        load_model(model=str(saved["vit"]), weights=saved["vit"] / "model.safetensors")


def test_remote_code_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_without(saved["vit"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_mine.MyNet"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="needs its own Python code .* igd never runs a model's own code"):
        load_model(model=str(directory))


def test_a_model_without_its_classifier_is_not_half_loaded(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = tmp_path / "backbone"
    config = transformers.ViTConfig.from_pretrained(saved["vit"])
    transformers.ViTModel(config).save_pretrained(directory)  # the backbone only: no classifier weights
    shutil.copy(saved["vit"] / "preprocessor_config.json", directory)
    with pytest.raises(ModelError, match=r"the weights do not fill ViTForImageClassification: 2 weights missing "
                                         r"\(classifier.bias, classifier.weight\).* igd refuses"):
        load_model(model=str(directory))


def test_a_config_that_is_no_image_classifier(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = copy_without(saved["vit"], tmp_path)
    (directory / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelError, match="transformers cannot load an image classifier from it"):
        load_model(model=str(directory))


def test_a_timm_directory_is_sent_to_timm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is timm's \(architecture resnet18\), not a transformers config: use "
                                         r"--model timm:resnet18 --weights .*model.safetensors"):
        load_model(model=str(tmp_path))


def test_without_transformers_the_extra_is_named(saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ModelError, match=r"needs transformers: pip install 'igd\[hf\]'"):
        load_model(model=str(saved["vit"]))


class Processor:
    """An image processor's attributes, as translate() reads them."""

    do_resize, do_rescale, do_normalize = True, True, True
    rescale_factor, resample = 1 / 255, 2
    image_mean, image_std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self, **settings: object) -> None:
        self.size = {"height": 32, "width": 32}
        self.__dict__.update(settings)


@pytest.mark.parametrize("settings,message", [
    ({"rescale_factor": 1 / 127.5}, "rescale_factor 0.00784313725490196 is not 1/255"),
    ({"do_rescale": False}, "do_rescale is off"),
    ({"resample": 4}, "resample box is not one igd has"),
    ({"size": {"shortest_edge": 224}}, "without a centre crop gives each image its own input size"),
    ({"size": {"shortest_edge": 200}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}, "it would pad"),
    ({"do_center_crop": True, "crop_size": {"height": 40, "width": 40}}, "crop_size 40x40 is larger than the resized 32x32"),
    ({"do_center_crop": True, "crop_size": {"height": 16, "width": 28}}, "keeps a different fraction of each side"),
    ({"size": {"shortest_edge": 224, "longest_edge": 1333}}, "is not a rule igd reproduces"),
    ({"do_pad": True}, "do_pad pads images"),
    ({"do_resize": False}, "do_resize is off"),
])
def test_processor_settings_igd_cannot_reproduce_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        translate(Processor(**settings), "test", "DIR: Processor")


PROCESSORS = {  # processor class, its settings, the Preprocessing igd makes of it
    # the common ImageNet rule (CLIP, BiT, DINOv2 processors): shorter side, then a centre crop
    "BitImageProcessor": ({"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "resample": 3},
                          ("crop", 40, None, (32, 32))),
    # DeiT: stretch, then a centre crop (margin 7: transformers' offset 3, torchvision's round(3.5) = 4)
    "DeiTImageProcessor": ({"size": {"height": 71, "width": 71}, "crop_size": {"height": 64, "width": 64}},
                           ("stretch", None, 64 / 71, (64, 64))),
}


@pytest.mark.parametrize("name", PROCESSORS)
def test_processors_with_a_centre_crop(name: str, tmp_path: Path, fixtures: Path) -> None:
    settings, (resize, resize_to, crop_pct, input_size) = PROCESSORS[name]
    processor = getattr(transformers, name)(**settings)
    preprocessing = translate(processor, "test", "test")
    assert (preprocessing.resize, preprocessing.resize_to, preprocessing.input_size) == (resize, resize_to, input_size)
    assert preprocessing.crop_pct == pytest.approx(crop_pct, abs=1e-12) if crop_pct else preprocessing.crop_pct is None
    image = rgb(fixtures / "images" / "coffee.png")
    processor.save_pretrained(tmp_path)
    for picture in (image, image.transpose(Image.Transpose.ROTATE_90), image.crop((0, 0, 203, 150))):
        assert (preprocessing(picture) - pixel_values(tmp_path, picture)).abs().max() <= 1e-6


def test_centre_crop_offsets_are_floored_as_transformers_does(saved: dict[str, Path]) -> None:
    """transformers crops at (size - crop) // 2; torchvision's CenterCrop (igd's Preprocessing)
    rounds half to even. The load-time check catches the difference: a plain Preprocessing
    with the same settings is refused, with the difference measured."""
    processor = transformers.AutoImageProcessor.from_pretrained(saved["convnext"], local_files_only=True, **PIL_BACKEND)
    ours = translate(processor, "test", "test")
    verify(processor, ours, "test")
    plain = Preprocessing(ours.input_size, ours.mean, ours.std, resize="crop", resize_to=ours.resize_to,
                          interpolation=ours.interpolation)
    with pytest.raises(ModelError, match=r"igd cannot reproduce this processor exactly: on a \d+x\d+ test image its "
                                         r"pixel_values differ from igd's \(resize shorter side to 73 \(bicubic\)"):
        verify(processor, plain, "test")
