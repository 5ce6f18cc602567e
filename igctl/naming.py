"""Naming: which command-line arguments are images and which the target, and where each image's results go.

Result and heatmap paths are worked out, and checked writable, before anything is sent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from igctl.client import EXIT_REFUSED
from igctl.session import Failure
from igd import request as spec

STDIO = "-"


def image_label(image: str) -> str:
    return "stdin" if image == STDIO else Path(image).name


def target_class(target: str) -> str | int:
    """A class index when the target is all digits, else a class name."""
    return int(target) if target.isascii() and target.isdecimal() else target


def images_and_target(args: tuple[str, ...], target: str | None, files_from: Any,
                      has_targets: bool = False) -> tuple[list[str], str | None]:
    """Positional arguments are images, but a last one that is no file is the TARGET
    (when there is an image before it, or images come from --files-from, and no --target
    is given). A last one that is no file but looks like one is a mistyped image, not a
    target."""
    images = list(args)
    has_other_images = len(args) >= 2 or files_from is not None
    if target is None and not has_targets and args and has_other_images and args[-1] != STDIO and not Path(args[-1]).is_file():
        last = args[-1]
        if last.lower().endswith(spec.IMAGE_SUFFIXES) or os.sep in last:
            raise click.UsageError(
                f"{last}: no such file. Did you mean to pass several images? Check its name; "
                "a target goes last or with --target, and cannot look like a file name"
            )
        target = images.pop()
    if files_from is not None:
        images += [line.strip() for line in files_from if line.strip()]
    return images, target


def output_paths(
    images: list[str], output: str | None, out_dir: Path | None, heatmap: Path | None, suffix: str
) -> dict[str, tuple[Path | None, Path | None]]:
    """(result path, heatmap path) of each image; a result path of None means stdout.

    Without -o, results are named after their image: in the current directory, or
    under ``out_dir`` at the image's path relative to the images' common folder (as
    `igd batch` names its outputs), so that cats/001.png and dogs/001.png stay apart."""
    relative = relative_names(images) if out_dir is not None or (heatmap is not None and len(images) > 1) else {}
    paths: dict[str, tuple[Path | None, Path | None]] = {}
    for image in images:
        if output == STDIO:
            result: Path | None = None
        elif output is not None:
            result = Path(output)
        elif out_dir is not None:
            result = out_dir / relative[image].with_suffix(suffix)
        else:
            result = Path(stem(image) + suffix)
        if heatmap is None or len(images) == 1:
            heatmap_path = heatmap
        else:
            heatmap_path = heatmap / relative[image].with_suffix(".png")
        paths[image] = (result, heatmap_path)
    return paths


def relative_names(images: list[str]) -> dict[str, Path]:
    """Each image's path relative to the deepest folder that holds them all."""
    files = {image: os.path.abspath(image) for image in images if image != STDIO}
    root = os.path.commonpath([os.path.dirname(path) for path in files.values()]) if files else "."
    names = {image: Path(os.path.relpath(path, root)) for image, path in files.items()}
    if STDIO in images:
        names[STDIO] = Path("stdin")
    return names


def stem(image: str) -> str:
    return "stdin" if image == STDIO else Path(image).stem


def preflight(outputs: dict[str, tuple[Path | None, Path | None]], force: bool, make_dirs: bool) -> None:
    """Fail before any request if a result could not be written: two images with one
    result path, a missing or unwritable folder, an existing file without --force."""
    problems: list[str] = []
    claimed: dict[Path, str] = {}
    for image, paths in outputs.items():
        for path in paths:
            if path is None:
                continue
            if path in claimed:
                problems.append(f"{image} and {claimed[path]} would both write {path}; give the files distinct names")
                continue
            claimed[path] = image
            problem = unwritable(path, force, make_dirs)
            if problem:
                problems.append(problem)
    if problems:
        shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
        raise Failure("nothing was sent:\n  " + "\n  ".join(shown), EXIT_REFUSED)


def unwritable(path: Path, force: bool, make_dirs: bool) -> str | None:
    """Why ``path`` cannot take a result file, or None."""
    folder = path.parent
    if make_dirs:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create {error.filename or folder}: {error.strerror}"
    if not folder.is_dir():
        return f"cannot write {path}: folder {folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {path}: permission denied on {folder}"
    if path.is_dir():
        return f"cannot write {path}: it is a directory"
    if (path.exists() or path.is_symlink()) and not force:
        return f"{path} exists (use --force to overwrite)"
    return None
