"""TeaCache: the skip rule, the exported probe graphs (an exact split of the engine), and the runtime composing it
with patch scheduling on the shared tiny engines folder."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import run_main
from ddit_profiles import DDiTError, TeaCacheSpec
from ddit_runtime.pipeline import FluxRuntime
from ddit_runtime.teacache import TeaCache, relative_l1, rescale

PROMPT = "two small green squares on the left of a blue background"
STEPS = 8


# ---- the rule ------------------------------------------------------------------------------------------------------


def test_rescale_is_numpys_poly1d_and_relative_l1_is_mean_ratio():
    coefficients = TeaCacheSpec().coefficients
    for x in (0.0, 0.01, 0.1, 0.35):
        got = rescale(torch.tensor(x), coefficients).item()
        assert got == pytest.approx(np.poly1d(coefficients)(x), rel=1e-5)
        assert TeaCacheSpec().rescale(x) == pytest.approx(np.poly1d(coefficients)(x), rel=1e-12)
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.5, -2.0, 2.0])
    assert relative_l1(b, a).item() == pytest.approx((0.5 + 0 + 1) / 6)


def _decisions(cache, signals, factors):
    return [cache.should_compute(s, i, k) for i, (s, k) in enumerate(zip(signals, factors, strict=True))]


def test_accumulates_until_the_threshold_then_resets():
    identity = (1.0, 0.0)  # rescale(x) = x: the accumulated sum is the plain relative change
    signals = [torch.full((4,), 1.0 + 0.1 * i) for i in range(8)]  # changes 0.1, 0.0909, 0.0833, ...
    cache = TeaCache(0.25, identity, steps=8)
    got = _decisions(cache, signals, [1] * 8)
    expect, acc = [True], 0.0
    for i in range(1, 8):
        acc += 0.1 / (1.0 + 0.1 * (i - 1))
        run = i == 7 or acc >= 0.25
        expect.append(run)
        acc = 0.0 if run else acc
    assert got == expect and got.count(False) >= 4


def test_first_last_and_switch_steps_always_compute():
    constant = [torch.ones(4)] * 6
    cache = TeaCache(1e9, (1.0, 0.0), steps=6)
    assert _decisions(cache, constant, [1] * 6) == [True, False, False, False, False, True]
    cache = TeaCache(1e9, (1.0, 0.0), steps=6)
    signals = [torch.ones(4), torch.ones(4), torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(2)]
    assert _decisions(cache, signals, [1, 1, 2, 2, 2, 2]) == [True, False, True, False, False, True]
    assert cache.forced_by_switch == 1
    cache = TeaCache(0.0, (1.0, 0.0), steps=6)  # threshold 0: TeaCache off
    assert all(_decisions(cache, constant, [1] * 6))


def test_per_size_keeps_each_sizes_residual_across_a_switch():
    signals = [torch.ones(4) if k == 1 else torch.ones(2) for k in (1, 1, 2, 2, 1, 1, 2, 1)]
    factors = [1, 1, 2, 2, 1, 1, 2, 1]
    recompute = TeaCache(1e9, (1.0, 0.0), steps=8)
    assert _decisions(recompute, signals, factors) == [True, False, True, False, True, False, True, True]
    assert (recompute.forced_by_switch, recompute.reused_across_switch) == (3, 0)
    per_size = TeaCache(1e9, (1.0, 0.0), steps=8, switch="per-size")
    # step 2: size 2 has no residual yet, so it runs; steps 4 and 6 reuse the residual their size left behind
    assert _decisions(per_size, signals, factors) == [True, False, True, False, False, False, False, True]
    assert (per_size.forced_by_switch, per_size.reused_across_switch) == (1, 2)


@pytest.mark.parametrize(("threshold", "runs"), [(0.15, False), (0.1, True)])
def test_per_size_counts_a_gap_as_that_many_steps_of_the_mean_change(threshold, runs):
    # rescale(x) = x^2: a change of 0.6 over a gap of 3 steps adds 3 * (0.6 / 3)^2 = 0.12, not 0.6^2 = 0.36
    signals = [torch.ones(4), torch.ones(2), torch.ones(2), torch.full((4,), 1.6)]
    cache = TeaCache(threshold, (1.0, 0.0, 0.0), steps=5, switch="per-size")
    assert _decisions(cache, signals, [1, 2, 2, 1]) == [True, True, False, runs]
    assert cache.accumulated[1].item() == pytest.approx(0.0 if runs else 0.12, abs=1e-6)


def test_unknown_switch_policy_is_refused():
    with pytest.raises(DDiTError, match="recompute, per-size"):
        TeaCache(0.4, (1.0,), steps=4, switch="keep")


def test_negative_threshold_is_refused():
    with pytest.raises(DDiTError, match="threshold >= 0"):
        TeaCache(-0.1, (1.0,), steps=4)


# ---- the exported probes -------------------------------------------------------------------------------------------


def test_every_size_has_a_probe_that_splits_the_engine_exactly(tiny_engines, tiny_spec):
    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    gen = torch.Generator().manual_seed(3)
    for k in (1, 2, 4):
        meta = manifest["components"]["transformer"][str(k)]
        assert meta["teacache"]["split_error"] < 1e-4
        engine = ort.InferenceSession(str(tiny_engines / meta["onnx"]), providers=["CPUExecutionProvider"])
        probe = ort.InferenceSession(str(tiny_engines / meta["teacache"]["onnx"]), providers=["CPUExecutionProvider"])
        assert [o.name for o in engine.get_outputs()] == ["velocity", "residual"]
        assert [i.name for i in probe.get_inputs()] == list(tiny_spec.teacache_inputs)
        feeds = dict(
            latent=torch.randn(1, 16, 32, 48, generator=gen).numpy(),  # non-square: rows and cols stay apart
            timestep=np.array([0.7], np.float32),
            guidance=np.array([3.5], np.float32),
            encoder_hidden_states=torch.randn(1, tiny_spec.t5_max_length, 64, generator=gen).numpy(),
            pooled_projections=torch.randn(1, tiny_spec.pooled_dim, generator=gen).numpy(),
        )
        velocity, residual = engine.run(None, feeds)
        rows, cols = tiny_spec.token_grid(k, 256, 384)
        assert residual.shape == (1, rows, cols, 128)
        probe_feeds = {n: feeds[n] for n in ("latent", "timestep", "guidance", "pooled_projections")}
        modulated, cached = probe.run(None, probe_feeds | {"residual": residual})
        assert modulated.shape == (1, rows * cols, 128)
        np.testing.assert_allclose(cached, velocity, atol=1e-4, rtol=1e-4)  # same step: the cache is exact
        _, stale = probe.run(None, probe_feeds | {"residual": np.zeros_like(residual)})
        assert np.abs(stale - velocity).max() > 1e-2  # and the residual matters


# ---- the runtime ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_engines):
    return FluxRuntime(tiny_engines, provider="cpu")


def test_threshold_zero_is_the_plain_run(runtime):
    plain = runtime.generate(PROMPT, steps=STEPS, seed=2, tau=1e9, progress=False)
    cached = runtime.generate(PROMPT, steps=STEPS, seed=2, tau=1e9, teacache=0.0, progress=False)
    assert cached.computed == [True] * STEPS and plain.computed == [True] * STEPS
    assert torch.equal(plain.image, cached.image)


def _count_engine_calls(runtime, monkeypatch) -> dict:
    """Counts every transformer engine call (probes excluded) in ``calls["engine"]``."""
    calls = {"engine": 0}
    for engine in runtime.engines.values():
        run = engine.run
        monkeypatch.setattr(
            engine, "run", lambda i, o, run=run: (calls.__setitem__("engine", calls["engine"] + 1), run(i, o))
        )
    return calls


def test_huge_threshold_computes_first_last_and_switches_only(runtime, monkeypatch):
    calls = _count_engine_calls(runtime, monkeypatch)
    schedule = [1, 1, 1, 4, 4, 4, 2, 2]
    result = runtime.generate(PROMPT, steps=STEPS, seed=2, schedule=schedule, teacache=1e9, progress=False)
    assert result.computed == [True, False, False, True, False, False, True, True]
    assert runtime.spec.scheduler.true_cfg > 1.0  # flux-tiny guides: one accumulator per pass, one batched call
    assert calls["engine"] == 4 and result.settings["teacache_forced_by_switch"] == 2
    plain = runtime.generate(PROMPT, steps=STEPS, seed=2, schedule=schedule, progress=False)
    assert not torch.equal(result.image, plain.image)  # skipped steps reuse a stale residual
    assert result.image.float().std() > 0


def test_two_pass_guidance_decides_per_pass(runtime, monkeypatch):
    """Two calls per step, each pass's cache deciding for its own call; the batched call runs when either asks."""
    calls = _count_engine_calls(runtime, monkeypatch)
    schedule = [1, 1, 1, 4, 4, 4, 2, 2]
    two = runtime.generate(PROMPT, steps=STEPS, seed=2, schedule=schedule, teacache=1e9, cfg="two-pass", progress=False)
    assert two.computed == [True, False, False, True, False, False, True, True] and calls["engine"] == 8


