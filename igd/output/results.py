"""The result file: the predecessor's dict of tensors, gzip'd ``torch.save`` or ``.npz``.

Readers of the predecessor's files do::

    with gzip.open(path, "rb") as f:
        result = torch.load(BytesIO(f.read()))  # weights_only=True works

Keys are only ever added, never renamed or removed (the key table in README.md).
"""

from __future__ import annotations

import gzip
import inspect
import io
import pickle
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from torch import Tensor

from igd.engine.attribution import Attribution
from igd.engine.idgi import idgi
from igd.output.keys import COMBINED_ONLY, TARGET_AXIS
from igd.request import DEFAULT_GZIP_LEVEL, FORMATS


# The predecessor's keys, which its users' analysis code reads.
PREDECESSOR_KEYS = (
    "integrated_grads",
    "integrated_directional_grads",
    "step_sizes",
    "intermediates",
    "output",
    "target_class",
)

Result = dict[str, Any]


@dataclass(frozen=True)
class Deferred:
    """A tensor of a result that is made only when the file is written: ``fill(out)``
    writes its float32 values into ``out``, a tensor of ``shape``. Big and cheap to
    remake (the path points), it then never sits in memory beside the gradients."""

    shape: tuple[int, ...]
    fill: Callable[[Tensor], None]


def result_dict(
    attribution: Attribution,
    index: int = 0,
    *,
    model: str | None = None,
    target_name: str | None = None,
    baseline_name: str = "zero",
    defer_intermediates: bool = False,
) -> Result:
    """The predecessor's result dict of image ``index`` of a batch attribution, with the
    engine's own figures for it (igd's answers add more: igd.output.answer).

    Shapes for an input of C x H x W, K classes and n steps: ``integrated_grads``,
    ``input`` and ``baseline`` (1, C, H, W); ``integrated_directional_grads`` and
    ``intermediates`` (n, C, H, W); ``step_sizes`` (n, 1); ``alphas`` (n,);
    ``output`` and ``baseline_output`` (1, K); ``path_logits`` (n,), the target's logit at
    each path point; all float32 on the CPU, each with storage of its own (``torch.save``
    of a view would write the whole batch). The per-step gradients of a one-image
    attribution are its own already and are shared, not copied. ``defer_intermediates``:
    ``intermediates`` is a :class:`Deferred`, made only by :func:`write_result`.
    """
    if not 0 <= index < attribution.inputs.shape[0]:
        raise IndexError(f"index {index} out of range for a batch of {attribution.inputs.shape[0]}")
    result = file_arrays(attribution, [[index]], inputs=attribution.inputs[index : index + 1],
                         logits=attribution.logits[index], path_names=[baseline_name],
                         defer_intermediates=defer_intermediates)
    result.update(target_class=[int(attribution.targets[index])],
                  convergence_delta=[float(attribution.convergence_delta[index])],
                  error_estimate=[float(attribution.error_estimate[index])],
                  method=attribution.rule, n_steps=attribution.n_steps, baseline_name=baseline_name)
    if attribution.tolerance is not None:
        result.update(tolerance=attribution.tolerance, tolerance_met=bool(attribution.tolerance_met))
    if model is not None:
        result["model"] = model
    if target_name is not None:
        result["target_name"] = [target_name]
    return predecessor_layout(result)


def file_arrays(
    attribution: Attribution,
    rows: list[list[int]],
    *,
    inputs: Tensor,
    logits: Tensor,
    path_names: list[str],
    noisy: bool = False,
    defer_intermediates: bool = False,
) -> Result:
    """The arrays of the result of one image with T targets and P paths: ``rows[t][p]`` is
    the attribution's row of target t on path p. A leading target axis, and a path axis
    after it when P > 1 (``axes`` names them; docs/protocol.md): ``integrated_grads``
    (T, 1, C, H, W), the mean over the paths; ``path_integrated_grads`` (T, P, C, H, W)
    each path's (P > 1); ``integrated_directional_grads`` (T, [P,] n, C, H, W);
    ``intermediates`` ([P,] n, C, H, W); ``baseline`` and ``baseline_output`` (P, ...);
    ``path_logits`` (T, [P,] n); ``output`` (1, K) the logits at the image ``logits`` (K,);
    ``input`` the image ``inputs`` (1, C, H, W), and with noise (``noisy``) ``path_ends``
    (P, C, H, W), where each path ends; and the keys of the path (igd.engine.paths). One
    target on one path is written in the predecessor's layout (:func:`predecessor_layout`)."""
    paths = len(rows[0])
    path_axis = paths > 1
    first = [row[0] for row in rows]
    per_path = [rows[0][p] for p in range(paths)]  # one row per path (target 0's)

    def stacked(tensor: Tensor) -> Tensor:
        """(T, [P,] ...) of a per-row tensor."""
        picked = torch.stack([tensor[row] for row in rows]) if path_axis else _rows_view(tensor, first)
        return _own(picked)

    result: Result = {
        "integrated_grads": mean_integrated_grads(attribution, rows),
        "integrated_directional_grads": stacked(attribution.directional_grads),
        "step_sizes": _own(attribution.step_sizes.view(-1, 1)),
        "intermediates": _intermediates(attribution, per_path, defer_intermediates),
        "output": _own(logits.view(1, -1)),
        "axes": ["target", "path"] if path_axis else ["target"],
        "alphas": _own(attribution.alphas),
        "input": _own(inputs),
        "baseline": _own(attribution.baselines[per_path]),
        "baseline_output": _own(attribution.baseline_logits[per_path]),
        "path_logits": stacked(attribution.path_logits),
        "path_names": path_names,
    }
    if path_axis:
        result["path_integrated_grads"] = stacked(attribution.integrated_grads)
    if noisy:
        result["path_ends"] = _own(attribution.inputs[per_path])
    result.update(_curve_keys(attribution, per_path, defer_intermediates))
    return result


