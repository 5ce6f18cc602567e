"""The command-line flags of the request options (igd.request), for igctl, `igd batch` and
`igd check` alike: the same names, defaults and help everywhere.

The flags take their values as plain ints, numbers and strings and leave every check to
igd.request.parse_attribute, so that a bad value gets the very message the daemon gives
(naming the flag instead of the wire argument), whichever command it was given to.
Torch-free: igctl imports this module.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from igd import request as spec

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def flag(option: spec.Option, *, choices: tuple[str, ...] | None = None, help: str | None = None) -> Decorator:
    """A click option for ``option``: ``--steps`` passes ``n_steps=...`` to the command,
    or None when it is not given (the default is shown in the help, and applied by
    igd.request, which can then tell "not given" from "given the default value")."""
    if option.kind is bool:  # a switch: given or not (None, so that the request default applies)
        return click.option(option.flag, option.name, is_flag=True, default=None, help=help or option.help)
    kind = {int: int, float: float, str: str}[option.kind]
    shown = choices if choices is not None else option.choices
    return click.option(
        option.flag,
        option.name,
        type=kind,
        default=None,
        show_default=False if option.default is None else str(option.default),
        metavar=f"[{'|'.join(shown)}]" if shown else kind.__name__.upper().replace("STR", "TEXT"),
        help=help or option.help,
    )


def attribute_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """--steps, --tolerance, --method, --baseline, --samples, --noise, --path, --idgi, --metrics,
    --top-k, --seed, --blur-sigma, --gzip-level (the format flag differs between commands: each adds
    its own)."""
    steps_help = (f"{spec.STEPS.help} At most {spec.MAX_STEPS} (`igd serve --max-steps` may allow more); "
                  "with --tolerance, the most it may take.")
    for decorator in reversed((
        flag(spec.STEPS, help=steps_help),
        flag(spec.TOLERANCE),
        flag(spec.METHOD),
        flag(spec.BASELINE),
        flag(spec.SAMPLES),
        flag(spec.NOISE),
        flag(spec.PATH),
        flag(spec.IDGI),
        flag(spec.METRICS, help=spec.METRICS.help),
        flag(spec.TOP_K),
        flag(spec.SEED),
        flag(spec.BLUR_SIGMA),
        flag(spec.GZIP_LEVEL),
    )):
        command = decorator(command)
    return command


def checked_request(values: dict[str, Any], *, max_steps: int = spec.MAX_STEPS) -> spec.AttributeRequest:
    """The request the flags describe; a usage error (exit 2) naming the flag otherwise."""
    try:
        return spec.parse_attribute(values, max_steps=max_steps)
    except spec.RequestError as error:
        raise click.UsageError(error.message("flag")) from None
