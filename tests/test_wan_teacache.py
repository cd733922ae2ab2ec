"""TeaCache on Wan: the per-pass skip rule, the exported probes (an exact split of the engine, the timestep
embedding as the signal), and the runtime composing it with CFG and patch scheduling on the shared tiny Wan
engines folder."""

import json
import shutil

import imageio.v3 as iio
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from ddit_cli import run_main
from ddit_export.bench import Bench, Method, bare_feeds, builtin_prompts
from ddit_export.onnx_io import complex_tensors, double_tensors, ort_session
from ddit_profiles import DDiTError
from ddit_runtime import wan_pipeline
from ddit_runtime.teacache import TeaCache, any_compute
from ddit_runtime.wan_pipeline import WanRuntime

PROMPT = "a red circle moving from left to right on a black background"
STEPS = 6
IDENTITY = (1.0, 0.0)  # rescale(x) = x: the accumulated sum is the plain relative change


def _signature(value) -> tuple:
    dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return value.name, value.type.tensor_type.elem_type, len(dims)


# ---- the rule: one accumulator per guidance pass -------------------------------------------------------------------


def _pair(step: int) -> torch.Tensor:
    """[2, 4]: the conditional signal grows 10% of its start per step, the unconditional one 6%."""
    return torch.stack([torch.full((4,), 1.0 + 0.1 * step), torch.full((4,), 1.0 + 0.06 * step)])


def test_cond_and_uncond_accumulators_are_separate():
    cond, uncond = TeaCache(0.25, IDENTITY, STEPS), TeaCache(0.25, IDENTITY, STEPS)
    two_pass = [[c.should_compute(_pair(i)[j : j + 1], i, 1) for j, c in enumerate((cond, uncond))] for i in range(6)]
    # cond: 0.1 + 0.0909 + 0.0833 >= 0.25 at step 3; uncond: 0.06 + 0.0566 + 0.0536 + 0.0508 < 0.25 until the end
    assert [d[0] for d in two_pass] == [True, False, False, True, False, True]
    assert [d[1] for d in two_pass] == [True, False, False, False, False, True]


def test_batched_passes_compute_when_either_needs_it_and_both_restart():
    caches = [TeaCache(0.25, IDENTITY, STEPS), TeaCache(0.25, IDENTITY, STEPS)]
    got = [any_compute(caches, _pair(i), i, 1) for i in range(5)]
    assert got == [True, False, False, True, False]  # step 3: cond needs it, uncond would have skipped
    assert caches[0].accumulated[1].item() == pytest.approx(0.1 / 1.3, rel=1e-5)
    assert caches[1].accumulated[1].item() == pytest.approx(0.06 / 1.18, rel=1e-5)  # restarted at step 3, not 0.221


# ---- the exported probes -------------------------------------------------------------------------------------------


def test_probes_share_one_io_contract_and_engines_return_the_residual(wan_engines, wan_spec):
    probes, engines = [], []
    for k in (1, 2, 4):
        graph = onnx.load(str(wan_engines / f"teacache_k{k}.onnx"), load_external_data=False).graph
        probes.append([_signature(v) for v in list(graph.input) + list(graph.output)])
        graph = onnx.load(str(wan_engines / f"transformer_k{k}.onnx"), load_external_data=False).graph
        engines.append([_signature(v) for v in list(graph.input) + list(graph.output)])
        assert [d.dim_value for d in graph.output[1].type.tensor_type.shape.dim][-1] == wan_spec.inner_dim
    assert probes[0] == probes[1] == probes[2] and engines[0] == engines[1] == engines[2]
    f32 = onnx.TensorProto.FLOAT
    assert probes[0] == [("latent", f32, 5), ("timestep", f32, 1), ("residual", f32, 5), ("temb", f32, 2)] + [
        ("velocity", f32, 5)
    ]
    assert [name for name, *_ in engines[0]] == [*wan_spec.transformer_inputs, "velocity", "residual"]
    assert engines[0][-1] == ("residual", f32, 5)  # [B, F, rows_k, cols_k, D] for every size


def test_probes_have_no_float64_and_no_complex_tensors(wan_engines):
    probes = sorted(wan_engines.glob("teacache_k*.onnx"))
    assert [p.name for p in probes] == ["teacache_k1.onnx", "teacache_k2.onnx", "teacache_k4.onnx"]
    for path in probes:
        assert double_tensors(path) == [] and complex_tensors(path) == [], path.name