def predecessor_layout(result: Result) -> Result:
    """A result of one target on one path in the predecessor's layout: the target axis
    dropped (igd.output.keys.TARGET_AXIS: ``integrated_grads`` (1, C, H, W), one
    ``target_class``, ...) and the keys that describe the axes left out."""
    single: Result = {}
    for key, value in result.items():
        if key in COMBINED_ONLY:
            continue
        if key in TARGET_AXIS:
            (value,) = value  # a tensor's first (and only) row is a view of the whole storage: not copied
        single[key] = value
    return single


def idgi_of(attribution: Attribution, rows: list[list[int]]) -> Tensor:
    """(T, 1, *F): IDGI (igd.engine.idgi) of each target, the mean over its paths ``rows[t]``."""
    answers = []
    for row_set in rows:
        each = [idgi(attribution.directional_grads[r], attribution.alphas, attribution.path_logits[r],
                     float(attribution.baseline_logits[r, attribution.targets[r]]),
                     float(attribution.logits[r, attribution.targets[r]])) for r in row_set]
        answers.append(torch.stack(each).mean(dim=0, keepdim=True))
    return torch.stack(answers)


def _rows_view(tensor: Tensor, rows: list[int]) -> Tensor:
    """``tensor[rows]`` for consecutive rows as a view (no copy), else indexed."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return tensor[rows[0] : rows[0] + len(rows)]
    return tensor[rows]


def _intermediates(attribution: Attribution, paths: list[int], defer: bool) -> Tensor | Deferred:
    """([P,] n, *F): the path points of the rows ``paths`` (no path axis for one)."""
    n, shape = attribution.n_steps, tuple(attribution.inputs.shape[1:])
    if len(paths) == 1:
        return (Deferred((n, *shape), _path_filler(attribution, paths[0])) if defer
                else _own(attribution.intermediates_of(paths[0])))
    fillers = [_path_filler(attribution, row) for row in paths]

    def fill(out: Tensor) -> None:
        for filler, part in zip(fillers, out):
            filler(part)

    deferred = Deferred((len(paths), n, *shape), fill)
    if defer:
        return deferred
    made = torch.empty(deferred.shape)
    fill(made)
    return made


def _curve_keys(attribution: Attribution, paths: list[int], defer: bool) -> Result:
    """The keys the path records (igd.engine.paths: the curve's ``record()``, e.g. its name
    and parameters; none for the straight line) and, where IG needs it, its derivative
    d gamma / d alpha at every node, ``path_derivative`` ([P,] n, *F)."""
    curve = attribution.curve
    keys: Result = dict(curve.record())
    if not curve.needs_derivative:
        return keys
    n, shape = attribution.n_steps, tuple(attribution.inputs.shape[1:])

    def fill(out: Tensor) -> None:
        view = out.view(len(paths), n, *shape)
        for p, row in enumerate(paths):
            for k in range(n):  # one node at a time: no more memory than the key itself
                node = attribution.alphas[k : k + 1]
                view[p, k] = curve.velocities(attribution.inputs[row], attribution.baselines[row], node)[0]

    deferred = Deferred(((n, *shape) if len(paths) == 1 else (len(paths), n, *shape)), fill)
    if not defer:
        made = torch.empty(deferred.shape)
        fill(made)
    keys["path_derivative"] = deferred if defer else made
    return keys


_STEP_BLOCK = 64  # path points made at a time when filling a Deferred


def _path_filler(attribution: Attribution, index: int) -> Callable[[Tensor], None]:
    """Writes row ``index``'s path points (n, *F) into a tensor, a block of steps at a
    time, with the engine's own arithmetic (so the very same float32 values)."""

    def fill(out: Tensor) -> None:
        for start in range(0, attribution.n_steps, _STEP_BLOCK):
            block = slice(start, start + _STEP_BLOCK)
            out[block] = attribution.intermediates_of(index, block)

    return fill


def mean_integrated_grads(attribution: Attribution, rows: list[list[int]]) -> Tensor:
    """(T, 1, C, H, W): each target's IG, the mean over its paths (the file's ``integrated_grads``)."""
    return _own(torch.stack([attribution.integrated_grads[row].mean(dim=0, keepdim=True) for row in rows]))


