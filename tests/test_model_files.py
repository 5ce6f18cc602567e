"""Model files told apart by content, preprocessing that says what timm and Hugging Face say
(interpolation, crop_pct), sidecar keys in other libraries' spellings, safetensors weights,
and the message each mistake gets. Random weights built here; nothing downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from test_models import Exploit  # a pickle that runs a command if anything unpickles it
from igd.models import ModelError, Preprocessing, load_model
from igd.models import identify as kinds
from igd.models.checkpoints import read_checkpoint
from igd.models.custom import SIDECAR_ALIASES, load_file, read_sidecar
from igd.models.identify import foreign_layout, identify

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def chelsea(fixtures: Path) -> Image.Image:
    return Image.open(fixtures / "images" / "chelsea.png").convert("RGB")


class SmallNet(torch.nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def small_torchvision(path: Path) -> torch.nn.Module:
    """shufflenet_v2_x0_5 (0.3 M parameters) with 5 classes and random weights, saved as a state dict."""
    torch.manual_seed(0)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=5).eval()
    torch.save(net.state_dict(), path)
    return net


# --- preprocessing ------------------------------------------------------------------------


TIMM_CONFIGS = [
    # (input_size, interpolation, crop_pct, crop_mode)
    ((224, 224), "bicubic", 0.95, "center"),  # ConvNeXt-style
    ((224, 224), "bicubic", 0.9, "center"),  # ViT/DeiT-style
    ((224, 224), "bicubic", 0.875, "center"),  # EfficientNet-style
    ((224, 224), "bilinear", 1.0, "center"),
    ((192, 256), "bicubic", 0.9, "center"),  # non-square: timm's ResizeKeepRatio
    ((256, 192), "lanczos", 0.95, "center"),
    ((224, 224), "nearest", 1.15, "center"),  # VOLO: the crop is larger than the resized image
    ((224, 224), "bicubic", 0.95, "squash"),  # resize="stretch" + crop_pct
]


@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
@pytest.mark.parametrize("config", TIMM_CONFIGS, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-{c[2]}-{c[3]}")
def test_interpolation_and_crop_pct_equal_timms_transform(fixtures: Path, config: tuple, portrait: bool) -> None:
    size, interpolation, crop_pct, crop_mode = config
    image = chelsea(fixtures)
    image = image.transpose(Image.Transpose.TRANSPOSE) if portrait else image
    cfg = {"input_size": (3, *size), "interpolation": interpolation, "crop_pct": crop_pct,
           "crop_mode": crop_mode, "mean": MEAN, "std": STD}
    reference = timm.data.create_transform(**cfg)(image).unsqueeze(0)
    ours = Preprocessing(size, MEAN, STD, resize="stretch" if crop_mode == "squash" else "crop",
                         interpolation=interpolation, crop_pct=crop_pct)(image)
    assert ours.shape == reference.shape == (1, 3, *size)
    assert (ours - reference).abs().max().item() <= 1e-6


def test_a_timm_models_own_data_config(fixtures: Path) -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.9
    image = chelsea(fixtures)
    ours = Preprocessing(tuple(cfg["input_size"][1:]), tuple(cfg["mean"]), tuple(cfg["std"]), resize="crop",
                         interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], origin="timm data config")
    reference = timm.data.create_transform(**cfg)(image).unsqueeze(0)
    assert (ours(image) - reference).abs().max().item() <= 1e-6
    # timm floors 224 / 0.9 = 248.9 (the old rule's round() gave 249)
    assert ours.describe() == "resize shorter side to 248 (bicubic), centre-crop 224x224 (crop_pct 0.9)"


def test_existing_bilinear_preprocessing_is_unchanged(fixtures: Path) -> None:
    image = chelsea(fixtures)
    normalize = transforms.Normalize(MEAN, STD)
    crop = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    ours = Preprocessing((224, 224), MEAN, STD, resize="crop", resize_to=256)
    assert torch.equal(ours(image), crop(image).unsqueeze(0))
    default = transforms.Compose([transforms.Resize(round(200 / 0.875)), transforms.CenterCrop(200),
                                  transforms.ToTensor(), normalize])
    assert torch.equal(Preprocessing((200, 200), MEAN, STD, resize="crop")(image), default(image).unsqueeze(0))
    stretch = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(), normalize])
    assert torch.equal(Preprocessing((32, 32), MEAN, STD)(image), stretch(image).unsqueeze(0))
    # what people and provenance read, as before
    assert ours.describe() == "resize shorter side to 256, centre-crop 224x224"
    assert Preprocessing((32, 32), MEAN, STD).describe() == "resize to 32x32"
    assert (ours.interpolation, ours.crop_pct, ours.origin) == ("bilinear", None, "built-in")
    # origin is a field for people, not part of what the preprocessing does
    assert ours == Preprocessing((224, 224), MEAN, STD, resize="crop", resize_to=256, origin="sidecar /x.json")
    # resize_to wins over crop_pct
    assert torch.equal(Preprocessing((224, 224), MEAN, STD, resize="crop", resize_to=256, crop_pct=0.5)(image),
                       ours(image))


def test_describe_names_interpolation_and_crop_pct() -> None:
    assert Preprocessing((32, 32), MEAN, STD, interpolation="nearest").describe() == "resize to 32x32 (nearest)"
    assert (Preprocessing((224, 224), MEAN, STD, resize="stretch", crop_pct=0.95, interpolation="bicubic").describe()
            == "resize to 235x235 (bicubic), centre-crop 224x224 (crop_pct 0.95)")
    assert (Preprocessing((192, 256), MEAN, STD, resize="crop", crop_pct=0.9).describe()
            == "resize to cover 213x284, centre-crop 192x256 (crop_pct 0.9)")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "cubic"}, "interpolation must be one of nearest, bilinear, bicubic, lanczos, got 'cubic'"),
        ({"interpolation": 3}, "interpolation must be one of"),
        ({"crop_pct": 0}, "crop_pct must be a fraction in"),
        ({"crop_pct": 87.5}, r"crop_pct must be a fraction in \(0, 2\] \(e.g. 0.875"),
        ({"crop_pct": True}, "crop_pct must be a fraction in"),
        ({"crop_pct": "0.9"}, "crop_pct must be a fraction in"),
        ({"origin": ""}, "origin must be a non-empty string"),
    ],
)
def test_new_fields_are_validated(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing((224, 224), MEAN, STD, resize="crop", **change)


def test_crop_offsets_floor_as_transformers_and_round_as_torchvision() -> None:
    """A side of 71 cropped to 64 leaves a margin of 7 (3 mod 4): transformers' floor puts
    the crop at 3, torchvision's CenterCrop at round(3.5) = 4."""
    image = Image.fromarray(torch.randint(0, 256, (64, 71, 3), generator=torch.Generator().manual_seed(0),
                                          dtype=torch.uint8).numpy(), "RGB")
    normalize = transforms.Normalize(MEAN, STD)
    # (resize, its setting, what it resizes to before the crop): the shorter side to 64, or a squash to 71x71
    paths = (("crop", {"resize_to": 64}, transforms.Resize(64)),
             ("stretch", {"crop_pct": 64 / 71}, transforms.Resize((71, 71))))
    for picture in (image, image.transpose(Image.Transpose.TRANSPOSE)):
        for resize, settings, resized in paths:
            pixels = transforms.ToTensor()(resized(picture))
            margin_h, margin_w = pixels.shape[1] - 64, pixels.shape[2] - 64
            assert margin_h % 4 == 3 or margin_w % 4 == 3
            top, left = margin_h // 2, margin_w // 2  # by hand: floor((size - crop) / 2)
            by_hand = normalize(pixels[:, top:top + 64, left:left + 64]).unsqueeze(0)
            centre = transforms.Compose([resized, transforms.CenterCrop(64), transforms.ToTensor(), normalize])
            floor = Preprocessing((64, 64), MEAN, STD, resize=resize, crop_offsets="floor", **settings)
            rounded = Preprocessing((64, 64), MEAN, STD, resize=resize, **settings)
            assert rounded.crop_offsets == "round" and rounded != floor
            assert torch.equal(floor(picture), by_hand)
            assert torch.equal(rounded(picture), centre(picture).unsqueeze(0))
            assert not torch.equal(by_hand, rounded(picture))  # the two rules do part here
            assert "offsets floored" in floor.describe() and "floor" not in rounded.describe()
    for wrong in ("ceil", "Floor", None, 0):
        with pytest.raises(ValueError, match=r"crop_offsets must be 'round' \(torchvision's and timm's centre crop\) "
                                             r"or 'floor' \(transformers'\), got"):
            Preprocessing((64, 64), MEAN, STD, resize="crop", crop_offsets=wrong)


