"""How accurate IG is, and how well igd's error estimate says so: every fixed rule,
adaptive quadrature and the default request against a converged reference integral, on
the three kinds of net: piecewise-linear (EfficientNet-Lite0, LaNet), smooth (a ViT) and
scale-invariant from the zero baseline (BiT).

    python bench/accuracy.py                               # default model on 8 photos, the others on 4
    python bench/accuracy.py --models effnet,vit --photos 2 --json out.json --reference-cache refs/

Photos: the 8 natural photos bundled with scikit-image (`pip install -e '.[bench]'`),
each attributed to its predicted class from the zero baseline (igd's defaults). The
references, written here in plain torch from the definition (no igd code), each with its
own distance to the same rule on every other node (``vs_half``):
- ReLU nets (effnet, lanet): the trapezoid rule on 2048 even panels, graded towards the
  baseline inside the first (48 nodes per decade down to 1e-12).
- BiT: the trapezoid rule on nodes even in log alpha, 200 a decade from 1e-12 to 1 (its
  GroupNorm makes the net scale-invariant along a zero-baseline path: the action lies at
  alphas of 1e-7 to 1e-2, with kinks all along).
- ViT (timm's vit_tiny_patch16_224 with random weights, seed 0: the structure, GELU,
  softmax attention and LayerNorm, not training, makes it smooth): Gauss-Legendre on 256
  points (its distance to 128 points is ``vs_half``).
For each (photo, setting):
the true relative L2 error of IG against the reference, igd's ``error_estimate``, and the
gradient evaluations used. "GL for the same error" fits ``log error = a + b log n`` to
the Gauss-Legendre rows of that photo and reads off the points a Gauss-Legendre rule needs
for the adaptive answer's true error. Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import accuracy_table  # the same tables as docs/benchmarks.md

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import assemble  # noqa: E402  (the BiT and LaNet fixtures, as the tests build them)

from igd.engine.adaptive import attribute_adaptive  # noqa: E402
from igd.engine.attribution import attribute  # noqa: E402
from igd import request as spec  # noqa: E402
from igd.models import LoadedModel, load_model  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "camera.png")
GAUSS_LEGENDRE = (16, 32, 50, 64, 128, 256)
GAUSS_LEGENDRE_SMOOTH = (4, 8, 12, 16, 32, 50)  # the ViT: converged long before 50
OTHER_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
TOLERANCES = (0.05, 0.02, 0.01)
ADAPTIVE_CAP = 1024
CHUNK = 32
GRADED_PER_DECADE = 48
LOG_PER_DECADE = 200  # BiT's reference
DEFAULT = "default request"  # the setting of a request that names neither steps, a tolerance nor a rule


@dataclass
class Row:
    model: str
    photo: str
    setting: str  # "gausslegendre 50", "adaptive 2 %", ...
    method: str
    points: int  # gradient evaluations (path points)
    true_error: float  # relative L2 of IG against the reference
    estimate: float  # igd's error_estimate
    completeness_gap: float
    seconds: float


def photo_paths(count: int) -> list[Path]:
    import skimage  # bench extra: only its bundled photos are used

    folder = Path(skimage.__file__).parent / "data"
    return [folder / name for name in PHOTOS[:count]]


def reference_nodes(panels: int) -> torch.Tensor:
    """(n,) float64 increasing: j / panels for j = 0..panels, and inside the first panel a
    geometric grid from 1e-12 with GRADED_PER_DECADE nodes per decade. The graded part is
    for BiT: its GroupNorm makes the network scale-invariant along a zero-baseline path, so
    its target logit rises at alphas of 1e-7 to 1e-2, where even panels see nothing."""
    uniform = torch.arange(panels + 1, dtype=torch.float64) / panels
    decades = math.log10(1 / panels) + 12
    graded = torch.logspace(-12, math.log10(1 / panels), int(decades * GRADED_PER_DECADE), dtype=torch.float64)
    return torch.cat([uniform[:1], graded[:-1], uniform[1:]])


def trapezoid(nodes: torch.Tensor) -> torch.Tensor:
    """(n,) weights of the trapezoid rule through ``nodes`` (n,), which span [0, 1]."""
    half = (nodes[1:] - nodes[:-1]) / 2
    weights = torch.zeros_like(nodes)
    weights[:-1] += half
    weights[1:] += half
    return weights


def reference_ig(model: torch.nn.Module, x: torch.Tensor, target: int, panels: int) -> dict[str, object]:
    """The ReLU nets' reference: :func:`trapezoid_reference` through :func:`reference_nodes`."""
    return trapezoid_reference(model, x, target, reference_nodes(panels))