def _own(tensor: Tensor) -> Tensor:
    """``tensor`` on the CPU as float32 with a storage of its own: shared when it already
    is the whole of its storage, else copied."""
    tensor = tensor.detach().to("cpu", torch.float32)
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * 4
    if whole and tensor.is_contiguous():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def encode(result: Result, fmt: str = "torch", gzip_level: int = DEFAULT_GZIP_LEVEL) -> bytes:
    """The bytes of a result file in ``fmt`` (one of :data:`FORMATS`)."""
    buffer = io.BytesIO()
    write_result(result, fmt, gzip_level, buffer)
    return buffer.getvalue()


def encode_torch(result: Result, compresslevel: int = DEFAULT_GZIP_LEVEL) -> bytes:
    return encode(result, "torch", compresslevel)


def encode_npz(result: Result) -> bytes:
    return encode(result, "npz")


def write_result(result: Result, fmt: str, gzip_level: int, out: BinaryIO, *, consume: bool = False) -> None:
    """Write a result file to ``out`` as it is made, never holding it whole in memory.

    torch: gzip(torch.save(result)), ``mtime=0``, so equal results give equal bytes.
    Gradients compress poorly: measured on EfficientNet-Lite0's 62 MB result, level 1
    gave 39 MB in 1.6 s, level 6 37 MB in 4.0 s, level 0 (stored, still gzip) 62 MB in
    0.06 s. npz: uncompressed, scalars and strings as 0-d arrays, so ``numpy.load``
    reads it without ``allow_pickle``.

    :class:`Deferred` values are made when their turn comes. ``consume`` (torch format)
    frees each large tensor's memory as soon as it is written (the result, and an
    Attribution sharing its tensors, are unusable afterwards): one maximal answer then
    costs about one (n, C, H, W) tensor at a time, not all of them at once.
    """
    if fmt == "torch":
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=gzip_level, mtime=0) as compressed:
            _torch_save(result, _InSlices(compressed), consume)
    elif fmt == "npz":
        _write_npz(result, out)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


class _InSlices(io.RawIOBase):
    """Passes writes on in slices of at most 1 MiB: torch.save hands over a whole storage
    at once (hundreds of MB), which gzip would otherwise compress, and return, in one piece."""

    def __init__(self, inner: BinaryIO) -> None:
        super().__init__()
        self._inner = inner

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _SLICE):
            self._inner.write(view[start : start + _SLICE])
        return len(view)


_SLICE = 1 << 20


def _torch_save(result: Result, out: BinaryIO, consume: bool) -> None:
    """torch.save, with Deferred tensors made (and large tensors freed, if ``consume``)
    as their turn comes. That needs torch.serialization's writer in the form it has had
    since 2.1; if it is not there, all Deferred tensors are made first and torch.save
    does the rest (the same bytes, more memory)."""
    placeholders = {key: torch.empty(value.shape) for key, value in result.items() if isinstance(value, Deferred)}
    ready = {**result, **placeholders}  # torch.empty leaves the memory untouched until filled
    fills = {placeholders[key].untyped_storage().data_ptr(): (result[key].fill, placeholders[key])
             for key in placeholders}
    if not _LEAN_SAVE:
        for fill, tensor in fills.values():
            fill(tensor)
        torch.save(ready, out)
        return
    with torch.serialization._open_zipfile_writer(out) as writer:
        torch.serialization._save(ready, _Records(writer, fills, consume), pickle, 2, False)


class _Records:
    """torch.serialization's record writer, making a Deferred tensor just before its
    storage is written, and freeing large storages right after (with ``consume``)."""

    def __init__(self, writer: Any, fills: dict[int, tuple[Callable[[Tensor], None], Tensor]], consume: bool) -> None:
        self._writer = writer
        self._fills = fills
        self._consume = consume

    def write_record(self, name: str, data: Any, size: int) -> None:
        storage = data if isinstance(data, torch.UntypedStorage) else None
        if storage is not None and storage.data_ptr() in self._fills:
            fill, tensor = self._fills.pop(storage.data_ptr())
            fill(tensor)
        self._writer.write_record(name, data, size)
        if storage is not None and self._consume and size >= _CONSUMED_BYTES:
            storage.resize_(0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)


_CONSUMED_BYTES = 1 << 20
_LEAN_SAVE = hasattr(torch.serialization, "_open_zipfile_writer") and list(
    inspect.signature(getattr(torch.serialization, "_save", lambda: None)).parameters
) == ["obj", "zip_file", "pickle_module", "pickle_protocol", "_disable_byteorder_record"]


def _write_npz(result: Result, out: BinaryIO) -> None:
    with zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in result.items():
            if isinstance(value, Deferred):
                value_tensor = torch.empty(value.shape)
                value.fill(value_tensor)
                value = value_tensor
            array = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
            with archive.open(f"{key}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            del array, value  # a Deferred's tensor goes now; shared ones stay (numpy views pin them)


def decode_torch(data: bytes) -> Result:
    """Read a torch result file's bytes the way the predecessor's users do."""
    with gzip.open(io.BytesIO(data), "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)