# --- sidecars -------------------------------------------------------------------------------


def scripted(directory: Path, name: str = "net.pt") -> Path:
    path = directory / name
    torch.jit.script(SmallNet().eval()).save(str(path))
    return path


def test_sidecar_interpolation_crop_pct_and_origin(tmp_path: Path) -> None:
    path = scripted(tmp_path)
    sidecar = tmp_path / "net.pt.json"
    sidecar.write_text(json.dumps({"input_size": [24, 24], "resize": "crop", "interpolation": "bicubic",
                                   "crop_pct": 0.9, "mean": [0.5] * 3, "std": [0.25] * 3}))
    parts = load_file(path)
    assert parts.preprocessing == Preprocessing((24, 24), (0.5,) * 3, (0.25,) * 3, resize="crop",
                                                interpolation="bicubic", crop_pct=0.9)
    assert parts.preprocessing.origin == f"sidecar {sidecar}"
    assert parts.family == "torchscript"
    (tmp_path / "net.toml").write_text('input_size = [16, 16]\nmean = [0.5, 0.5, 0.5]\nstd = [0.2, 0.2, 0.2]\n'
                                       'interpolation = "lanczos"\ncrop_pct = 1\nresize = "crop"\n')
    read = read_sidecar(tmp_path / "net.toml", require_preprocessing=True)
    assert read.preprocessing is not None
    assert (read.preprocessing.interpolation, read.preprocessing.crop_pct) == ("lanczos", 1.0)
    assert read.preprocessing.origin == f"sidecar {tmp_path / 'net.toml'}"