def trapezoid_reference(model: torch.nn.Module, x: torch.Tensor, target: int, nodes: torch.Tensor) -> dict[str, object]:
    """IG of x (1, *F) from zero by the trapezoid rule through ``nodes`` (n,), which span [0,
    1], plainly: the gradient of the target logit at each a * x, weighted. Also the rule through
    every other node (its distance tells how far the reference is converged) and the rule's
    own jump-model estimate sqrt(sum_k (h_k / 2 |x * (g_{k+1} - g_k)| / sqrt 3)^2) / |IG|."""
    weights = trapezoid(nodes)
    every_other = torch.cat([torch.arange(0, len(nodes) - 1, 2), torch.tensor([len(nodes) - 1])]).unique()
    coarse_weights = torch.zeros_like(nodes)
    coarse_weights[every_other] = trapezoid(nodes[every_other])
    fine = torch.zeros_like(x[0], dtype=torch.float64)
    coarse = torch.zeros_like(x[0], dtype=torch.float64)
    errors_squared, previous = 0.0, None
    for start in range(0, len(nodes), CHUNK):
        block = nodes[start : start + CHUNK]
        points = (block.view(-1, 1, 1, 1) * x.double()).float().requires_grad_(True)
        model(points)[:, target].sum().backward()
        for offset, grad in enumerate(points.grad.double()):
            k = start + offset
            fine += weights[k] * grad
            coarse += coarse_weights[k] * grad
            if previous is not None:
                width = float(nodes[k] - nodes[k - 1])
                errors_squared += (width / 2 * float(((grad - previous) * x[0]).norm()) / math.sqrt(3)) ** 2
            previous = grad
    ig, ig_coarse = x[0].double() * fine, x[0].double() * coarse
    return {"ig": ig, "points": len(nodes), "estimate": math.sqrt(errors_squared) / float(ig.norm()),
            "vs_half": float((ig_coarse - ig).norm() / ig.norm())}


