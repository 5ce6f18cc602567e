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


# The request options whose flags each command adds itself: --format (`igd batch` adds parquet),
# and igctl's --heatmap (a PNG path) and --progress-json (JSON lines on stdout).
OWN_FLAGS = (spec.FORMAT.name, spec.HEATMAP.name, spec.PROGRESS.name)


def _help(option: spec.Option) -> str | None:
    """A flag's help where it says more than the option's."""
    if option is spec.STEPS:
        return (f"{spec.STEPS.help} At most {spec.MAX_STEPS} (`igd serve --max-steps` may allow more); "
                "with --tolerance, the most it may take.")
    return None


def attribute_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """A flag for each of igd.request.ATTRIBUTE_OPTIONS, in its order (--steps, --tolerance,
    --method, ...), but OWN_FLAGS."""
    for option in reversed(spec.ATTRIBUTE_OPTIONS):
        if option.name not in OWN_FLAGS:
            command = flag(option, help=_help(option))(command)
    return command


def checked_request(values: dict[str, Any], *, max_steps: int = spec.MAX_STEPS) -> spec.AttributeRequest:
    """The request the flags describe; a usage error (exit 2) naming the flag otherwise."""
    try:
        return spec.parse_attribute(values, max_steps=max_steps)
    except spec.RequestError as error:
        raise click.UsageError(error.message("flag")) from None
