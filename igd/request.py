"""What a request may ask for: every option, its default, its limits and its check, once.

The daemon (wire arguments), igctl (its flags), `igd batch` and `igd check` all read
their options, defaults and choices from here, and all validate through
:func:`parse_attribute` / :func:`parse_classify`, so a request gets the same decision and
the same message wherever it comes from; only the option's *name* differs (``args.n_steps``
on the wire, ``--steps`` on a command line).

Torch-free (the standard library and igd.protocol): igctl imports this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from igd.protocol import BAD_REQUEST, shown

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
BASELINES = ("zero", "black", "white", "blur", "uniform")
# --path's choices: the straight line (IG, first: the default), or Blur IG's. igd.engine.paths
# makes each (its PATH_KINDS); a new path adds its name here, and to OWN_STARTS if it makes its own start.
PATHS = ("straight", "blur")
# The paths that start from a point of their own made from the image, not from a baseline
# (--baseline does not apply): what that start is, for messages.
OWN_STARTS = {"blur": "the blurred image"}
FORMATS = ("torch", "npz")
BATCH_FORMATS = (*FORMATS, "parquet")  # `igd batch` also writes rows (igd.batch.outputs.ParquetShards)
SUFFIXES = {"torch": ".gzip", "npz": ".npz"}  # result files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

DEFAULT_STEPS = 50
MAX_STEPS = 1024  # `igd serve --max-steps`' default; `igd batch` and `igd check` use it too
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_GZIP_LEVEL = 1
MAX_TOP = 1000
MAX_BLUR_SIGMA = 1000.0
ADAPTIVE = "adaptive"  # the rule of a request with a tolerance (igd.engine.adaptive)
# The fewest points an adaptive request may be capped at: its first look (16 Gauss-Legendre
# points) and, where that is not enough, the path's two ends (igd.engine.adaptive).
ADAPTIVE_START = 18
DEFAULT_TOLERANCE = 0.05  # a request that names neither steps, a tolerance nor a rule: adaptive steps to this
DEFAULT_CAP = 256  # ... in at most this many points (tolerance_met says whether they were enough)
MIN_TOLERANCE = 1e-4
MAX_TARGETS = 16  # targets of one attribution (a list, or top_k)
XRAI_BASELINES = ("black", "white")  # XRAI's, where the request names none
MAX_PATHS = 64  # baselines x samples of one attribution
WARN_ERROR = DEFAULT_TOLERANCE  # igctl warns when the estimated error is above


@dataclass(frozen=True)
class Option:
    """One request option: its wire name, its command-line flag, its type and limits."""

    name: str  # the wire argument, e.g. "n_steps"
    flag: str  # the flag of igctl and igd batch, e.g. "--steps"
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    many: bool = False  # names, comma-separated (on the wire also a list): a tuple in the request
    attribute: str = ""  # its AttributeRequest field, where that is not ``name``

    @property
    def field(self) -> str:
        """The AttributeRequest field that holds it."""
        return self.attribute or self.name

    @property
    def request_default(self) -> Any:
        """The default as AttributeRequest holds it: a tuple of names for ``many``."""
        if self.many:
            return () if self.default is None else (self.default,)
        return self.default

    def check(self, value: Any, *, high: float | None = None) -> Any:
        """``value`` (None: the default) if it is allowed, else RequestError. ``high``
        overrides the upper limit (a daemon's ``--max-steps``)."""
        if value is None:
            return self.default
        upper = self.high if high is None else high
        if isinstance(value, bool) != (self.kind is bool) or not isinstance(value, _ACCEPTED[self.kind]):
            raise RequestError(self, f"must be {_KIND_NAMES[self.kind]}, got {type(value).__name__}")
        if self.choices and value not in self.choices:
            raise RequestError(self, f"must be one of {', '.join(self.choices)}, got {shown(value)}", choices=self.choices)
        if self.kind is float:
            if not math.isfinite(value):
                raise RequestError(self, f"must be a finite number, got {value}")
            value = float(value)
        if (self.low is not None and value < self.low) or (upper is not None and value > upper):
            raise RequestError(self, f"must be between {_number(self.low)} and {_number(upper)}, got {_number(value)}")
        return value


_ACCEPTED: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class RequestFailed(Exception):
    """A request that cannot be answered, in the stable vocabulary of igd.protocol's
    error codes (``bad_image``, ``unknown_target``, ...): the daemon sends it as a wire
    error, `igd batch` writes it as a status row, igctl shows it."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


class RequestError(ValueError):
    """A request option that is not allowed. ``problem`` is the same wherever the request
    came from; :meth:`message` puts the caller's name for the option in front of it."""

    def __init__(self, option: Option, problem: str, *, choices: tuple[str, ...] = ()) -> None:
        super().__init__(f"{option.flag} {problem}")
        self.option = option
        self.problem = problem
        self.choices = choices

    def message(self, style: str = "flag") -> str:
        """``style`` "flag" (``--steps must ...``) or "wire" (``args.n_steps must ...``)."""
        name = self.option.flag if style == "flag" else f"args.{self.option.name}"
        return f"{name} {self.problem}"

    def failed(self) -> RequestFailed:
        """As the daemon refuses it: ``bad_request``, naming the wire argument."""
        details: dict[str, Any] = {"arg": self.option.name}
        if self.choices:
            details["choices"] = list(self.choices)
        return RequestFailed(BAD_REQUEST, self.message("wire"), details)


STEPS = Option("n_steps", "--steps", int, DEFAULT_STEPS,
               "Path points (gradient evaluations) per image, placed by a fixed rule: captum's and the "
               "predecessor's (50 when only --method is given). Without --steps, --tolerance and --method: "
               f"adaptive steps to an estimated {DEFAULT_TOLERANCE * 100:g} % error in at most {DEFAULT_CAP} points.",
               low=1, high=MAX_STEPS)
METHOD = Option("method", "--method", str, RULES[0], "Quadrature rule, as captum's.", choices=RULES)
BASELINE = Option("baseline", "--baseline", str, BASELINES[0],
                  "zero: zeros in the model's input space (the predecessor's); black, white, blur, uniform: "
                  "made in pixel space and normalised like the image. Several, comma-separated (black,white): "
                  "each one's attribution, and their mean.", choices=BASELINES, many=True, attribute="baselines")
SAMPLES = Option("samples", "--samples", int, 1,
                 "Paths per baseline, each with its own draw: of --noise, and of a uniform or blur baseline "
                 "(expected-gradients style); IG is their mean. Sample s uses seed + s.", low=1, high=MAX_PATHS)
NOISE = Option("noise", "--noise", float, 0.0,
               "SmoothGrad over IG: Gaussian noise of this sigma, relative to the pixel range [0, 1], added to "
               "the image of each sample.", low=0.0, high=1.0)
PATH = Option("path", "--path", str, PATHS[0],
              "straight: IG's line from the baseline; blur: Blur IG, from the image blurred by --blur-sigma "
              "[default there: the shorter side / 4] to the image.", choices=PATHS)
IDGI = Option("idgi", "--idgi", bool, False, "Also compute IDGI (Yang et al. 2023) from the same pass.")
METRICS = Option("metrics", "--metrics", str, None,
                 "Faithfulness: insertion, deletion or both (comma-separated): the target's probability as the "
                 "most attributed pixels are put in or taken out, 16 steps (docs/protocol.md).",
                 choices=("insertion", "deletion"), many=True)
REGIONS = Option("regions", "--regions", str, None,
                 "xrai: also rank image regions by attribution (XRAI, Kapishnikov et al. 2019, as PAIR's saliency "
                 "package): the result's xrai map and segments. Its IG is from the black and white baselines "
                 "unless --baseline is given.", choices=("xrai",))
TOP_K = Option("top_k", "--top-k", int, None, "Attribute to the K most likely classes, most likely first.",
               low=1, high=MAX_TARGETS)
SEED = Option("seed", "--seed", int, 0, "Seed of the random draws (uniform and sampled blur baselines, --noise).",
              low=-(2**63), high=2**63 - 1)
BLUR_SIGMA = Option("blur_sigma", "--blur-sigma", float, None,
                    "Sigma of the 'blur' baseline, in model-input pixels [default: the shorter side / 16]; "
                    "with --samples, each sample's is drawn from (0, 2 x this]. With --path blur: the start's.",
                    low=0.0, high=MAX_BLUR_SIGMA)
FORMAT = Option("format", "--format", str, FORMATS[0],
                "torch: the predecessor's gzip'd torch.save dict; npz: the same keys for numpy.", choices=FORMATS)
GZIP_LEVEL = Option("gzip_level", "--gzip-level", int, DEFAULT_GZIP_LEVEL,
                    "Compression of torch results, 0-9: 0 is fastest (still gzip), 9 smallest.", low=0, high=9)
TOLERANCE = Option("tolerance", "--tolerance", float, None,
                   "Adaptive steps: place path points until IG's estimated relative L2 error is at most this "
                   "(e.g. 0.02); --steps is then the cap [default cap: the daemon's --max-steps]. A request "
                   f"with neither this nor --steps or --method is adaptive to {DEFAULT_TOLERANCE:g}.",
                   low=MIN_TOLERANCE, high=1.0)
HEATMAP = Option("heatmap", "--heatmap", bool, False, "Also render a heatmap PNG.")
PROGRESS = Option("progress", "--progress-json", bool, False, "Send progress events while the request runs.")
STREAM = Option("stream", "--stream", bool, False,
                "Send the result file in data events as it is made, not in the response (docs/protocol.md).")
TOP = Option("top", "--top", int, 5, "How many of the most likely classes.", low=1, high=MAX_TOP)

# The options of an attribution, in the order of their flags' help. Everything else follows
# from this table: AttributeRequest's defaults, parse_attribute, log_fields, the flags
# (igd.flags), hello's capabilities (igd.service).
ATTRIBUTE_OPTIONS = (STEPS, TOLERANCE, METHOD, BASELINE, SAMPLES, NOISE, PATH, IDGI, METRICS, REGIONS, TOP_K, SEED,
                     BLUR_SIGMA, FORMAT, GZIP_LEVEL, HEATMAP, PROGRESS)
CLASSIFY_OPTIONS = (TOP, PROGRESS)
BY_NAME = {option.name: option for option in (*ATTRIBUTE_OPTIONS, *CLASSIFY_OPTIONS, STREAM)}
REQUEST_OPTIONS = tuple(option for option in ATTRIBUTE_OPTIONS if option is not PROGRESS)  # AttributeRequest's
LOGGED = (STEPS, METHOD, BASELINE)  # on every attribution's log line
LOGGED_WHEN_CHANGED = (TOLERANCE, SAMPLES, NOISE, PATH, IDGI, TOP_K, METRICS, REGIONS)  # there when not the default


def _default(option: Option) -> Any:
    """An AttributeRequest field's default: the option's, read from the table when a request is made."""
    return field(default_factory=lambda: option.request_default)


@dataclass(frozen=True)
class AttributeRequest:
    """One attribution, validated: what to compute and how to return it (the image and
    the target travel beside it: the target needs the model's classes to check). A field
    per option of REQUEST_OPTIONS (its ``field``), defaulted by the option."""

    n_steps: int = _default(STEPS)  # with a tolerance: the most points it may take
    method: str = _default(METHOD)  # with a tolerance: ADAPTIVE
    tolerance: float | None = _default(TOLERANCE)
    baselines: tuple[str, ...] = _default(BASELINE)
    samples: int = _default(SAMPLES)
    noise: float = _default(NOISE)
    path: str = _default(PATH)
    idgi: bool = _default(IDGI)
    metrics: tuple[str, ...] = _default(METRICS)  # of igd.engine.faithfulness.METRICS
    regions: str | None = _default(REGIONS)  # "xrai" (igd.engine.xrai)
    top_k: int | None = _default(TOP_K)
    seed: int = _default(SEED)
    blur_sigma: float | None = _default(BLUR_SIGMA)
    format: str = _default(FORMAT)
    gzip_level: int = _default(GZIP_LEVEL)
    heatmap: bool = _default(HEATMAP)

    @property
    def baseline(self) -> str:
        """The baselines as the request named them: ``black,white``."""
        return ",".join(self.baselines)

    @property
    def paths(self) -> int:
        """Paths per image: baselines x samples."""
        return len(self.baselines) * self.samples

    def log_fields(self) -> dict[str, Any]:
        """The options for the request's log line, under their wire names (``baseline``
        as given: ``black,white``): LOGGED, and LOGGED_WHEN_CHANGED where not the default."""
        fields: dict[str, Any] = {option.name: getattr(self, option.name) for option in LOGGED}
        for option in LOGGED_WHEN_CHANGED:
            value = getattr(self, option.field)
            if value != option.request_default:
                fields[option.name] = value
        return fields


def parse_attribute(args: Mapping[str, Any], *, max_steps: int = MAX_STEPS) -> AttributeRequest:
    """Check the options of an attribution (wire args, or flags under their wire names);
    RequestError for the first that is not allowed. Unknown keys are ignored.

    With a ``tolerance`` the rule is ADAPTIVE and ``n_steps`` caps the points (default:
    ``max_steps``); giving a ``method`` as well is an error, since the tolerance places
    the points itself. A request that gives none of the three gets adaptive steps to
    DEFAULT_TOLERANCE in at most DEFAULT_CAP points where adaptive steps apply (one straight
    path: see _check_combination), else the fixed default rule; ``n_steps`` alone (or a
    ``method``) asks for the fixed rule, captum's and the predecessor's."""
    tolerance = TOLERANCE.check(args.get(TOLERANCE.name))
    steps = STEPS.check(args.get(STEPS.name), high=max_steps)
    method = METHOD.check(args.get(METHOD.name))
    given = {option.field: _checked(option, args.get(option.name)) for option in REQUEST_OPTIONS
             if option.name not in (STEPS.name, METHOD.name, TOLERANCE.name)}
    if given["regions"] is not None and args.get(BASELINE.name) is None and given["path"] not in OWN_STARTS:
        given["baselines"] = XRAI_BASELINES
    fixed = args.get(STEPS.name) is not None or args.get(METHOD.name) is not None
    if tolerance is None and not fixed and max_steps >= ADAPTIVE_START and _one_straight_path(given):
        tolerance, steps = DEFAULT_TOLERANCE, min(DEFAULT_CAP, max_steps)
    elif tolerance is not None:
        if args.get(METHOD.name) is not None:
            raise RequestError(METHOD, "cannot be given with a tolerance, which places the points itself")
        if args.get(STEPS.name) is None:
            steps = max_steps
        if steps < ADAPTIVE_START:
            raise RequestError(STEPS, f"must be at least {ADAPTIVE_START} with a tolerance (its first look "
                                      f"along the path and its ends), got {steps}")
    if tolerance is not None:
        method = ADAPTIVE
    elif method != "gausslegendre" and steps < 2:
        raise RequestError(STEPS, f"must be at least 2 for {method}, got {steps}")
    request = AttributeRequest(n_steps=steps, method=method, tolerance=tolerance, **given)
    _check_combination(request, args)
    return request


def _one_straight_path(given: Mapping[str, Any]) -> bool:
    """Whether the options ``given`` (AttributeRequest fields) ask for one straight path per
    image, the kind adaptive steps integrate."""
    return (given["samples"] == 1 and len(given["baselines"]) == 1 and given["path"] == PATHS[0]
            and given["noise"] == 0.0)


def _checked(option: Option, value: Any) -> Any:
    """``value`` (None: the default) as AttributeRequest holds it, if allowed; else RequestError."""
    return _names(option, value) if option.many else option.check(value)


def _names(option: Option, value: Any) -> tuple[str, ...]:
    """One of the option's names, several comma-separated, or (on the wire) a list of them."""
    if value is None:
        return option.request_default
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (list, tuple)) and value and all(isinstance(name, str) for name in value):
        names = list(value)
    else:
        raise RequestError(option, f"must be a name, comma-separated names or a list of names, got {shown(value)}")
    for name in names:
        option.check(name)
    if len(set(names)) != len(names):
        raise RequestError(option, f"names one twice: {','.join(names)}")
    return tuple(names)