def gauss_legendre_reference(model: torch.nn.Module, x: torch.Tensor, target: int, n: int = 256) -> dict[str, object]:
    """IG of x (1, *F) from zero by Gauss-Legendre on ``n`` points (numpy's nodes), and its
    distance to n/2 points: converged for a smooth net."""
    def rule(points: int) -> torch.Tensor:
        nodes, weights = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(points))
        alphas, weights = (nodes + 1) / 2, weights / 2
        total = torch.zeros_like(x[0], dtype=torch.float64)
        for start in range(0, points, CHUNK):
            path = (alphas[start : start + CHUNK].view(-1, 1, 1, 1) * x.double()).float().requires_grad_(True)
            model(path)[:, target].sum().backward()
            total += (weights[start : start + CHUNK].view(-1, 1, 1, 1) * path.grad.double()).sum(0)
        return x[0].double() * total
    fine, coarse = rule(n), rule(n // 2)
    return {"ig": fine, "points": n + n // 2, "estimate": None, "vs_half": float((coarse - fine).norm() / fine.norm())}


def settings(family: str) -> list[tuple[str, str, float]]:
    """(label, method, n_steps or tolerance) of every setting measured on a net of ``family``."""
    sizes = GAUSS_LEGENDRE_SMOOTH if family == "vit" else GAUSS_LEGENDRE
    rows = [(f"gausslegendre {n}", "gausslegendre", n) for n in sizes]
    rows += [(f"{rule} 50", rule, 50) for rule in OTHER_RULES]
    rows += [(f"adaptive {t:.0%}".replace("%", " %"), "adaptive", t) for t in TOLERANCES]
    rows.append((DEFAULT, "adaptive", spec.DEFAULT_TOLERANCE))
    return rows


def measure(loaded: LoadedModel, family: str, label: str, photo: Path, panels: int,
            cache: Path | None) -> tuple[list[Row], dict[str, object]]:
    model = loaded.module
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = loaded.preprocess(Image.open(photo).convert("RGB"))
    with torch.no_grad():
        target = int(model(x).argmax())
    start = time.perf_counter()
    reference = cached_reference(cache, f"{family}-{panels}-{photo.name}", lambda: family_reference(
        family, model, x, target, panels))
    reference_s = time.perf_counter() - start
    truth = reference["ig"]
    rows = []
    for setting, method, value in settings(family):
        start = time.perf_counter()
        if method == "adaptive":
            cap = spec.DEFAULT_CAP if setting == DEFAULT else ADAPTIVE_CAP
            (result,) = attribute_adaptive(lambda p, _i: model(p), x, target, tolerance=value,
                                           max_steps=cap, max_batch=CHUNK, modules=[model])
        else:
            result = attribute(model, x, target, n_steps=int(value), rule=method, max_batch=CHUNK)
        seconds = time.perf_counter() - start
        ig = result.integrated_grads[0].double()
        rise = float(result.logits[0, target] - result.baseline_logits[0, target])
        rows.append(Row(label, photo.name, setting, method, result.n_steps,
                        float((ig - truth).norm() / truth.norm()), float(result.error_estimate[0]),
                        float(result.convergence_delta[0]) / abs(rise), seconds))
    about = {"model": label, "photo": photo.name, "target": loaded.class_names[target],
             "reference_points": reference["points"], "reference_estimate": reference["estimate"],
             "reference_vs_half": reference["vs_half"], "reference_s": reference_s}
    return rows, about


def family_reference(family: str, model: torch.nn.Module, x: torch.Tensor, target: int,
                     panels: int) -> dict[str, object]:
    """The converged reference of a net of ``family`` (module docstring)."""
    if family == "vit":
        return gauss_legendre_reference(model, x, target)
    if family == "bit":
        nodes = torch.logspace(-12, 0, 12 * LOG_PER_DECADE + 1, dtype=torch.float64)
        return trapezoid_reference(model, x, target, torch.cat([torch.zeros(1, dtype=torch.float64), nodes]))
    return reference_ig(model, x, target, panels)


def cached_reference(cache: Path | None, name: str, compute) -> dict[str, object]:
    """``compute()``'s reference, kept in ``cache`` (a directory) under ``name`` when given:
    references take most of a run (2,500 points a photo)."""
    if cache is None:
        return compute()
    path = cache / f"{name}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    reference = compute()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(reference, path)
    return reference


def gauss_legendre_needed(rows: list[Row], error: float) -> float | None:
    """Points a Gauss-Legendre rule needs for ``error`` on this photo, from the power law
    fitted (least squares in log-log) to the photo's Gauss-Legendre rows; None when they
    do not converge (error falling slower than n^-0.2: BiT from the zero baseline)."""
    pairs = [(math.log(r.points), math.log(r.true_error)) for r in rows if r.method == "gausslegendre"]
    mean_n = statistics.fmean(p[0] for p in pairs)
    mean_e = statistics.fmean(p[1] for p in pairs)
    slope = sum((n - mean_n) * (e - mean_e) for n, e in pairs) / sum((n - mean_n) ** 2 for n, _ in pairs)
    if slope > -0.2:
        return None
    return math.exp(mean_n + (math.log(error) - mean_e) / slope)


def comparisons(rows: list[Row]) -> list[dict[str, object]]:
    """Per (model, photo, adaptive setting): its points against the Gauss-Legendre rule of
    the same true error (fitted, and the smallest measured one that is as good)."""
    out = []
    keys = dict.fromkeys((r.model, r.photo) for r in rows)  # in the order measured
    for model, photo in keys:
        mine = [r for r in rows if r.model == model and r.photo == photo]
        for row in (r for r in mine if r.method == "adaptive"):
            measured = [r.points for r in mine if r.method == "gausslegendre" and r.true_error <= row.true_error]
            needed = gauss_legendre_needed(mine, row.true_error)
            out.append({"model": model, "photo": photo, "setting": row.setting, "points": row.points,
                        "true_error": row.true_error, "estimate": row.estimate,
                        "gl_points_fit": needed, "ratio_fit": None if needed is None else needed / row.points,
                        "gl_points_measured": min(measured) if measured else None})
    return out


def savings(compared: list[dict[str, object]]) -> list[dict[str, object]]:
    """Per (model, adaptive setting), over the photos where Gauss-Legendre converges: mean
    points of adaptive and of the Gauss-Legendre rule of the same true error, their ratio,
    and the worst true error adaptive reached."""
    out = []
    for model, setting in dict.fromkeys((c["model"], c["setting"]) for c in compared):
        mine = [c for c in compared if c["model"] == model and c["setting"] == setting]
        fitted = [c for c in mine if c["gl_points_fit"] is not None]
        entry = {"model": model, "setting": setting, "photos": len(mine), "photos_fitted": len(fitted),
                 "true_error_max": max(c["true_error"] for c in mine),
                 "adaptive_points_mean": statistics.fmean(c["points"] for c in mine)}
        if fitted:
            adaptive = statistics.fmean(c["points"] for c in fitted)
            needed = statistics.fmean(c["gl_points_fit"] for c in fitted)
            entry.update(gl_points_mean=needed, ratio_of_means=needed / adaptive,
                         ratio_min=min(c["ratio_fit"] for c in fitted), ratio_max=max(c["ratio_fit"] for c in fitted))
        out.append(entry)
    return out


def summary(rows: list[Row]) -> list[dict[str, object]]:
    """Per (model, setting), over the photos: points, true error and estimate / true."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        for setting in dict.fromkeys(r.setting for r in rows if r.model == model):
            mine = [r for r in rows if r.model == model and r.setting == setting]
            ratios = [r.estimate / r.true_error for r in mine]
            out.append({"model": model, "setting": setting, "photos": len(mine),
                        "points_mean": statistics.fmean(r.points for r in mine),
                        "true_error_median": statistics.median(r.true_error for r in mine),
                        "true_error_max": max(r.true_error for r in mine),
                        "estimate_over_true_median": statistics.median(ratios),
                        "within_3x": sum(1 / 3 <= q <= 3 for q in ratios)})
    return out


def load(name: str, fixtures: Path, scratch: Path) -> tuple[str, LoadedModel]:
    if name == "effnet":
        return "EfficientNet-Lite0 (pretrained), 224x224", load_model()
    if name == "bit":
        return "BiT fixture (bit-tiny, 32x32)", load_model(bit_path=fixtures / "bit-tiny.pth")
    if name == "lanet":
        return "LaNet fixture (lanet-tiny, 32x32)", load_model(lanet_path=fixtures / "lanet-tiny.pth")
    if name == "vit":
        import timm  # test extra

        torch.manual_seed(0)
        module = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        weights = scratch / "vit_tiny.pth"
        torch.save(module.state_dict(), weights)
        return ("ViT-Tiny/16 (timm, random weights), 224x224",
                load_model(model="timm:vit_tiny_patch16_224", weights=weights, index_names=True))
    raise ValueError(f"unknown model {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="effnet,vit,bit,lanet", help="comma-separated: effnet, vit, bit, lanet")
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help=f"how many of the {len(PHOTOS)} photos")
    parser.add_argument("--fixture-photos", type=int, default=4, help="how many photos for the other models")
    parser.add_argument("--reference-panels", type=int, default=2048)
    parser.add_argument("--reference-cache", type=Path, help="keep the references in this directory and reuse them")
    parser.add_argument("--json", type=Path, help="also write every row here (after each photo, so a run "
                        "stopped early keeps what it measured)")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU"
    rows: list[Row] = []
    about: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        fixtures = assemble(Path(scratch) / "fixtures")
        for name in args.models.split(","):
            label, loaded = load(name, fixtures, Path(scratch))
            for photo in photo_paths(args.photos if name == "effnet" else args.fixture_photos):
                measured, facts = measure(loaded, name, label, photo, args.reference_panels, args.reference_cache)
                rows += measured
                about.append(facts)
                print(f"# {label}, {photo.name}: done", file=sys.stderr, flush=True)
                if args.json:
                    write_json(args.json, machine, args.reference_panels, rows, about)
    print(f"# IG accuracy against converged references ({machine})")
    print("\n".join(accuracy_table(results(machine, args.reference_panels, rows, about))))


def defaults(rows: list[Row]) -> list[dict[str, object]]:
    """Per model: the default request against 50 fixed Gauss-Legendre points (the old
    default), over the photos: points, true error (median, worst), and time (means' ratio)."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and r.setting == DEFAULT]
        fixed = [r for r in rows if r.model == model and r.setting == "gausslegendre 50"]
        if not mine or not fixed:
            continue
        out.append({"model": model, "photos": len(mine), "points_mean": statistics.fmean(r.points for r in mine),
                    "points_max": max(r.points for r in mine),
                    "true_error_median": statistics.median(r.true_error for r in mine),
                    "true_error_max": max(r.true_error for r in mine),
                    "fixed_true_error_median": statistics.median(r.true_error for r in fixed),
                    "time_ratio": statistics.fmean(r.seconds for r in mine) / statistics.fmean(r.seconds for r in fixed)})
    return out


def results(machine: str, panels: int, rows: list[Row], about: list[dict]) -> dict[str, object]:
    """Everything measured, and the tables' figures derived from it: what --json writes."""
    compared = comparisons(rows)
    return {"machine": machine, "reference_panels": panels, "rows": [asdict(r) for r in rows],
            "references": about, "adaptive_vs_gauss_legendre": compared, "savings": savings(compared),
            "summary": summary(rows), "defaults": defaults(rows)}


def write_json(path: Path, machine: str, panels: int, rows: list[Row], about: list[dict]) -> None:
    path.write_text(json.dumps(results(machine, panels, rows, about), indent=1))


if __name__ == "__main__":
    main()