def test_per_size_policy_reuses_the_native_residual_after_a_coarse_step(runtime):
    schedule = [1, 1, 1, 4, 4, 1, 1, 1]
    result = runtime.generate(
        PROMPT, steps=STEPS, seed=2, schedule=schedule, teacache=1e9, teacache_switch="per-size", progress=False
    )
    assert result.computed == [True, False, False, True, False, False, False, True]
    assert result.settings["teacache_forced_by_switch"] == 1 and result.settings["teacache_reused_across_switch"] == 1
    assert result.settings["teacache_switch"] == "per-size" and result.image.float().std() > 0


def test_folder_without_probes_is_refused_with_a_clear_message(tiny_engines, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_engines, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for meta in manifest["components"]["transformer"].values():
        del meta["teacache"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(
        run_main, [str(folder), "--prompt", PROMPT, "--teacache", "0.4", "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code != 0 and "no TeaCache probes" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x.png").exists()


def test_cli_teacache_reports_computed_steps(tiny_engines, tmp_path):
    out = tmp_path / "t.png"
    args = [str(tiny_engines), "--prompt", PROMPT, "--steps", "8", "--teacache", "100", "--json", "-o", str(out)]
    result = CliRunner().invoke(run_main, [*args, "--teacache-switch", "per-size"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["teacache"] == 100.0 and report["computed"][0] and report["computed"][-1]
    assert report["teacache_switch"] == "per-size" and "teacache_reused_across_switch" in report
    assert sum(report["computed"]) < 8 and out.is_file()


# ---- a rescaling polynomial of one's own (--teacache-coefficients) -------------------------------------------------


def test_parse_coefficients_takes_a_comma_list_and_refuses_the_rest():
    from ddit_runtime.teacache import parse_coefficients

    assert parse_coefficients("12.574,-1.3008,0.041905") == (12.574, -1.3008, 0.041905)
    assert parse_coefficients(" 0.5 ") == (0.5,)
    for bad in ("", "1,,2", "1;2", "a,b", "1,nan", "inf"):
        with pytest.raises(DDiTError, match="finite numbers separated by commas"):
            parse_coefficients(bad)
    with pytest.raises(DDiTError, match="finite coefficients"):
        TeaCache(0.4, (), STEPS)


def test_own_coefficients_replace_the_manifests(runtime):
    """A polynomial that rescales every change to 0 never reaches the threshold (only the first and last steps
    run); one that rescales it to 10^6 always does; without one the manifest's is used and recorded."""
    kw = dict(steps=STEPS, seed=2, schedule=[1] * STEPS, teacache=0.5, progress=False)
    never = runtime.generate(PROMPT, teacache_coefficients=(0.0,), **kw)
    always = runtime.generate(PROMPT, teacache_coefficients=(1e6, 0.0), **kw)
    default = runtime.generate(PROMPT, **kw)
    assert never.computed == [True] + [False] * (STEPS - 2) + [True]
    assert always.computed == [True] * STEPS
    assert never.settings["teacache_coefficients"] == [0.0] and always.settings["teacache_coefficients"] == [1e6, 0.0]
    assert default.settings["teacache_coefficients"] == list(runtime.spec.teacache.coefficients)
    assert default.computed not in (never.computed, always.computed)  # the published polynomial is neither


def test_cli_teacache_coefficients(tiny_engines, tmp_path):
    out = tmp_path / "c.png"
    base = [str(tiny_engines), "--prompt", PROMPT, "--steps", "6", "-o", str(out)]
    fixed = ["--schedule", "1"]  # no patch-size switch, which would recompute whatever the polynomial says
    result = CliRunner().invoke(
        run_main, [*base, *fixed, "--teacache", "0.5", "--teacache-coefficients", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["computed"] == [True, False, False, False, False, True] and report["teacache_coefficients"] == [0.0]
    out.unlink()
    for extra, message in (
        (["--teacache", "0.5", "--teacache-coefficients", "1,x"], "finite numbers separated by commas"),
        (["--teacache-coefficients", "0"], "add --teacache"),
    ):
        result = CliRunner().invoke(run_main, [*base, *extra])
        assert result.exit_code != 0 and message in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