def _check_combination(request: AttributeRequest, args: Mapping[str, Any]) -> None:
    """The options that cannot go together, each refused with the reason."""
    if request.paths > MAX_PATHS:
        raise RequestError(SAMPLES, f"x {len(request.baselines)} baselines is {request.paths} paths; at most {MAX_PATHS}")
    random = {"uniform"} | ({"blur"} if request.blur_sigma != 0.0 else set())  # a zero sigma draws nothing
    if request.samples > 1 and request.noise == 0.0 and not set(request.baselines) & random:
        raise RequestError(SAMPLES, "above 1 needs --noise or a random baseline (uniform, blur): every sample "
                                    "would be the same path")
    if request.seed + request.samples - 1 > SEED.high:  # type: ignore[operator]
        raise RequestError(SEED, f"+ samples - 1 must be at most {_number(SEED.high)}")
    own_start = OWN_STARTS.get(request.path)
    if own_start is not None and args.get("baseline") is not None:
        raise RequestError(BASELINE, f"does not apply to --path {request.path}, whose start is {own_start}")
    if own_start is not None and request.samples > 1 and request.noise == 0.0:
        raise RequestError(SAMPLES, f"above 1 needs --noise with --path {request.path}: every sample would be the "
                                    "same path")
    if request.tolerance is not None and request.regions is not None and args.get(BASELINE.name) is None:
        raise RequestError(REGIONS, "ranks IG from the black and white baselines, two paths, which adaptive steps "
                                    "cannot integrate yet: leave out --tolerance, or give one --baseline")
    if request.tolerance is not None:
        for option, given in ((SAMPLES, request.samples > 1), (BASELINE, len(request.baselines) > 1),
                              (PATH, request.path != PATHS[0]), (NOISE, request.noise > 0)):
            if given:
                raise RequestError(option, "cannot be given with a tolerance yet (adaptive steps place the "
                                           "points of one straight path)")


def target_count(targets: int | tuple[int, ...] | None, top_k: int | None) -> int:
    """How many targets an attribution explains: a tuple's, ``top_k`` when the targets are
    left to the model, else one."""
    if isinstance(targets, tuple):
        return len(targets)
    return top_k if targets is None and top_k else 1


def check_targets(value: Any, top_k: int | None = None) -> list[str | int] | None:
    """The targets' types: a class name or an index, a list of them, or nothing (the
    predicted class, or the ``top_k`` most likely); whether the model has those classes is
    for the model to say."""
    if value is None:
        return None
    if top_k is not None:
        raise RequestError(TOP_K, "cannot be given with a target")
    values = value if isinstance(value, list) else [value]
    if not values or len(values) > MAX_TARGETS:
        raise RequestError(TARGET, f"must name 1 to {MAX_TARGETS} classes, got {len(values)}")
    for item in values:
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise RequestError(TARGET, f"must be a class name, an index, a list of them or nil, "
                                       f"got {type(item).__name__}")
    return values


TARGET = Option("target", "TARGET", str, None, "Class name (case-insensitive) or index [default: the predicted class].")
