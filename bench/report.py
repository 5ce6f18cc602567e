"""Render the benchmark results into docs/benchmarks.md and one chart the README shows.

    python bench/report.py            # reads docs/benchmarks/*.json (written by the bench scripts' --json)

The JSON files are committed next to the page, so the page can be rebuilt and checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "benchmarks"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def max_request_table(data: dict) -> list[str]:
    lines = ["| --max-batch | steps | answer | idle RSS | peak RSS | peak above idle | / answer | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['max_batch']} | {r['steps']} | {r['answer_mib']} MiB | {r['idle_rss_mib']} MiB | "
                     f"{r['peak_rss_mib']} MiB | {r['peak_above_idle_mib']} MiB | **{r['ratio_to_answer']}x** | "
                     f"{r['seconds']} |")
    return lines


def _share(value: float) -> str:
    """A relative error as a percentage, small ones in scientific notation (a smooth net's)."""
    return f"{value:.1%}" if value >= 0.001 else f"{value * 100:.1e} %"


def accuracy_table(data: dict) -> list[str]:
    lines = ["The default request (neither steps, a tolerance nor a rule: adaptive steps to 5 %, at most 256 "
             "points) against the old default, 50 fixed Gauss-Legendre points:", "",
             "| model | photos | points (mean, most) | true error, median | worst | 50 fixed points: true error, "
             "median | time / 50 fixed points |", "|---|---|---|---|---|---|---|"]
    for d in data.get("defaults", []):
        lines.append(f"| {d['model']} | {d['photos']} | {d['points_mean']:.0f}, {d['points_max']} | "
                     f"{_share(d['true_error_median'])} | {_share(d['true_error_max'])} | {_share(d['fixed_true_error_median'])} | "
                     f"**{d['time_ratio']:.2f}x** |")
    lines += ["", "| model | setting | gradient evaluations (mean) | true error, median | worst | estimate / true, median | "
             "estimate within 3x |", "|---|---|---|---|---|---|---|"]
    for s in data["summary"]:
        lines.append(f"| {s['model']} | {s['setting']} | {s['points_mean']:.0f} | {_share(s['true_error_median'])} | "
                     f"{_share(s['true_error_max'])} | {s['estimate_over_true_median']:.2f} | {s['within_3x']}/{s['photos']} |")
    pairs = data["summary"]
    within = sum(s["within_3x"] for s in pairs)
    total = sum(s["photos"] for s in pairs)
    lines += ["", f"The estimate is within 3x of the true error on {within} of {total} (photo, setting) pairs "
              f"({within / total:.0%}).", "",
              "Adaptive against the Gauss-Legendre rule of the same true error (points read off a power law fitted to "
              "each photo's Gauss-Legendre rows):", "",
              "| model | adaptive | points (mean) | worst true error | Gauss-Legendre points, same error (mean) | "
              "ratio | range over photos |", "|---|---|---|---|---|---|---|"]
    for v in data["savings"]:
        if "ratio_of_means" in v:
            tail = (f"{v['gl_points_mean']:.0f} | **{v['ratio_of_means']:.2f}x** | "
                    f"{v['ratio_min']:.2f}-{v['ratio_max']:.2f}x")
        else:
            tail = "does not converge by 256 points | | "
        lines.append(f"| {v['model']} | {v['setting']} | {v['adaptive_points_mean']:.0f} | {v['true_error_max']:.1%} "
                     f"| {tail} |")
    lines += ["", "| model | photo | adaptive | points | true error | estimate | Gauss-Legendre points, same error "
              "(fit) | ratio |", "|---|---|---|---|---|---|---|---|"]
    for c in data["adaptive_vs_gauss_legendre"]:
        fit = "no convergence" if c["gl_points_fit"] is None else f"{c['gl_points_fit']:.0f}"
        ratio = "" if c["ratio_fit"] is None else f"{c['ratio_fit']:.2f}x"
        lines.append(f"| {c['model']} | {c['photo']} | {c['setting']} | {c['points']} | {c['true_error']:.2%} | "
                     f"{c['estimate']:.2%} | {fit} | {ratio} |")
    lines += ["", "The references (bench/accuracy.py's docstring: the ReLU nets' own jump-model estimate, and each "
              "one's distance to the same rule through every other node, or to half its Gauss-Legendre points):", "",
              "| model | photo | target | points | own estimate | vs half its points |", "|---|---|---|---|---|---|"]
    for r in data["references"]:
        own = "" if r["reference_estimate"] is None else f"{r['reference_estimate']:.2%}"
        lines.append(f"| {r['model']} | {r['photo']} | {r['target']} | {r['reference_points']} | "
                     f"{own} | {r['reference_vs_half']:.2%} |")
    return lines


def targets_table(data: dict) -> list[str]:
    lines = ["| model | k | chunk | one request, k targets | k requests | one request / 1 target | k requests / one "
             "request | peak RSS above idle: one / k requests |", "|---|---|---|---|---|---|---|---|"]
    for name, title in data["models"].items():
        runs = [r for r in data["runs"] if r["model"] == name]
        if not runs:
            continue
        single = next(r for r in runs if r["k"] == 1)["median_s"]
        for one in (r for r in runs if r["way"] == "one"):
            separate = next((r for r in runs if r["k"] == one["k"] and r["way"] == "separate"), one)
            lines.append(f"| {title} | {one['k']} | {one['chunk']} | {one['median_s']:.2f} s | "
                         f"{separate['median_s']:.2f} s | **{one['median_s'] / single:.2f}x** | "
                         f"{separate['median_s'] / one['median_s']:.2f}x | {one['peak_above_mib']:.0f} / "
                         f"{separate['peak_above_mib']:.0f} MiB |")
    lines += ["", "| model | k | chunk | k backwards, retained graph (igd) | one batched VJP (is_grads_batched) |",
              "|---|---|---|---|---|"]
    for entry in data["vjp"]:
        ms = entry["ms_per_point"]
        lines.append(f"| {data['models'][entry['model']]} | {entry['k']} | {entry['chunk']} | "
                     f"{ms['retained']:.1f} ms/point | {ms['batched']:.1f} ms/point |")
    return lines


def chunks_table(data: dict) -> list[str]:
    lines = ["| model | memory cap | best size in the sweep | `igd serve`, quiet: pick, vs best, search | "
             "one core busy: pick, vs best, search |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        picks = [f"**{p['pick']}**, {_over(p['over_best'])}, {p['search_s']:.1f} s" for p in r["picks"]]
        lines.append(f"| {r['label']} | {r['memory_cap']} | {r['best']} ({r['best_ms_per_point']:.1f} ms/point) | "
                     + " | ".join(picks) + " |")
    lines += ["", "The sweep (ms per point of forward+backward, median of "
              f"{data['repeats']} calls after one that builds the size's kernels):", ""]
    for r in data["rows"]:
        swept = ", ".join(f"{size}: {ms:.0f}" for size, ms in r["ms_per_point"].items())
        lines.append(f"- {r['label']}: {swept}")
    return lines


def compiled_table(data: dict) -> list[str]:
    lines = ["| model | chunk | eager | compiled | speed-up | compile time: first call + more at the first full pass | "
             "peak RSS added | IG moved (8 / 50 steps) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if "timeout_s" in r:
            lines.append(f"| {r['label']} | | | not done in {r['timeout_s']:.0f} s (compiling) | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['chunk']} | {r['eager_s']:.2f} s | {r['compiled_s']:.2f} s | "
                     f"**{r['speedup']:.2f}x** | {r['compile_s']:.0f} s + {r['first_compiled_s'] - r['compiled_s']:.0f} s | "
                     f"{r['peak_rss_added_mib']:.0f} MiB | "
                     f"{r['ig_deviation_8_steps']:.1e} / {r['ig_deviation']:.1e} |")
    return lines


def _over(ratio: float | None) -> str:
    return "not swept" if ratio is None else f"+{ratio - 1:.0%}"


def engine_table(data: dict) -> list[str]:
    lines = ["| model | igd (s) | predecessor (s) | speedup | chunk, format |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['ours_s']:.2f} | {r['predecessor_s']:.2f} | **{r['speedup']:.1f}x** | "
                     f"{r['chunk']}, {r.get('memory_format', 'contiguous')} |")
    return lines


def e2e_table(data: dict) -> list[str]:
    lines = ["| model | image | igd + igctl (s) | predecessor pipeline (s) | speedup | chunk igd picked |",
             "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        mode = f" ({r['igd_args']})" if r.get("igd_args") else ""
        lines.append(f"| {r['model']}{mode} | {r['image']} | {r['igd_s']:.2f} | {r['predecessor_s']:.2f} | "
                     f"**{r['speedup']:.1f}x** | {r.get('chunk', '?')} |")
    return lines


def client_table(data: dict) -> list[str]:
    lines = ["| command | median (ms) | vs `import torch` |", "|---|---|---|"]
    lines += [f"| {r['command']} | {r['median_s'] * 1000:.0f} | {r['vs_import_torch']:.2f}x |" for r in data["rows"]]
    return lines


def concurrency_table(data: dict) -> list[str]:
    lines = ["| batching | clients | requests | req/s | p50 (s) | p95 (s) | lost | wrong |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batching']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.2f} | "
              f"{r['p95_s']:.2f} | {r['lost']} | {r['wrong']} |" for r in data["rows"]]
    return lines


def memory_table(data: dict) -> list[str]:
    gib = lambda v: f"{v / 2**30:.2f}" if v else "-"  # noqa: E731
    lines = ["| model | igd start-up peak (GiB) | igd after warm-up (GiB) | igd peak serving one request (GiB) | "
             "predecessor server peak (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {gib(r.get('startup_peak_rss'))} | {gib(r['warm_rss'])} | {gib(r['peak_rss_one_request'])} | "
              f"{gib(r['predecessor_peak_rss'])} |" for r in data["rows"]]
    growth = next((r for r in data["rows"] if "growth" in r), None)
    if growth:
        lines += ["", f"RSS of igd ({growth['model']}, 8-step requests): {gib(growth['rss_after_10'])} GiB after 10 "
                      f"requests, {gib(growth['rss_after_all'])} GiB after {growth['requests']} ({growth['growth']:+.1%})."]
    return lines


def budget_table(data: dict) -> list[str]:
    budgets = data["budgets"]
    lines = ["| request kind | alone: reserved (MiB) | alone: peak (MiB) | "
             + " | ".join(f"4 x 4 pipelined, budget {b}: answers | peak (MiB) | / budget" for b in budgets) + " |",
             "|---|---|---|" + "---|---|---|" * len(budgets)]
    for name, alone in data["alone"].items():
        cells = [name, f"{alone['ledger_peak_mib']:.0f}", f"{alone['peak_above_idle_mib']:.0f}"]
        for budget in budgets:
            piped = data[f"pipelined {budget}"].get(name, {})
            mib = float(budget[:-1]) * (1024 if budget.endswith("G") else 1)
            cells += [", ".join(f"{n} {c}" for c, n in piped.get("codes", {}).items()),
                      f"{piped.get('peak_above_idle_mib', 0):.0f}",
                      f"{piped.get('peak_above_idle_mib', 0) / mib:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def batch_table(data: dict) -> list[str]:
    lines = ["| backend | seconds (model loading included) | images/s |", "|---|---|---|"]
    return lines + [f"| {r['backend']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} |" for r in data["rows"]]


def xrai_table(data: dict) -> list[str]:
    from xrai import table  # bench/xrai.py's own table

    return table(data)


def soak_table(data: dict) -> list[str]:
    mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
    return [
        "| clients | requests | answers | max deviation from single answers | RSS warm -> after (MiB) | fds | threads | problems |",
        "|---|---|---|---|---|---|---|---|",
        f"| {data['clients']} | {data['requests']} | {', '.join(f'{k} {v}' for k, v in sorted(data['answers'].items()))} | "
        f"{data['max_deviation']:.1e} | {mib(data['warm']['rss'])} -> {mib(data['after']['rss'])} | "
        f"{data['warm']['fds']} -> {data['after']['fds']} | {data['warm']['threads']} -> {data['after']['threads']} | "
        f"{len(data['problems'])} |",
    ]


def gpu_table(data: dict) -> list[str]:
    sizes = list(data["rows"][0]["images_per_s"])
    lines = ["| model | mode | igd, 1 image (ms) | predecessor (ms) | speedup | igd images/s by images per pass "
             "(x the predecessor's one-at-a-time throughput) | peak GiB, igd "
             f"{data['rows'][0]['peak_images']} images / predecessor 1 | chunk |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        throughput = ", ".join(f"{n}: {r['images_per_s'][n]:.1f} ({r['throughput_ratio'][n]:.1f}x)" for n in sizes)
        lines.append(f"| {r['model']} | {r['mode']} | {r['ours_s'] * 1e3:.0f} | {r['predecessor_s'] * 1e3:.0f} | "
                     f"**{r['speedup']:.2f}x** | {throughput} | {r['ours_peak_gib']:.1f} / {r['predecessor_peak_gib']:.1f} "
                     f"| {r['chunk']} |")
    p = data["precision"]
    lines += ["", f"{p['model']}, TF32 against strict float32 ({data['steps']} steps): IG moves by "
                  f"{p['ig_rel_l2']:.1e} and the per-step gradients by {p['idg_rel_l2']:.1e} (relative L2); one image "
                  f"{p['float32_s'] * 1e3:.0f} -> {p['tf32_s'] * 1e3:.0f} ms, 8 per pass "
                  f"{p['float32_images_per_s_8']:.1f} -> {p['tf32_images_per_s_8']:.1f} images/s."]
    return lines


NUMERIC_SETTINGS = ("cpu float32", "cudnn default", "deterministic", "cudnn off", "tf32", "cuda float64")


def gpu_numerics_table(data: dict) -> list[str]:
    lines = ["IG against float64 on the CPU (relative L2, 32 steps); R: the same request twice gave the same bytes.", "",
             "| model | " + " | ".join(NUMERIC_SETTINGS) + " |", "|---" * (len(NUMERIC_SETTINGS) + 1) + "|"]
    for r in data["accuracy"]:
        cells = [f"{r[s]:.1e}" + (" R" if r.get(f"{s} reproducible") else "") for s in NUMERIC_SETTINGS]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += ["", "8 images x 50 steps in one pass, strict float32, by cuDNN setting:", "",
              "| model | setting | ms | images/s | vs cuDNN default | IG moved |", "|---|---|---|---|---|---|"]
    for r in data["speed"]:
        lines.append(f"| {r['model']} | {r['setting']} | {r['seconds'] * 1e3:.0f} | {r['images_per_s']:.1f} | "
                     f"{r['vs_default']:.2f}x | {r['ig_vs_default']:.1e} |")
    return lines


def chart(engine: dict | None, e2e: dict | None) -> Path | None:
    bars = []
    if engine:
        bars += [(f"compute\n{r['model'].split(' (')[0].split(',')[0]}", r["speedup"]) for r in engine["rows"]]
    if e2e:
        short = {"32x32 PNG": "32x32 PNG", "chelsea.jpg 451x300": "chelsea.jpg", "12 MP JPEG 4000x3000": "12 MP JPEG"}
        bars += [(f"end to end\n{r['model']}, {short.get(r['image'], r['image'])}", r["speedup"]) for r in e2e["rows"]]
    if not bars:
        return None
    figure, axes = plt.subplots(figsize=(10, 4.2))
    labels, values = zip(*bars)
    axes.bar(range(len(values)), values, color=["#4c72b0" if label.startswith("compute") else "#dd8452" for label in labels])
    axes.set_xticks(range(len(values)), labels, fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_ylabel("speedup over the predecessor (x)")
    axes.set_title("igd vs the predecessor, same model and machine (CPU, 2 cores)")
    for i, value in enumerate(values):
        axes.text(i, value, f"{value:.1f}x", ha="center", va="bottom", fontsize=7)
    figure.tight_layout()
    path = RESULTS / "speedups.png"
    figure.savefig(path, dpi=110)
    return path


def main() -> None:
    engine, e2e = load("engine"), load("e2e")
    sections = [
        ("Chunk size (`bench/chunks.py`)", load("chunks"), chunks_table,
         "Every chunk size timed up to the memory cap (forward+backward per path point, as the tuner times it), "
         "against the chunk a real `igd serve` with defaults and an empty cache picks at warm-up: on a quiet "
         "machine, and with another process keeping one core busy during the warm-up. \"vs best\": the sweep's time "
         "per point at the pick over its best."),
        ("Compiled mode (`bench/compiled.py`)", load("compiled"), compiled_table,
         "`igd serve --compile` (torch.compile, inductor, forward and backward, dynamic in the number of points) "
         "against eager PyTorch: a 50-step attribution in the chunk igd picks for the eager model, medians of 3, "
         "each model in a fresh process. IG moved: relative L2 against eager (the daemon logs the 8-step figure "
         "at start-up)."),
        ("Compute path (`bench/engine.py`)", engine, engine_table,
         "igd's one pass vs the predecessor's compute path (per-step pass with every path point in one batch, "
         "captum IG over the same path again, a forward), same model and input, 50 Gauss-Legendre steps, runs "
         "alternating, medians."),
        ("End to end, one request (`bench/e2e.py`)", e2e, e2e_table,
         "From the image file to the result file: `igctl attribute` against igd, vs the predecessor's pipeline "
         "re-created for the benchmark (`prepare_input.py`-style JSON of RGB values, curl POST on loopback, JSON "
         "parsing, the two-pass compute path, torch.save + gzip level 9). igd is `igd serve` with defaults and an "
         "empty cache, so the chunk is the one its warm-up search picked, as on a user's first start."),
        ("Client start-up (`bench/client.py`)", load("client"), client_table,
         "Wall time of whole commands, including the interpreter's start."),
        ("Concurrency (`bench/concurrency.py`)", load("concurrency"), concurrency_table,
         "Clients sending attribute requests at once on the default model; every answer is compared with the answer "
         "to the same request alone."),
        ("Memory (`bench/memory.py`)", load("memory"), memory_table,
         "Resident memory (VmRSS, peak VmHWM) of the daemon, and of the predecessor's server re-created in "
         "bench/predecessor_server.py, on the same model."),
        ("Memory budget (`bench/budget.py`)", load("budget"), budget_table,
         "Does `--memory-budget` bound the daemon? `igd serve` with the default model and defaults otherwise, a fresh "
         "daemon for each row and budget; peak resident memory (VmHWM, reset when the daemon is ready) above the "
         "ready daemon. \"alone\": one request under a budget it fits, with what the ledger reserved for it (the "
         "compute worker's working set, one pass of the chunk, included). Pipelined: 4 requests sent at once on "
         "each of 4 connections; `overloaded` is the answer to what does not fit now, `request_too_large` to what "
         "could never fit. The budget includes one pass's working set (about 190 MiB for this model at its chunk "
         "of 2), so under 256 MiB only small requests fit."),
        ("One maximal request (`bench/max_request.py`)", load("max_request"), max_request_table,
         "Peak resident memory of `igd serve` (built-in model, CPU) above idle while it answers one attribution at "
         "the advertised maximum of 1024 steps, written by igctl to a file, against the answer's size. Before the "
         "answer was streamed (igctl asks for `stream`: the file leaves in 1 MiB data events as it is made, the path "
         "points are remade only when written, each large tensor freed once written) the same request took 5063 MiB "
         "above idle (6.75x; 6.4 GB in the issue that asked for this), measured with this script at commit 00c69d5. "
         "What remains: the per-step gradients (n_steps x C x H x W float32, 588 MiB here, 0.78x the answer), the "
         "compute thread's own allocator arena (about 200 MiB), and the activations of one pass (78 MiB saved per "
         "path point in the chunk for this model; they do not grow with n_steps)."),
        ("Accuracy (`bench/accuracy.py`)", load("accuracy"), accuracy_table,
         "IG's relative L2 error against a converged reference, for every fixed rule, for adaptive steps "
         "(`--tolerance`, cap 1024 points) and for the default request (no steps, tolerance or rule: adaptive to 5 %, "
         "at most 256 points), on the three kinds of net side by side: piecewise-linear (the built-in "
         "EfficientNet-Lite0 on the photos bundled with scikit-image, the LaNet fixture), smooth (timm's "
         "ViT-Tiny/16 with random weights: GELU, softmax attention and LayerNorm make it smooth, not training) and "
         "scale-invariant from the zero baseline (the BiT fixture). References, written in plain torch: the trapezoid "
         "on 2048 even panels graded towards the baseline (ReLU nets), the trapezoid on nodes even in log alpha, "
         "200 a decade from 1e-12 (BiT), Gauss-Legendre on 256 points (ViT); the last table gives each one's "
         "distance to itself at half the points. Each photo is attributed to its predicted class from the zero "
         "baseline. `error_estimate` is what igd reports in every result (igd/engine/accuracy.py)."),
        ("Several targets in one pass (`bench/targets.py`)", load("targets"), targets_table,
         "k targets in one request (one forward and k backwards per chunk of path points) against k requests of one "
         "target (what captum and tools without multi-target passes do), through igd's worker with the chunk the "
         "daemon uses (measured at warm-up or cached), compute only, 50 Gauss-Legendre steps, medians of 3, each way "
         "in a fresh process. The second table compares the two ways to take k input gradients from one forward."),
        ("XRAI regions (`bench/xrai.py`)", load("xrai"), xrai_table,
         "`--regions xrai` beside the attribution, on EfficientNet-Lite0's 224 x 224 input of the fixture photos with "
         "a real IG: igd's segmentation and greedy ranking (igd/engine/xrai.py) against PAIR's saliency package's "
         "GetMask given the same base attribution (its own segmentation and ranking), medians; the maps are compared "
         "bit for bit."),
        ("Soak (`bench/soak.py`)", load("soak"), soak_table,
         "16 clients, valid and invalid requests mixed, on the default model."),
        ("Whole datasets (`bench/batch.py`)", load("batch"), batch_table,
         "`igd batch` over the same images with the local backend and with Ray (2 workers, local cluster)."),
        ("GPU (`bench/gpu.py`)", load("gpu"), gpu_table,
         "BiT-S-R101x3 and LaNet (full size, random weights, 32x32), 50 steps: igd's engine against the "
         "predecessor's compute path on the same GPU, each side in the same precision mode, medians of 5."),
        ("GPU numerics and cuDNN settings (`bench/gpu_numerics.py`)", load("gpu_numerics"), gpu_numerics_table,
         "How exact float32 IG is on a GPU, and what cuDNN's settings cost or gain."),
    ]
    lines = ["# Benchmarks", "",
             "Generated by `bench/report.py` from the JSON files in `docs/benchmarks/`. Ratios compare runs from the "
             "same script run on the same machine; the machine is named in each section.", ""]
    picture = chart(engine, e2e)
    if picture:
        lines += [f"![speedups](benchmarks/{picture.name})", ""]
    for title, data, table, about in sections:
        if data is None:
            continue
        lines += [f"## {title}", "", about, "", f"Machine: {data['machine']}.", "", *table(data), ""]
    notes = RESULTS / "notes.md"
    if notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    (DOCS / "benchmarks.md").write_text("\n".join(lines))
    print(f"wrote {DOCS / 'benchmarks.md'}" + (f" and {picture}" if picture else ""))


if __name__ == "__main__":
    main()