def test_every_probe_splits_its_engine_exactly(wan_engines, wan_spec, wan_parts):
    """At an untraced, padded shape (batch 2, 4 latent frames, latent 22 x 18): the probe's velocity from the
    engine's own residual is the engine's velocity, and its signal is diffusers' timestep embedding."""
    manifest = json.loads((wan_engines / "manifest.json").read_text())
    gen = torch.Generator().manual_seed(4)
    feeds = dict(
        latent=torch.randn(2, 16, 4, 22, 18, generator=gen).numpy(),
        timestep=np.array([937.0, 412.0], np.float32),
        encoder_hidden_states=torch.randn(2, wan_spec.t5_max_length, wan_spec.text_dim, generator=gen).numpy(),
    )
    with torch.no_grad():
        temb = wan_parts["transformer"].condition_embedder(
            torch.from_numpy(feeds["timestep"]), torch.from_numpy(feeds["encoder_hidden_states"]), None
        )[0]
    for k in (1, 2, 4):
        meta = manifest["components"]["transformer"][str(k)]
        assert meta["teacache"]["split_error"] <= wan_spec.transformer_tolerance.bound(1.0)
        velocity, residual = ort_session(wan_engines / meta["onnx"]).run(None, feeds)
        rows, cols = wan_spec.token_grid(k, 22 * 8, 18 * 8)
        assert residual.shape == (2, 4, rows, cols, wan_spec.inner_dim)
        probe = ort_session(wan_engines / meta["teacache"]["onnx"])
        cheap = dict(latent=feeds["latent"], timestep=feeds["timestep"])
        signal, cached = probe.run(None, cheap | {"residual": residual})
        np.testing.assert_allclose(cached, velocity, atol=1e-4, rtol=1e-4)  # same step: the cache is exact
        np.testing.assert_allclose(signal, temb.numpy(), atol=1e-5, rtol=1e-5)
        _, stale = probe.run(None, cheap | {"residual": np.zeros_like(residual)})
        assert np.abs(stale - velocity).max() > 1e-2  # and the residual matters


# ---- the runtime ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(wan_engines):
    return WanRuntime(wan_engines, provider="cpu")


def _generate(runtime, **kw):
    return runtime.generate(PROMPT, frames=5, steps=STEPS, seed=3, progress=False, **kw)


@pytest.mark.parametrize("cfg", ["batched", "two-pass"])
def test_threshold_zero_is_the_plain_run(runtime, cfg):
    plain = _generate(runtime, schedule=[1, 1, 2, 2, 4, 4], cfg=cfg)
    cached = _generate(runtime, schedule=[1, 1, 2, 2, 4, 4], cfg=cfg, teacache=0.0)
    assert cached.computed == plain.computed == [True] * STEPS
    assert torch.equal(plain.image, cached.image)


@pytest.mark.parametrize("cfg, calls_per_step", [("batched", 1), ("two-pass", 2)])
def test_huge_threshold_computes_first_and_last_only(runtime, monkeypatch, cfg, calls_per_step):
    calls = {"engine": 0}
    for engine in runtime.engines.values():
        run = engine.run
        monkeypatch.setattr(
            engine, "run", lambda i, o, run=run: (calls.__setitem__("engine", calls["engine"] + 1), run(i, o))
        )
    result = _generate(runtime, schedule=[1] * STEPS, cfg=cfg, teacache=1e9)
    assert result.computed == [True, False, False, False, False, True]
    assert calls["engine"] == 2 * calls_per_step and result.settings["teacache_forced_by_switch"] == 0
    plain = _generate(runtime, schedule=[1] * STEPS, cfg=cfg)
    assert not torch.equal(result.image, plain.image)  # skipped steps reuse a stale residual
    assert result.image.float().std() > 0


@pytest.mark.parametrize("cfg", ["batched", "two-pass"])
def test_own_coefficients_replace_the_manifests(runtime, cfg):
    never = _generate(runtime, schedule=[1] * STEPS, cfg=cfg, teacache=0.05, teacache_coefficients=(0.0,))
    always = _generate(runtime, schedule=[1] * STEPS, cfg=cfg, teacache=0.05, teacache_coefficients=(1e6,))
    assert never.computed == [True, False, False, False, False, True] and always.computed == [True] * STEPS
    assert never.settings["teacache_coefficients"] == [0.0]


@pytest.mark.parametrize("cfg", ["batched", "two-pass"])
def test_a_patch_size_switch_forces_a_full_step(runtime, cfg):
    result = _generate(runtime, schedule=[1, 1, 2, 2, 4, 4], cfg=cfg, teacache=1e9)
    assert result.computed == [True, False, True, False, True, True]
    assert result.settings["teacache_forced_by_switch"] == 2


