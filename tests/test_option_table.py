"""The option table of igd/request.py is the one source: AttributeRequest's defaults,
parse_attribute, the log fields, the flags of igctl, `igd batch` and `igd check`, and
hello's capabilities all follow it; and a flag error of `igd batch` / `igd check` comes
before anything imports torch."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import pytest
from click.testing import CliRunner

from igd import protocol
from igd import request as spec
from igd.flags import OWN_FLAGS, attribute_flags, checked_request, flag

IGD = str(Path(sys.executable).parent / "igd")
FAKE_TORCH = 'raise ImportError("torch imported")\n'


def a_command(*decorators: Callable[..., Any]) -> click.Command:
    """A click command with ``decorators`` (made now: it sees the table as it is now)."""

    def run(**options: Any) -> None:
        click.echo(repr(checked_request(options)))

    for decorator in reversed(decorators):
        run = decorator(run)
    return click.command()(run)


def params(command: click.Command) -> dict[str, click.Parameter]:
    return {param.name: param for param in command.params if param.name}


def hello(limits: Any = None) -> dict[str, Any]:
    from igd.serve.service import Limits, Service

    service = Service(limits or Limits(), max_pending=1)
    return asyncio.run(service.hello({}, {}))["capabilities"]


# --- one table ---------------------------------------------------------------------------


def test_every_request_field_is_an_option_and_defaults_to_it() -> None:
    fields = [f.name for f in dataclasses.fields(spec.AttributeRequest)]
    assert sorted(fields) == sorted(o.field for o in spec.REQUEST_OPTIONS)
    request = spec.AttributeRequest()
    for option in spec.REQUEST_OPTIONS:
        assert getattr(request, option.field) == option.request_default, option.name
    assert request.baselines == ("zero",) and request.metrics == () and request.n_steps == 50
    assert spec.parse_attribute({"n_steps": 50}) == request


def test_a_request_that_names_no_rule_is_adaptive_to_five_percent_where_it_can_be() -> None:
    default = spec.parse_attribute({})
    assert (default.method, default.tolerance, default.n_steps) == (spec.ADAPTIVE, 0.05, spec.DEFAULT_CAP)
    assert spec.parse_attribute({}, max_steps=100).n_steps == 100  # a daemon's --max-steps caps it
    assert spec.parse_attribute({"top_k": 3, "idgi": True, "baseline": "black"}).method == spec.ADAPTIVE
    # steps or a rule ask for the fixed rule, captum's and the predecessor's
    assert (spec.parse_attribute({"n_steps": 50}).method, spec.parse_attribute({"n_steps": 50}).tolerance) == (
        "gausslegendre", None)
    assert spec.parse_attribute({"method": "riemann_left"}).n_steps == spec.DEFAULT_STEPS
    # several paths, noise and Blur IG are not for adaptive steps yet: the fixed default rule
    for args in ({"baseline": "black,white"}, {"samples": 2, "noise": 0.1}, {"noise": 0.1}, {"path": "blur"}):
        request = spec.parse_attribute(args)
        assert (request.method, request.n_steps, request.tolerance) == ("gausslegendre", 50, None), args
    assert spec.parse_attribute({}, max_steps=spec.ADAPTIVE_START - 1).method == "gausslegendre"


def test_log_fields_as_before() -> None:
    assert spec.AttributeRequest().log_fields() == {"n_steps": 50, "method": "gausslegendre", "baseline": "zero"}
    request = spec.parse_attribute({"baseline": "black,white", "samples": 2, "noise": 0.1, "top_k": 3,
                                    "metrics": "insertion", "idgi": True, "seed": 4, "gzip_level": 9})
    assert list(request.log_fields().items()) == [
        ("n_steps", 50), ("method", "gausslegendre"), ("baseline", "black,white"), ("samples", 2), ("noise", 0.1),
        ("idgi", True), ("top_k", 3), ("metrics", ("insertion",))]
    adaptive = spec.parse_attribute({"tolerance": 0.02})
    assert adaptive.log_fields() == {"n_steps": spec.MAX_STEPS, "method": spec.ADAPTIVE, "baseline": "zero",
                                     "tolerance": 0.02}


def test_the_commands_flags_are_the_tables() -> None:
    from igctl.cli import attribute
    from igd.cli import batch, check

    for command in (attribute, batch, check):
        flags = params(command)
        for option in spec.ATTRIBUTE_OPTIONS:
            if option.name in OWN_FLAGS:
                continue
            param = flags[option.name]
            assert param.opts == [option.flag] and param.default is None, (command.name, option.name)
            assert param.help is not None and param.help.startswith(option.help), (command.name, option.name)
    assert params(attribute)["format"].opts == ["--format"] and params(batch)["format"].opts == ["--format"]
    assert "format" not in params(check)


def test_the_adaptive_start_is_request_pys() -> None:
    from igd.engine import adaptive

    assert adaptive.START_POINTS == spec.ADAPTIVE_START == adaptive.FIRST_LOOK + 2  # the look, then the ends
    spec.parse_attribute({"tolerance": 0.05, "n_steps": spec.ADAPTIVE_START})
    with pytest.raises(spec.RequestError, match=f"at least {spec.ADAPTIVE_START} with a tolerance"):
        spec.parse_attribute({"tolerance": 0.05, "n_steps": spec.ADAPTIVE_START - 1})


def test_one_list_of_ops() -> None:
    from igd.serve.service import Service

    assert protocol.OPS == ("hello", "status", "classify", "attribute")
    assert set(protocol.COMPUTE_OPS) < set(protocol.OPS)
    assert all(callable(getattr(Service, op)) for op in protocol.OPS)


def test_hello_tells_the_tables_choices_limits_and_defaults() -> None:
    capabilities = hello()
    assert capabilities["ops"] == list(protocol.OPS)
    assert capabilities["methods"] == list(spec.RULES) and capabilities["baselines"] == list(spec.BASELINES)
    assert capabilities["formats"] == ["torch", "npz"] and capabilities["paths"] == ["straight", "blur"]
    assert capabilities["limits"]["max_targets"] == 16 and capabilities["limits"]["max_paths"] == 64
    assert capabilities["defaults"]["attribute"] == {o.name: o.default for o in spec.ATTRIBUTE_OPTIONS}
    assert capabilities["defaults"]["attribute"]["n_steps"] == 50
    assert capabilities["defaults"]["classify"]["top"] == 5


def test_a_changed_option_shows_up_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    # The Option objects are frozen; their __dict__ is what a change to the table would change.
    monkeypatch.setitem(vars(spec.STEPS), "default", 64)
    monkeypatch.setitem(vars(spec.BASELINE), "default", "black")
    monkeypatch.setitem(vars(spec.PATH), "choices", ("straight",))
    monkeypatch.setitem(vars(spec.SAMPLES), "high", 8)

    request = spec.AttributeRequest()
    assert request.n_steps == 64 and request.baselines == ("black",)
    assert spec.parse_attribute({"method": "gausslegendre"}) == request  # a rule named: the fixed one, its steps
    assert request.log_fields() == {"n_steps": 64, "method": "gausslegendre", "baseline": "black"}

    command = a_command(attribute_flags, flag(spec.FORMAT))
    flags = params(command)
    assert flags["n_steps"].show_default == "64" and flags["baseline"].show_default == "black"
    shown = CliRunner().invoke(command, ["--help"], terminal_width=200)
    assert re.search(r"\[default: \(?64\)?\]", shown.output) and "[straight]" in shown.output, shown.output
    ran = CliRunner().invoke(command, ["--method", "gausslegendre"])
    assert ran.exit_code == 0 and "n_steps=64" in ran.output and "baselines=('black',)" in ran.output
    refused = CliRunner().invoke(command, ["--path", "blur"])
    assert refused.exit_code == 2 and "--path must be one of straight, got 'blur'" in refused.output
    refused = CliRunner().invoke(command, ["--samples", "9", "--noise", "0.1"])
    assert refused.exit_code == 2 and "--samples must be between 1 and 8, got 9" in refused.output

    capabilities = hello()
    assert capabilities["defaults"]["attribute"]["n_steps"] == 64
    assert capabilities["defaults"]["attribute"]["baseline"] == "black"
    assert capabilities["paths"] == ["straight"] and capabilities["limits"]["max_paths"] == 8


# --- flag errors before torch ------------------------------------------------------------


@pytest.fixture
def no_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing torch fails loudly (PYTHONPATH comes before site-packages)."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    return {**os.environ, "PYTHONPATH": str(fake)}


def igd_without_torch(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    run = subprocess.run([IGD, *args], capture_output=True, text=True, timeout=120, env=env)
    return run, time.perf_counter() - started


@pytest.mark.parametrize("command,problem", [
    (["batch", "{dir}", "{out}", "--steps", "0"], "--steps must be between 1 and 1024, got 0"),
    (["batch", "{dir}", "{out}", "--method", "riemann_left", "--steps", "1"],
     "--steps must be at least 2 for riemann_left, got 1"),
    (["batch", "{dir}", "{out}", "--format", "png"], "--format must be one of torch, npz, parquet, got 'png'"),
    (["batch", "{dir}", "{out}", "--top-k", "2", "-t", "cat"], "give --top-k or --target, not both"),
    (["batch", "{dir}", "{out}", "--max-batch", "0"], "use 'auto', 'measure' or a positive number"),
    (["check", "--steps", "0"], "--steps must be between 1 and 1024, got 0"),
    (["check", "--tolerance", "0.05", "--steps", "8"], "--steps must be at least 18 with a tolerance"),
    (["check", "--cuda", "--device", "cpu"], "--cuda contradicts --device cpu"),
])
def test_flag_errors_come_before_torch(no_torch: dict[str, str], tmp_path: Path, command: list[str],
                                       problem: str) -> None:
    args = [a.format(dir=tmp_path / "images", out=tmp_path / "out") for a in command]
    run, seconds = igd_without_torch(no_torch, *args)
    print(f"igd {' '.join(command[:1] + command[3 if command[0] == 'batch' else 1:])}: refused in {seconds:.2f} s")
    assert run.returncode == 2 and problem in run.stderr, run.stderr
    assert "Usage: igd" in run.stderr and "torch imported" not in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard,problem", [("2", "--shard must look like I/N (e.g. 2/8), got '2'"),
                                           ("3/2", "--shard 3/2: I must be between 1 and N")])
def test_a_bad_shard_comes_before_torch(no_torch: dict[str, str], tmp_path: Path, shard: str, problem: str) -> None:
    run, _ = igd_without_torch(no_torch, "batch", str(tmp_path), str(tmp_path / "out"), "--shard", shard)
    assert run.returncode == 1 and f"Error: {problem}" in run.stderr and "torch imported" not in run.stderr


def test_the_fake_torch_is_imported_once_the_flags_are_good(no_torch: dict[str, str], tmp_path: Path) -> None:
    run, _ = igd_without_torch(no_torch, "batch", str(tmp_path), str(tmp_path / "out"), "--steps", "4")
    assert run.returncode != 0 and "torch imported" in run.stderr
    run, _ = igd_without_torch(no_torch, "check", "--steps", "4")
    assert run.returncode != 0 and "torch imported" in run.stderr
