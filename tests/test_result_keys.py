"""One description of the result keys (igd.output.keys): a fact added there reaches the
result file, the daemon's answer map, igctl's records, `igd batch`'s status lines and
its parquet columns; and parquet carries IDGI and the faithfulness areas it computed.

The fake fact is added the way a developer would add one -- a line in the table -- by a
sitecustomize that every process of the test (the daemon, igctl, igd batch) runs first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas
import pytest
import torch

import nets
from daemon import IGD, Igd, short_tempdir
from reference import read_result
from test_service import png
from test_worker import loaded
from igd.output import keys
from igd.output.answer import Answer
from igd.pipeline import Pipeline
from igd.request import parse_attribute
from igd.worker import Worker

SITECUSTOMIZE = '''
from igd.output import keys
keys.FACTS = (*keys.FACTS, keys.Fact("fake_fact", lambda answer, target: answer.attribution.n_steps * 10 + 1,
                                     "fake_fact", ("fake", "fact")))
'''
STEPS = 6
FAKE = STEPS * 10 + 1


@pytest.fixture(scope="module")
def with_fake_fact() -> dict[str, str]:
    """The environment of a process whose table has one more fact."""
    folder = short_tempdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    yield {"PYTHONPATH": str(folder)}
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # a daemon and two igd batch runs of its own (30 s alone)
def test_a_fact_added_to_the_table_reaches_every_place(with_fake_fact: dict[str, str], fixtures: Path) -> None:
    image = fixtures / "images" / "chelsea.png"
    work = short_tempdir()
    try:
        with Igd("-lp", str(fixtures / "lanet-tiny.pth"), "--max-batch", "8", env=with_fake_fact) as igd:
            run = igd.igctl("attribute", str(image), "cat", "--steps", str(STEPS), "-o", str(work / "a.gzip"),
                            "--json", env=with_fake_fact)
            assert run.returncode == 0, run.stderr
            record = json.loads(run.stdout)
            # An igctl without the line does not know the fact, though the daemon sends it.
            plain = igd.igctl("attribute", str(image), "cat", "--steps", str(STEPS), "-o", str(work / "b.gzip"),
                              "--json")
            assert plain.returncode == 0 and "fake_fact" not in json.loads(plain.stdout), plain.stderr
        assert record["fake_fact"] == FAKE  # igctl's record, read from the answer map's fake.fact
        assert read_result(work / "a.gzip")["fake_fact"] == FAKE  # the result file

        for fmt in ("torch", "parquet"):
            out = work / fmt
            batch = subprocess.run([IGD, "batch", str(image), str(out), "-lp", str(fixtures / "lanet-tiny.pth"),
                                    "--max-batch", "8", "--steps", str(STEPS), "-t", "cat", "--format", fmt],
                                   capture_output=True, text=True, timeout=600, env={**os.environ, **with_fake_fact})
            assert batch.returncode == 0, batch.stderr
            (status,) = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
            assert status["ok"] and status["fake_fact"] == FAKE  # the status line
            if fmt == "torch":
                assert read_result(out / status["output"])["fake_fact"] == FAKE
            else:
                (part,) = out.glob("part-*.parquet")
                assert pandas.read_parquet(part)["fake_fact"].tolist() == [FAKE]  # the parquet column
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow  # an igd batch run
def test_parquet_carries_idgi_and_the_metrics_it_computed(lanet: Igd, fixtures: Path) -> None:
    """The daemon's own result file for the same request is the reference."""
    image = fixtures / "images" / "chelsea.png"
    work = short_tempdir()
    try:
        asked = ["--steps", str(STEPS), "--idgi", "--metrics", "insertion,deletion"]
        run = lanet.igctl("attribute", str(image), "cat", "-o", str(work / "a.gzip"), *asked)
        assert run.returncode == 0, run.stderr
        reference = read_result(work / "a.gzip")
        out = work / "parquet"
        batch = subprocess.run([IGD, "batch", str(image), str(out), "-lp", str(fixtures / "lanet-tiny.pth"),
                                "--max-batch", "10", "-t", "cat", "--format", "parquet", "--dtype", "float32",
                                *asked], capture_output=True, text=True, timeout=600)
        assert batch.returncode == 0, batch.stderr
        (part,) = out.glob("part-*.parquet")
        (row,) = pandas.read_parquet(part).to_dict("records")
        assert list(row["shape"]) == list(reference["integrated_grads"].shape[1:])
        for column, key in (("integrated_grads", "integrated_grads"), ("idgi", "idgi")):
            np.testing.assert_allclose(np.asarray(row[column]), np.asarray(reference[key]).ravel(), rtol=1e-5,
                                       atol=1e-7)
        for metric in ("insertion", "deletion"):
            assert row[f"{metric}_area"] == pytest.approx(float(reference[f"{metric}_area"]), abs=1e-6)
        status = json.loads((out / "status.jsonl").read_text())
        assert status["insertion_area"] == pytest.approx(row["insertion_area"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_every_fact_is_named_once_per_place() -> None:
    """Two facts under one name would overwrite each other in some place."""
    for place in ("name", "file", "wire"):
        names = [getattr(fact, place) for fact in keys.FACTS if getattr(fact, place) is not None]
        assert len(names) == len(set(names)), place
    # Beside the pair's own fields (igd batch) and igctl's, a fact would overwrite them.
    from igd.batch.outputs import PAIR_FIELDS
    own = {*PAIR_FIELDS, "image", "heatmap", "timing_ms", "metrics", "targets", "code", "message"}
    assert not own & {fact.name for fact in keys.FACTS}
    # The file keys that carry a target axis in a combined result include every per-target fact.
    assert {fact.file for fact in keys.FACTS if fact.per_target and fact.file} <= keys.TARGET_AXIS


def test_the_record_of_an_answer_map_follows_the_wire_names() -> None:
    answer_map = {"target": {"index": 3, "name": "cat"}, "completeness_gap": None, "metrics": {"insertion": 0.5},
                  "n_steps": 8}
    record = keys.record_of(answer_map)
    assert record == {"target_index": 3, "target_name": "cat", "completeness_gap": None, "insertion_area": 0.5,
                      "n_steps": 8}


def test_answers_hand_out_one_value_per_fact() -> None:
    """In process: the facts of a two-target answer in the file (a value per target), the
    answer map (first target's, and each in targets), the row (first target's)."""
    model = loaded(nets.groupnorm_cnn())
    worker = Worker(model, max_batch=8)
    worker.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pipeline = Pipeline(model, worker, pool, 1 << 20)
            request = parse_attribute({"n_steps": 4, "top_k": 2})
            answer: Answer = asyncio.run(pipeline.attribute(png(), request))
    finally:
        worker.close()
        worker.join()
    result, summary, row = answer.result(), answer.summary(), answer.row()
    first, second = answer.targets
    assert result["target_class"] == [first.index, second.index]
    assert torch.equal(result["convergence_delta"], torch.tensor([first.convergence_delta, second.convergence_delta]))
    assert summary["target"] == {"index": first.index, "name": first.name}
    assert [t["index"] for t in summary["targets"]] == [first.index, second.index]
    assert row["target_index"] == first.index and row["n_steps"] == 4 and row["target_name"] == first.name