@pytest.mark.parametrize("key", sorted(SIDECAR_ALIASES))
def test_sidecar_keys_in_other_spellings_get_igds(tmp_path: Path, key: str) -> None:
    whose, igds = SIDECAR_ALIASES[key]
    sidecar = tmp_path / "net.pt.json"
    sidecar.write_text(json.dumps({"input_size": [24, 24], "mean": [0.5] * 3, "std": [0.25] * 3, key: 1}))
    with pytest.raises(ModelError) as error:
        read_sidecar(sidecar, require_preprocessing=True)
    assert str(error.value) == f"{sidecar}: sidecar key {key!r} is {whose}'s spelling; igd's is {igds}"


def test_sidecar_spelling_examples(tmp_path: Path) -> None:
    sidecar = tmp_path / "net.json"
    sidecar.write_text(json.dumps({"input_size": [224, 224], "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    with pytest.raises(ModelError) as error:
        read_sidecar(sidecar, require_preprocessing=True)
    assert "sidecar key 'image_mean' is Hugging Face's spelling; igd's is 'mean'" in str(error.value)
    assert "sidecar key 'image_std' is Hugging Face's spelling; igd's is 'std'" in str(error.value)
    sidecar.write_text(json.dumps({"img_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3}))
    with pytest.raises(ModelError, match="'img_size' is timm's spelling; igd's is 'input_size'"):
        read_sidecar(sidecar, require_preprocessing=True)
    sidecar.write_text(json.dumps({"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}))
    with pytest.raises(ModelError, match=r"input_size is \[height, width\], without channels .* is \[224, 224\]"):
        read_sidecar(sidecar, require_preprocessing=True)
    sidecar.write_text(json.dumps({"input_size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": 3}))
    with pytest.raises(ModelError, match="3 is PIL's code for 'bicubic'"):
        read_sidecar(sidecar, require_preprocessing=True)
    sidecar.write_text(json.dumps({"input_size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": "0.9"}))
    with pytest.raises(ModelError, match="crop_pct must be a number such as 0.875"):
        read_sidecar(sidecar, require_preprocessing=True)
    # beside torchvision weights a sidecar may leave preprocessing out, but not give half of it
    sidecar.write_text(json.dumps({"interpolation": "bicubic", "classes": ["a", "b"]}))
    with pytest.raises(ModelError, match="the sidecar needs input_size, mean, std with interpolation"):
        read_sidecar(sidecar, require_preprocessing=False)
    sidecar.write_text(json.dumps({"classes": ["a", "b"]}))
    assert read_sidecar(sidecar, require_preprocessing=False).preprocessing is None


def test_missing_sidecar_names_the_places_searched_and_shows_one(tmp_path: Path) -> None:
    path = scripted(tmp_path)
    with pytest.raises(ModelError) as error:
        load_file(path)
    message = str(error.value)
    for name in ("net.pt.json", "net.pt.toml", "net.json", "net.toml"):
        assert str(tmp_path / name) in message
    template = message[message.index("{"): message.rindex("}") + 1]
    written = tmp_path / "net.pt.json"
    written.write_text(template)
    (tmp_path / "classes.txt").write_text("\n".join("abcd"))
    parts = load_file(path)  # the template, as shown, is a working sidecar
    assert parts.class_names == ("a", "b", "c", "d") and parts.preprocessing.input_size == (224, 224)


# --- files by content -------------------------------------------------------------------------


def test_files_are_identified_by_content(tmp_path: Path) -> None:
    net = SmallNet().eval()
    torch.jit.script(net).save(str(tmp_path / "a.bin"))
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    program = torch.export.export(net, (torch.zeros(2, 3, 8, 8),), dynamic_shapes=batch)
    torch.export.save(program, str(tmp_path / "b.pt"))  # an export archive under TorchScript's usual name
    torch.save(net.state_dict(), tmp_path / "c.pt2")
    torch.save({"epoch": 3, "state_dict": net.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "d.ckpt")
    save_file(net.state_dict(), str(tmp_path / "e.pth"))
    torch.save(net.state_dict(), tmp_path / "f.pth", _use_new_zipfile_serialization=False)
    torch.save(net, tmp_path / "g.pth")
    torch.save(torch.zeros(3), tmp_path / "h.pth")
    (tmp_path / "i.pth").write_text("hello")
    (tmp_path / "j.pth").write_bytes(b"")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    expected = {
        "a.bin": kinds.TORCHSCRIPT, "b.pt": kinds.TORCH_EXPORT, "c.pt2": kinds.STATE_DICT,
        "d.ckpt": kinds.CHECKPOINT, "e.pth": kinds.SAFETENSORS, "f.pth": kinds.STATE_DICT,
        "g.pth": kinds.TORCH_OBJECTS, "h.pth": kinds.TORCH_OTHER, "i.pth": kinds.UNKNOWN, "j.pth": kinds.EMPTY,
        "hf": kinds.HF_DIRECTORY, "missing.pt": kinds.MISSING,
    }  # fmt: skip
    found = {name: identify(tmp_path / name).kind for name in expected}
    assert found == expected
    assert identify(tmp_path / "d.ckpt").what == "a training checkpoint (weights under 'state_dict', 4 tensors)"
    assert identify(tmp_path / "e.pth").what == "a safetensors file (4 tensors)"
    objects = "a pickle of Python objects (test_model_files.SmallNet, ...), not plain tensors"
    assert identify(tmp_path / "g.pth").what == objects


def test_identifying_never_runs_a_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, tmp_path / "evil.pth")
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "payload": Exploit(marker)}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=False)
    assert identify(tmp_path / "evil.pth").kind == kinds.TORCH_OBJECTS
    assert identify(tmp_path / "evil.pt").kind == kinds.TORCH_OBJECTS
    with pytest.raises(ModelError, match="this is a pickle of Python objects"):
        load_file(tmp_path / "evil.pth")
    assert not marker.exists()


# --- each mistake, its message ------------------------------------------------------------------


def test_state_dict_given_as_model(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(SmallNet().state_dict(), path)
    with pytest.raises(ModelError) as error:
        load_file(path)
    assert str(error.value) == (
        f"{path}: this is a state dict (4 tensors), weights without an architecture: use --model ARCH "
        f"--weights {path} (ARCH: a torchvision name such as resnet50, or timm:NAME)"
    )


def test_training_checkpoint_given_as_model(tmp_path: Path) -> None:
    path = tmp_path / "epoch9.pt"
    torch.save({"epoch": 9, "model_state_dict": SmallNet().state_dict()}, path)
    with pytest.raises(ModelError, match=r"this is a training checkpoint \(weights under 'model_state_dict', "
                                         r"4 tensors\), weights without an architecture: use --model ARCH --weights"):
        load_file(path)


@pytest.mark.parametrize("name", ["net.safetensors", "net.pt"])
def test_safetensors_given_as_model(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    save_file(SmallNet().state_dict(), str(path))
    with pytest.raises(ModelError) as error:
        load_file(path)
    assert str(error.value) == (
        f"{path}: this is a safetensors file (4 tensors), weights without an architecture: use --model ARCH "
        f"--weights {path} (ARCH: a torchvision name such as resnet50, or timm:NAME)"
    )


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "config.json"])
def test_file_of_a_hugging_face_directory_given_as_model(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "my-vit"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "vit"}))
    save_file({"vit.embeddings.cls_token": torch.zeros(1, 1, 8)}, str(directory / "model.safetensors"))
    torch.save({"vit.embeddings.cls_token": torch.zeros(1, 1, 8)}, directory / "pytorch_model.bin")
    with pytest.raises(ModelError, match=rf"{directory / name}: this file belongs to the Hugging Face save_pretrained "
                                         rf"directory {directory}: pass the directory: --model {directory}$"):
        load_file(directory / name)


def test_hugging_face_weights_given_to_a_torchvision_name(tmp_path: Path) -> None:
    directory = tmp_path / "my-vit"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    weights = directory / "model.safetensors"
    save_file({"vit.embeddings.cls_token": torch.zeros(1, 1, 8), "classifier.weight": torch.zeros(5, 8)}, str(weights))
    with pytest.raises(ModelError, match=f"; this file belongs to the Hugging Face save_pretrained directory "
                                         f"{directory}: pass the directory: --model {directory}$"):
        load_model(model="shufflenet_v2_x0_5", weights=weights, index_names=True)
    alone = tmp_path / "weights.safetensors"  # the same weights, away from their directory
    shutil.copy(weights, alone)
    with pytest.raises(ModelError, match=r"; looks like the weights of a Hugging Face model \('<model>.embeddings' "
                                         r"keys\): pass its save_pretrained directory .*: --model DIR$"):
        load_model(model="shufflenet_v2_x0_5", weights=alone, index_names=True)
    with pytest.raises(ModelError, match=f"{directory}: this is a Hugging Face save_pretrained directory, not a "
                                         f"weights file: pass the directory as --model {directory}"):
        load_model(model="shufflenet_v2_x0_5", weights=directory)


@pytest.mark.parametrize("architecture", ["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224",
                                          "mobilenetv3_small_050"])
def test_timm_state_dict_given_to_a_torchvision_name(tmp_path: Path, architecture: str) -> None:
    path = tmp_path / f"{architecture}.pth"
    torch.save(timm.create_model(architecture, pretrained=False, num_classes=5).state_dict(), path)
    torchvision_name = {"efficientnet_b0": "efficientnet_b0", "convnext_atto": "convnext_tiny",
                        "vit_tiny_patch16_224": "vit_b_16", "mobilenetv3_small_050": "mobilenet_v3_small"}
    with pytest.raises(ModelError) as error:
        load_model(model=torchvision_name[architecture], weights=path, index_names=True)
    message = str(error.value)
    assert message.startswith(f"{path} does not fit torchvision's {torchvision_name[architecture]}: missing keys:")
    assert "; looks like a timm model (" in message
    assert message.endswith(f"use --model timm:NAME --weights {path}, NAME the architecture it was saved from")


def test_layouts_that_are_not_guessed_at() -> None:
    assert foreign_layout(torchvision.models.squeezenet1_1().state_dict()) is None
    assert foreign_layout(torchvision.models.regnet_x_400mf().state_dict()) is None  # 'stem.0' but no 'stages'
    assert foreign_layout(torchvision.models.vit_b_16().state_dict()) is None  # 'class_token', not 'cls_token'


def test_program_given_as_weights(tmp_path: Path) -> None:
    path = scripted(tmp_path, "net.pth")
    with pytest.raises(ModelError, match=rf"{path}: this is a TorchScript archive \(a whole model\), not weights: "
                                         rf"give it as --model {path} \(with a sidecar beside it\), without --weights"):
        load_model(model="shufflenet_v2_x0_5", weights=path)


# --- safetensors weights ---------------------------------------------------------------------------


def test_renamed_safetensors_loads_as_torchvision_weights(tmp_path: Path) -> None:
    pth = tmp_path / "squeeze.pth"
    net = small_torchvision(pth)
    renamed = tmp_path / "squeeze.weights"  # a safetensors file under any name
    save_file(net.state_dict(), str(renamed))
    assert identify(renamed).kind == kinds.SAFETENSORS
    from_pth = load_model(model="shufflenet_v2_x0_5", weights=pth, index_names=True)
    from_safetensors = load_model(model="shufflenet_v2_x0_5", weights=renamed, index_names=True)
    assert from_safetensors.class_names == from_pth.class_names
    for (name, ours), (_, theirs) in zip(from_safetensors.module.state_dict().items(),
                                         from_pth.module.state_dict().items()):
        assert torch.equal(ours, theirs), name
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(from_safetensors.module(x), from_pth.module(x))
    # and with its own extension, and through DataParallel's prefix
    named = tmp_path / "squeeze.safetensors"
    save_file({f"module.{k}": v for k, v in net.state_dict().items()}, str(named))
    with torch.no_grad():
        assert torch.equal(load_model(model="shufflenet_v2_x0_5", weights=named, index_names=True).module(x),
                           from_pth.module(x))


def test_damaged_safetensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(SmallNet().state_dict(), str(good))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelError, match=f"{truncated}: a safetensors file that cannot be read"):
        read_checkpoint(truncated)
    fake = tmp_path / "fake.safetensors"
    shutil.copy(tmp_path / "good.safetensors", fake)
    fake.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match=f"{fake}: named .safetensors, but not a safetensors file"):
        read_checkpoint(fake)