@pytest.mark.parametrize("scale, passes", [(5.0, 2), (1.0, 1)])
def test_one_accumulator_per_guidance_pass(runtime, monkeypatch, scale, passes):
    made = []

    class Spy(TeaCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(wan_pipeline, "TeaCache", Spy)
    _generate(runtime, schedule=[1] * STEPS, cfg="two-pass", guidance_scale=scale, teacache=1e9)
    assert len(made) == passes
    assert all(tuple(c.previous[1].shape) == (1, runtime.spec.inner_dim) for c in made)  # each its own pass's row


def test_folder_without_probes_is_refused_with_a_clear_message(wan_engines, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(wan_engines, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for meta in manifest["components"]["transformer"].values():
        del meta["teacache"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "x.mp4"
    args = [str(folder), "--prompt", PROMPT, "--frames", "5", "--steps", "2", "--teacache", "0.05", "-o", str(out)]
    result = CliRunner().invoke(run_main, args)
    assert result.exit_code == 2 and "no TeaCache probes" in result.stderr and "re-export" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_cli_teacache_writes_the_video_and_reports_computed_steps(wan_engines, tmp_path):
    out = tmp_path / "clip.mp4"
    args = ["--frames", "5", "--steps", "4", "--schedule", "1", "--teacache", "1e9", "--json", "-o", str(out)]
    result = CliRunner().invoke(run_main, [str(wan_engines), "--prompt", PROMPT, *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["teacache"] == 1e9 and report["computed"] == [True, False, False, True]
    assert report["teacache_forced_by_switch"] == 0
    assert iio.imread(out).shape == (5, 256, 256, 3)


def test_bench_offers_teacache_methods_for_wan(runtime):
    bench = Bench(runtime, builtin_prompts("wan", 1), seeds=1, steps=4, progress=False)
    thresholds = list(runtime.spec.teacache.presets)
    assert thresholds == [0.15, 0.25, 0.4]  # wan-tiny: measured at its 20 steps (the 1.3B fit: 0.05-0.08)
    methods = {m.name: m for m in bench.methods([1e9], [1e9])}
    assert methods["TeaCache 1e+09"].options == dict(schedule=[1] * 4, teacache=1e9)
    assert methods["DDiT+TeaCache 1e+09"].options == dict(tau=1e9, teacache=1e9)
    bench.run_method(methods["native"])
    tea = bench.run_method(methods["TeaCache 1e+09"])
    assert tea.runs[0]["computed"] == [True, False, False, True] and tea.runs[0]["ssim"] < 1.0


def test_bench_runs_wan_at_the_asked_frame_count(runtime):
    """``ddit-bench --frames``: the generations, the bare calls, the scheduler timing and the FLOP count all take
    the asked frame count (wan-tiny's opt is 9); a count that is not 4n+1 is refused before any work."""
    spec = runtime.spec
    bench = Bench(runtime, builtin_prompts("wan", 1), seeds=1, steps=2, progress=False, frames=5)
    assert (bench.height, bench.width, bench.frames) == (*spec.opt_size, 5)
    native = bench.run_method(Method("native", "baseline", dict(schedule=[1, 1])))
    assert native.runs[0]["output_shape"] == [5, 3, *spec.opt_size]
    assert bench._flops(1) == spec.step_flops(1, 5, *spec.opt_size) < spec.step_flops(1, 9, *spec.opt_size)
    feeds = bare_feeds(spec, *spec.opt_size, 1, runtime.device, bench.frames)
    assert feeds["latent"].shape[2] == spec.latent_frames(5)
    assert bench.bare_engine_ms(1).keys() == set(runtime.sizes)
    with pytest.raises(DDiTError, match="4n\\+1"):
        Bench(runtime, [], seeds=1, steps=2, progress=False, frames=6)


@pytest.mark.parametrize("cfg", ["batched", "two-pass"])
def test_per_size_switch_policy_reuses_a_sizes_residual(runtime, cfg):
    result = _generate(runtime, schedule=[1, 1, 2, 2, 1, 1], cfg=cfg, teacache=1e9, teacache_switch="per-size")
    assert result.computed == [True, False, True, False, False, True]  # step 4: back to 1p's residual
    assert result.settings["teacache_forced_by_switch"] == 1
    assert result.settings["teacache_reused_across_switch"] == 1


@pytest.mark.parametrize("cfg", ["batched", "two-pass"])
def test_per_size_keeps_each_sizes_residual_across_other_sizes_steps(runtime, cfg, monkeypatch):
    """Back at 1p on step 4, the probe must read the residual 1p's blocks wrote on step 0, not one that the 2p step
    in between overwrote (the sizes once shared one storage, which only the recompute policy allows)."""
    written, read = [], []
    for k in runtime.sizes:
        engine, probe = runtime.engines[k], runtime._probe(k)

        def engine_run(feeds, outputs, _run=engine.run, _k=k):
            result = _run(feeds, outputs)
            written.append((_k, outputs["residual"].clone()))
            return result

        def probe_run(feeds, outputs, _run=probe.run, _k=k):
            read.append((_k, feeds["residual"].clone()))
            return _run(feeds, outputs)

        monkeypatch.setattr(engine, "run", engine_run)
        monkeypatch.setattr(probe, "run", probe_run)
    result = _generate(runtime, schedule=[1, 1, 2, 2, 1, 1], cfg=cfg, teacache=1e9, teacache_switch="per-size")
    assert result.computed == [True, False, True, False, False, True]
    calls = 2 if cfg == "two-pass" else 1  # engine and probe calls per step
    step0 = torch.cat([r for _, r in written[:calls]])  # 1p's blocks on step 0, every pass
    step4 = torch.cat([r for _, r in read[4 * calls : 5 * calls]])  # 1p's probe on step 4 (skipped)
    assert [k for k, _ in read[4 * calls : 5 * calls]] == [1] * calls
    assert step0.abs().max() > 0 and torch.equal(step4, step0)
