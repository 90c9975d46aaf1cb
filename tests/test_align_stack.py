"""`tapescope align` over a stack: the chain across a missing section, bad input, and the
same result from a real dask scheduler with two workers as from a local run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from tapescope.alignment.stack import StackError, align_stack, dask_map, read_stack, write_stack
from tapescope.cli import app
from tapescope.montage.omezarr import Volume
from tapescope.montage.synthetic import make_stack

from .support import check_volume

SHAPE = (320, 320)


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory: pytest.TempPathFactory):
    st = make_stack(4, SHAPE, seed=2, max_shift_px=50, elastic_px=1.5, missing=(2,))
    d = tmp_path_factory.mktemp("stack")
    write_stack(d, [im * 30000 for im in st.images])
    return st, d


def test_stack_aligns_across_a_missing_section(sim_stack, tmp_path: Path) -> None:
    st, d = sim_stack
    res = align_stack(d, tmp_path)
    status = {o.z: o.status for o in res.sections}
    assert status == {0: "ok", 1: "ok", 2: "missing", 3: "ok"}
    assert res.sections[3].reference_z == 1          # across the gap to the last good section
    group = check_volume(res.volume)
    assert group.attrs["tapescope"]["sections"]["2"]["status"] == "missing"
    assert not group["0"][2].any()                   # the missing z keeps its index, empty
    vol = Volume.open(res.volume)
    r = st.mutual_residual({z: vol.load_transform(z) for z in (0, 1, 3)})
    assert r.size > 600 and float(np.sqrt((r ** 2).mean())) < 0.5
    # The aligned z=3 matches z=0 where both hold tissue.
    a, b = group["0"][0].astype(float), group["0"][3].astype(float)
    both = (a > 0) & (b > 0)
    assert np.corrcoef(a[both], b[both])[0, 1] > 0.8
    assert (tmp_path / "alignment.csv").read_text().count("\n") == 5


def test_volume_opens_in_tensorstore(sim_stack, tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore")
    _, d = sim_stack
    res = align_stack(d, tmp_path)
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(res.volume / "0")}}).result()
    data = arr[1].read().result()
    assert np.array_equal(data, zarr.open_group(str(res.volume), mode="r")["0"][1])
    assert data.any()


@pytest.mark.parametrize(("csv", "message"), [
    (None, "sections.csv: missing"),
    ("name,z\n", "header must be 'file,z'"),
    ("file,z\nsection_00000.tif,x\n", "z must be a whole number"),
    ("file,z\nsection_00000.tif,0\nsection_00001.tif,0\n", "z=0 already given on line 2"),
    ("file,z\nnope.tif,0\n", "'nope.tif' not found"),
])
def test_bad_stack_is_refused_by_name(sim_stack, tmp_path: Path, csv: str | None, message: str) -> None:
    _, d = sim_stack
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.glob("*.tif"):
        (bad / f.name).write_bytes(f.read_bytes())
    if csv is not None:
        (bad / "sections.csv").write_text(csv)
    with pytest.raises(StackError, match=message):
        read_stack(bad)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["align", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert message.split("'")[0].split(":")[-1].strip() in result.output
    assert not (out / "volume.zarr").exists()        # bad input changes nothing


def test_distributed_result_equals_local(sim_stack, tmp_path: Path, dask_cluster: str) -> None:
    from distributed import Client

    _, d = sim_stack
    local = align_stack(d, tmp_path / "local")
    with Client(dask_cluster, timeout="30s") as client:
        client.wait_for_workers(2, timeout=60)
        assert len(client.scheduler_info()["workers"]) == 2
        remote = align_stack(d, tmp_path / "remote", map_fn=dask_map(client))
        ran_on = client.run(lambda: os.getpid())
    assert len(set(ran_on.values()) - {os.getpid()}) == 2     # the work left this process
    a = zarr.open_group(str(local.volume), mode="r")
    b = zarr.open_group(str(remote.volume), mode="r")
    for k in ("0", "1"):
        assert np.array_equal(a[k][:], b[k][:])
    assert a.attrs["tapescope"] == b.attrs["tapescope"]
    # The same through the command line, on the same cluster.
    result = CliRunner().invoke(app, ["align", str(d), "--out", str(tmp_path / "cli"), "--scheduler", dask_cluster])
    assert result.exit_code == 0, result.output
    assert "tapescope view" in result.output
    c = zarr.open_group(str(tmp_path / "cli" / "volume.zarr"), mode="r")
    assert np.array_equal(a["0"][:], c["0"][:])


def test_unreachable_scheduler_is_bad_input(sim_stack, tmp_path: Path) -> None:
    _, d = sim_stack
    result = CliRunner().invoke(app, ["align", str(d), "--out", str(tmp_path), "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2
    assert "cannot connect" in result.output


def test_wrong_tissue_is_unaligned_and_stepped_over(tmp_path: Path) -> None:
    st = make_stack(4, SHAPE, seed=4, max_shift_px=40, elastic_px=1.0, missing=())
    other = make_stack(1, SHAPE, seed=99, missing=())      # another specimen altogether
    images = [st.images[0], st.images[1], other.images[0], st.images[3]]
    d = write_stack(tmp_path / "stack", [im * 30000 for im in images])
    res = align_stack(d, tmp_path / "out")
    by_z = {o.z: o for o in res.sections}
    assert by_z[2].status == "unaligned" and "did not register to z=1" in by_z[2].message
    assert by_z[3].status == "ok" and by_z[3].reference_z == 1   # paired again, across the gap
    vol = Volume.open(res.volume)
    r = st.mutual_residual({z: vol.load_transform(z) for z in (0, 1, 3)})
    assert r.size > 600 and float(np.sqrt((r ** 2).mean())) < 0.5
    assert not zarr.open_group(str(res.volume), mode="r")["0"][2].any()   # a flagged section is not written
    sections = zarr.open_group(str(res.volume), mode="r").attrs["tapescope"]["sections"]
    assert sections["2"]["status"] == "unaligned"


def test_a_section_renders_again_from_its_stored_transform(sim_stack, tmp_path: Path) -> None:
    from tapescope.alignment.stack import rerender_section

    _, d = sim_stack
    res = align_stack(d, tmp_path)
    group = zarr.open_group(str(res.volume), mode="r+")
    before = [group[k][3] for k in ("0", "1")]
    for k in ("0", "1"):
        group[k][3] = 0                                  # the section's pixels are lost
    rerender_section(res.volume, 3, d / "section_00003.tif")
    after = [group[k][3] for k in ("0", "1")]
    assert all(np.array_equal(a, b) and a.any() for a, b in zip(before, after, strict=True))


def test_far_pairs_take_fewer_flow_passes_except_across_a_gap() -> None:
    """`far_passes` applies to a section's farther predecessors only; its nearest one and
    every pair across a section missing from the stack keep `passes`."""
    from dataclasses import replace

    from tapescope.alignment.stack import AlignParams, FlowParams, pair_params

    params = AlignParams(flow=FlowParams(passes=3, far_passes=1))
    present = [0, 1, 2, 3, 5, 6]          # 4 is missing
    todo = [(2, 5), (3, 5), (1, 5), (0, 3), (1, 3), (2, 3), (5, 6), (3, 6), (2, 6)]
    got = {k: p.flow.passes for k, p in zip(todo, pair_params(todo, params, present), strict=True)}
    assert got == {(3, 5): 3, (2, 5): 3, (1, 5): 3,      # across the gap
                   (2, 3): 3, (1, 3): 1, (0, 3): 1,      # nearest, then farther
                   (5, 6): 3, (3, 6): 3, (2, 6): 3}      # 3-6 and 2-6 cross z=4
    assert pair_params(todo, replace(params, flow=FlowParams()), present) == [AlignParams()] * len(todo)
