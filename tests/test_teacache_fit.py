"""ddit-bench --fit-teacache: TeaCache's polynomial fitted per patch size at one shape, recorded in the engines
folder, and used there by ddit-run and ddit-bench."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ddit_export.bench import Bench
from ddit_export.teacache_fit import fit_polynomial
from ddit_profiles import DDiTError, FittedTeaCache, spec_from_dict
from ddit_runtime.teacache import TeaCache, polynomials


def test_fit_polynomial_lowers_the_degree_where_the_fit_goes_negative():
    x = np.linspace(0.05, 0.3, 40)
    line = 0.2 * x + 0.01
    assert np.allclose(np.poly1d(fit_polynomial(x, line, 2))(x), line, atol=1e-9)
    # Large at both ends, 0 between: the least-squares parabola goes below 0 inside the range, so a line (positive
    # there) is kept.
    dip = np.where((x < 0.08) | (x > 0.27), 1.0, 0.0)
    assert np.poly1d(np.polyfit(x, dip, 2))(x).min() < 0
    fit = fit_polynomial(x, dip, 2)
    assert len(fit) == 2 and np.poly1d(fit)(x).min() >= 0
    with pytest.raises(DDiTError, match="goes negative inside the measured range at every degree"):
        fit_polynomial(x, -x, 2)


def test_teacache_rescales_each_size_with_its_own_polynomial():
    """The manifest's polynomial here is 0 (never accumulates) and size 2's own is the identity: a signal that
    doubles every step (relative change 1) skips every interior step at 1p and computes every one at 2p."""

    def computed(factor: int) -> list[bool]:
        cache = TeaCache(0.5, (0.0,), steps=6, size_coefficients={2: (1.0, 0.0)})
        return [cache.should_compute(torch.full((4,), 2.0**i), i, factor) for i in range(6)]

    assert computed(1) == [True, False, False, False, False, True]
    assert computed(2) == [True] * 6


def test_polynomials_take_the_fit_only_at_its_shape(tiny_spec):
    spec = tiny_spec.teacache  # without the profile's own fit, which is at 512x512, 20 steps
    fitted = spec.with_fitted(FittedTeaCache(256, 256, None, 6, {2: (1.0, 0.0)}, (0.1,)))
    assert polynomials(fitted, None, 256, 256, None, 6) == (
        spec.coefficients,
        {2: (1.0, 0.0)},
        "fitted: 256x256, 6 steps",
    )
    assert polynomials(fitted, None, 256, 256, None, 7) == (spec.coefficients, None, "manifest")
    assert polynomials(fitted, (3.0,), 256, 256, None, 6) == ((3.0,), None, "given")
    # A second fit at the same shape replaces the first; one at another shape is kept beside it.
    again = fitted.with_fitted(FittedTeaCache(256, 256, None, 6, {1: (2.0,)})).with_fitted(
        FittedTeaCache(512, 512, None, 6, {1: (2.0,)})
    )
    assert [e.coefficients for e in again.fitted] == [{1: (2.0,)}, {1: (2.0,)}]
    assert [e.shape() for e in again.fitted] == ["256x256, 6 steps", "512x512, 6 steps"]


def test_a_fit_round_trips_through_the_manifests_json(tiny_spec):
    import dataclasses

    spec = tiny_spec  # without the profile's own fit
    entry = FittedTeaCache(256, 256, None, 6, {4: [0.5, 0.1], 1: [2.0, 0.0, 0.01]}, [0.1, 0.2], "R^2 0.5")
    spec = dataclasses.replace(spec, teacache=spec.teacache.with_fitted(entry))
    back = spec_from_dict(json.loads(json.dumps(spec.to_dict())))
    (got,) = back.teacache.fitted
    assert got == entry and got.coefficients == {1: (2.0, 0.0, 0.01), 4: (0.5, 0.1)}  # int keys, sorted
    assert got.presets == (0.1, 0.2)


def test_fit_teacache_records_the_fit_and_ddit_run_uses_it_at_that_shape(tiny_engines, tmp_path):
    from ddit_cli import bench_main, run_main
    from ddit_runtime.manifest import load_manifest

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    report = tmp_path / "bench.json"
    args = [str(engines), "--count", "1", "--steps", "6", "--taus", "1e9", "--json", str(report), "--quiet"]
    # 3 prompts: on the shipped weights (untrained adapters) 2 gave 20 step pairs a size, too few for a fit that
    # does not go negative somewhere inside them (refused in one line, as it should be).
    result = CliRunner().invoke(bench_main, [*args, "--fit-teacache", "--fit-prompts", "3"])
    assert result.exit_code == 0, result.output
    for k in (1, 2, 4):
        assert f"--fit-teacache: {k}p: degree " in result.output
    assert "--fit-teacache: recorded for 256x256, 6 steps in " in result.output
    (entry,) = load_manifest(engines).spec.teacache.fitted  # sha256 of every file still checks
    assert entry.key() == (256, 256, None, 6) and set(entry.coefficients) == {1, 2, 4}
    assert len(entry.presets) == 3 and all(h > 0 for h in entry.presets)
    assert "3 prompts" in entry.evidence and "R^2" in entry.evidence
    data = json.loads(report.read_text())
    assert data["teacache_coefficients_source"] == "fitted: 256x256, 6 steps"
    assert data["teacache_fitted"] == {str(k): list(v) for k, v in entry.coefficients.items()}
    swept = sorted(m["options"]["teacache"] for m in data["methods"] if m["kind"] == "teacache")
    assert swept == sorted(entry.presets)  # the fit's own thresholds, not the profile's 0.25, 0.4, 0.6
    assert "TeaCache rescaling polynomials fitted for 256x256, 6 steps by --fit-teacache" in result.output

    prompt = ["--prompt", "a red circle on a black background", "--teacache", "0.1", "--json", "-o"]
    at = CliRunner().invoke(run_main, [str(engines), *prompt, str(tmp_path / "a.png"), "--steps", "6"])
    data = json.loads(at.output.strip().splitlines()[-1])
    assert data["teacache_coefficients_source"] == "fitted: 256x256, 6 steps"
    assert data["teacache_fitted"] == {str(k): list(v) for k, v in entry.coefficients.items()}
    off = CliRunner().invoke(run_main, [str(engines), *prompt, str(tmp_path / "b.png"), "--steps", "7"])
    assert json.loads(off.output.strip().splitlines()[-1])["teacache_coefficients_source"] == "manifest"
    given = ["--teacache-coefficients", "0.5,0", "--steps", "6"]
    mine = CliRunner().invoke(run_main, [str(engines), *prompt, str(tmp_path / "c.png"), *given])
    data = json.loads(mine.output.strip().splitlines()[-1])
    assert data["teacache_coefficients_source"] == "given" and "teacache_fitted" not in data
    said = CliRunner().invoke(
        run_main, [str(engines), *prompt[:4], "-o", str(tmp_path / "d.png"), "--steps", "6", "--schedule", "1"]
    )
    assert "TeaCache 0.1 with the polynomials fitted for this shape (the profile's or ddit-bench" in said.output

    before = (engines / "manifest.json").read_bytes()
    both = CliRunner().invoke(bench_main, [*args, "--fit-teacache", "--teacache-coefficients", "0.5,0"])
    assert both.exit_code == 2 and "give one of them" in both.output and "Traceback" not in both.output
    assert (engines / "manifest.json").read_bytes() == before


def test_fit_on_the_tiny_wan_gives_a_polynomial_per_size(wan_engines):
    """Wan's signal is the timestep embedding, recorded through the same trace hook; nothing is written here."""
    from ddit_runtime.wan_pipeline import WanRuntime

    runtime = WanRuntime(str(wan_engines), provider="cpu")
    bench = Bench(runtime, [], seeds=1, steps=4, progress=False)
    before = (wan_engines / "manifest.json").read_bytes()
    entry, lines = bench.fit_teacache(["a red circle moving from left to right on a black background"])
    assert set(entry.coefficients) == set(runtime.sizes) and entry.frames == bench.frames and entry.steps == 4
    assert all(np.isfinite(c) for poly in entry.coefficients.values() for c in poly)
    assert len(lines) == len(runtime.sizes) and runtime.trace is None
    assert bench.teacache_polynomials()[2] == f"fitted: {entry.shape()}"
    assert (wan_engines / "manifest.json").read_bytes() == before
