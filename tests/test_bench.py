"""ddit-bench on the shared tiny engines folder: every method runs on the same prompts and seeds, the report's
numbers are consistent with the runs, the FLOP count matches the paper's ratios, and the CLI writes its files."""

import json
import re
import statistics

import pytest
from click.testing import CliRunner

from ddit_cli import bench_main
from ddit_export.bench import (
    Bench,
    Method,
    builtin_prompts,
    markdown,
    paired,
    paired_difference,
    run_bench,
    speedup_interval,
)
from ddit_profiles import DDiTError, get_profile


def test_flop_ideal_ratios_are_the_papers_at_flux_dev_1024():
    spec = get_profile("flux")
    native = spec.step_flops(1, 1024, 1024)
    assert native / spec.step_flops(2, 1024, 1024) == pytest.approx(3.46, abs=0.01)
    assert native / spec.step_flops(4, 1024, 1024) == pytest.approx(7.2, abs=0.05)
    assert spec.step_flops(1, 1024, 1024, batch=2) == 2 * native


def test_builtin_prompts_alternate_simple_and_detailed_and_score_their_own_renders():
    from ddit_export.shapes import render, scene_from_seed

    prompts = builtin_prompts("flux", 4)
    assert [p.simple for p in prompts] == [True, False, True, False]
    scene = scene_from_seed(900_000_000, True)
    assert prompts[0].text == scene.caption()
    assert prompts[0].score(render(scene))["score"] == 1.0
    clips = builtin_prompts("wan", 2)
    assert "turning" in clips[0].text or "moving" in clips[0].text


def test_step_reduction_matches_the_whole_generations_time():
    """Encoding and decoding cost the same at any step count: a baseline of 3.0 s, 2.0 s of it 20 steps of
    denoising, and a method taking 2.1 s in all leave room for (2.1 - 1.0) / 0.1 = 11 native steps, not the
    20 * 2.1 / 3.0 = 14 a ratio of totals would give."""

    class Runtime:
        spec = get_profile("wan-tiny")

    bench = Bench(Runtime(), [], seeds=1, steps=20, progress=False)
    bench.tau = 0.006
    base = Method("native", "baseline", {}, [dict(total_s=1.5, denoise_s=1.0)] * 2)
    fast = Method("DDiT+TeaCache 0.4", "ddit+teacache", dict(tau=0.006, teacache=0.4), [dict(total_s=1.05)] * 2)
    other_tau = Method("DDiT tau=0.012", "ddit", dict(tau=0.012), [dict(total_s=0.75)] * 2)
    again, *fewer = bench.fewer_steps([base, fast, other_tau])
    assert again.kind == "baseline" and again.options["schedule"] == [1] * 20
    assert [(m.name, m.options["steps"]) for m in fewer] == [("native 11 steps (DDiT+TeaCache 0.4's time)", 11)]
    assert fewer[0].matched == ["DDiT+TeaCache 0.4"]
    # Two methods whose times fit the same step count share one step-reduction run, and both are compared to it.
    twin = Method(
        "DDiT+TeaCache 0.4 per-size", "ddit+teacache", dict(tau=0.006, teacache=0.4), [dict(total_s=1.06)] * 2
    )
    _, *fewer = bench.fewer_steps([base, fast, twin])
    assert len(fewer) == 1 and fewer[0].matched == ["DDiT+TeaCache 0.4", "DDiT+TeaCache 0.4 per-size"]


def test_speedup_interval_and_paired_differences():
    runs = [dict(prompt=i, seed=0, total_s=t) for i, t in enumerate([2.0, 4.0, 3.0, 5.0])]
    base = [dict(prompt=i, seed=0, total_s=2 * t) for i, t in enumerate([2.0, 4.0, 3.0, 5.0])]
    pairs = paired(runs, base[::-1], lambda r: r["total_s"])  # matched by prompt and seed, not by position
    assert pairs == [(4.0, 2.0), (8.0, 4.0), (6.0, 3.0), (10.0, 5.0)]
    assert speedup_interval(pairs) == (2.0, 2.0)  # every prompt 2x: nothing to be unsure of
    assert speedup_interval(pairs[:1]) is None
    noisy = [(4.0, 2.0), (8.0, 2.0), (6.0, 3.0), (10.0, 10.0)]  # 2x, 4x, 2x, 1x: 28 / 17 = 1.65x
    lo, hi = speedup_interval(noisy)
    assert 1.0 <= lo < 28 / 17 < hi <= 4.0
    assert speedup_interval(noisy) == (lo, hi)  # seeded: the same runs give the same interval
    assert paired(runs[:2], base[1:], lambda r: r["total_s"]) == [(8.0, 4.0)]  # only prompts both ran
    mean, se = paired_difference([(0.8, 0.9), (0.8, 0.7), (0.6, 0.8), (1.0, 1.0)])  # differences .1 -.1 .2 0
    assert mean == pytest.approx(0.05)
    assert se == pytest.approx(statistics.stdev([0.1, -0.1, 0.2, 0.0]) / 2)
    assert paired_difference([(0.5, 0.75)]) == (0.25, None)


def test_own_teacache_coefficients_reach_every_teacache_method_and_the_report():
    class Runtime:
        spec = get_profile("flux-tiny")
        sizes = (1, 2, 4)

    poly = (12.574, -1.3008, 0.041905)
    methods = Bench(Runtime(), [], seeds=1, steps=4, progress=False, teacache_coefficients=poly).methods([0.002], [0.4])
    with_tc = [m for m in methods if "teacache" in m.options]
    assert len(with_tc) == 3 and all(m.options["teacache_coefficients"] == poly for m in with_tc)
    assert all("teacache_coefficients" not in m.options for m in methods if m not in with_tc)
    plain = Bench(Runtime(), [], seeds=1, steps=4, progress=False).methods([0.002], [0.4])
    assert all("teacache_coefficients" not in m.options for m in plain)
    head = dict(profile="flux-tiny", device="cpu", height=256, width=256, steps=4, prompts=[], seeds=1, per_size={})
    head.update(scheduler_overhead_ms=0.1, scheduler_overhead_pct=1.0, methods=[])
    source = dict(teacache_coefficients=list(poly), teacache_coefficients_source="--teacache-coefficients")
    text = markdown(dict(head, **source))
    assert "from --teacache-coefficients (highest power first): 12.574, -1.3008, 0.041905" in text
    assert "--teacache-coefficients" not in markdown(dict(head, teacache_coefficients_source="manifest"))


@pytest.fixture(scope="module")
def report(tiny_engines):
    return run_bench(str(tiny_engines), count=2, seeds=1, steps=6, taus=[1e9], thresholds=[1e9], progress=False)


def test_every_method_ran_on_every_prompt(report):
    names = [m["method"] for m in report["methods"]]
    assert names[:3] == ["native", "fixed 2p", "fixed 4p"]
    assert {"DDiT tau=1e+09", "TeaCache 1e+09", "DDiT+TeaCache 1e+09"} <= set(names)
    fewer = [m for m in report["methods"] if m["kind"] == "fewer-steps"]
    # Step reduction at equal time: one row per step count that fits the time of DDiT or of a DDiT + TeaCache run
    # (the first such method names it), from the baseline's encode + decode time and its time per step. Which
    # counts come out depends on this machine's speed (on a fast one every method fits 1 step), so the rows are
    # checked against the report's own times.
    base = report["methods"][0]
    denoise = sum(sum(steps) for steps in base["step_ms"]) / 1000
    per_step, fixed = denoise / 6, base["total_s"] - denoise
    expected = {}
    for m in report["methods"]:
        if m["kind"] in ("ddit", "ddit+teacache") and m["options"].get("tau") == report["tau"]:
            n = max(1, round((m["total_s"] - fixed) / per_step))
            if n < 6:
                expected.setdefault(n, m["method"])
    assert {m["steps"]: m["method"] for m in fewer} == {
        n: f"native {n} steps ({t}'s time)" for n, t in expected.items()
    }
    assert any(m["kind"] == "ddit+teacache" for m in report["methods"])
    for m in fewer:
        target = m["method"].split("(")[1].removesuffix("'s time)")
        assert target in names and m["steps"] < 6
        assert all(s == [1] * len(s) and len(s) == m["steps"] for s in m["schedules"])
    again = next(m for m in report["methods"] if m["method"].startswith("native (again"))
    assert again["kind"] == "baseline" and again["ssim"] == 1.0  # the same images as the first pass
    for m in report["methods"]:
        assert len(m["schedules"]) == 2
    base = report["methods"][0]
    assert base["speedup"] == 1.0 and base["ssim"] == 1.0 and base["psnr"] == float("inf")


def test_every_figure_says_how_sure_it_is(report):
    """Each method's speedup carries its bootstrap interval over the prompts, and its score its change against the
    baseline's images with a standard error; every step-reduction run is set against each method it was matched
    to, with the score difference per prompt."""
    rows = {m["method"]: m for m in report["methods"]}
    for m in report["methods"]:
        lo, hi = m["speedup_ci95"]  # 2 prompts: an interval exists
        assert lo <= m["speedup"] * (1 + 1e-9) and m["speedup"] <= hi * (1 + 1e-9)
        assert m["score_delta_se"] is not None
    base = rows["native"]
    assert base["speedup_ci95"] == [1.0, 1.0] and base["score_delta"] == 0.0 and base["score_delta_se"] == 0.0
    fewer = [m for m in report["methods"] if m["kind"] == "fewer-steps"]
    assert {(e["reduction"], e["method"]) for e in report["equal_time"]} >= {
        (m["method"], m["method"].split("(")[1].removesuffix("'s time)")) for m in fewer
    }
    for e in report["equal_time"]:
        method, reduction = rows[e["method"]], rows[e["reduction"]]
        assert e["pairs"] == 2 and e["steps"] == reduction["steps"]
        assert e["speedup"] == method["speedup"] and e["reduction_speedup"] == reduction["speedup"]
        # every prompt paired, so the mean of the differences is the difference of the means
        assert e["score_delta"] == pytest.approx(method["score"] - reduction["score"])
    text = markdown(report)
    assert "| 95% CI |" in text and "| score - native (s.e.) |" in text
    if report["equal_time"]:
        assert "step reduction at equal time" in text and f"against {report['equal_time'][0]['steps']} native" in text
    old = {k: v for k, v in report.items() if k != "equal_time"}  # a report from before 2026-12-06 still prints
    old["methods"] = [
        {k: v for k, v in m.items() if not k.startswith(("speedup_ci", "score_delta"))} for m in rows.values()
    ]
    assert "step reduction at equal time" not in markdown(old)


def test_methods_do_what_they_say(report):
    by = {m["method"]: m for m in report["methods"]}
    assert all(s == [4] * 6 for s in by["fixed 4p"]["schedules"])
    assert all(s == [1, 1, 1, 4, 4, 4] for s in by["DDiT tau=1e+09"]["schedules"])  # warm-up, then coarsest
    tea = by["TeaCache 1e+09"]
    assert all(s == [1] * 6 for s in tea["schedules"])
    assert all(c == [True, False, False, False, False, True] for c in tea["computed"])
    both = by["DDiT+TeaCache 1e+09"]
    assert all(c == [True, False, False, True, False, True] for c in both["computed"])  # the switch recomputes
    assert both["forced_by_switch"] == 1
    per_size = by["DDiT+TeaCache 1e+09 per-size"]  # the 4p size has no residual yet: its first step runs too
    assert all(c == [True, False, False, True, False, True] for c in per_size["computed"])
    assert per_size["forced_by_switch"] == 1 and per_size["reused_across_switch"] == 0
    assert by["fixed 4p"]["ssim"] < 1.0  # a different schedule gives a different image
    for m in report["methods"]:
        assert 0.0 <= m["score"] <= 1.0  # built-in prompts are scored by the evaluator


def test_per_size_rows_are_consistent(report):
    sizes = report["per_size"]
    assert set(sizes) == {1, 2, 4}
    assert sizes[1]["ratio"] == 1.0 and sizes[1]["flop_ideal"] == 1.0
    for row in sizes.values():
        assert row["step_ms"] == pytest.approx(row["fixed_step_ms"] + report["scheduler_overhead_ms"])
        assert row["bare_ms"] > 0 and row["efficiency"] == pytest.approx(row["ratio"] / row["flop_ideal"])
        assert 0 < row["loop_ms"] < row["fixed_step_ms"]  # the step's own work outside the engine calls
    for m in report["methods"]:  # every step's engine time is part of that step
        for steps, calls in zip(m["step_ms"], m["engine_ms"], strict=True):
            assert len(calls) == len(steps) and all(0 < c < t for c, t in zip(calls, steps, strict=True))
    assert sizes[4]["flop_ideal"] > sizes[2]["flop_ideal"] > 1
    assert report["scheduler_overhead_ms"] > 0
    in_loop = sizes[1]["ddit_step_ms"] - sizes[1]["fixed_step_ms"]  # NaN when the report's DDiT runs had no 1p step
    assert report["scheduler_in_loop_ms"] == pytest.approx(in_loop, nan_ok=True)
    table = markdown(report)
    # The direct cost: DDiT's steps after the warm-up (all at 4p here: tau 1e9) outside the engine calls, against
    # the fixed 4p run's same steps.
    warm = get_profile("flux-tiny").scheduler.warmup
    by = {m["method"]: m for m in report["methods"]}

    def outside(m):
        return [
            t - c
            for ts, cs in zip(m["step_ms"], m["engine_ms"], strict=True)
            for i, (t, c) in enumerate(zip(ts, cs, strict=True))
            if i >= warm
        ]

    ddit = by["DDiT tau=1e+09"]
    assert all(f == 4 for sch in ddit["schedules"] for f in sch[warm:])
    excess = [x - statistics.median(outside(by["fixed 4p"])) for x in outside(ddit)]
    assert report["scheduler_in_loop_direct_ms"] == pytest.approx(statistics.median(excess))
    assert "outside the engine calls" in table
    assert "| 4p |" in table and "DDiT+TeaCache" in table


def test_cli_writes_json_and_plot(tiny_engines, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [str(tiny_engines), "--count", "1", "--steps", "4", "--taus", "0.001", "--teacache-thresholds", "0.4"]
    result = CliRunner().invoke(bench_main, [*args, "--json", str(out), "--plot", str(png), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    fewer = [m for m in data["methods"] if m["kind"] == "fewer-steps"]
    again = len(fewer) > 0  # step reduction brings its own interleaved baseline
    assert data["steps"] == 4 and len(data["methods"]) == 7 + again + len(fewer) and data["call_batch"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method | speedup |" in result.output


def test_plot_sets_every_method_against_the_step_reduction_curve(report, tmp_path, monkeypatch):
    """The quality-vs-speed panel: every method but step reduction in the legend with its speedup's interval as a
    bar, and step reduction drawn as one dashed curve from the baseline through each step count."""
    plt = pytest.importorskip("matplotlib.pyplot")
    from ddit_export.bench import plot

    monkeypatch.setattr(plt, "close", lambda fig: None)  # keep the figure to look at it
    before = set(plt.get_fignums())
    plot(report, str(tmp_path / "bench.png"))
    fig = plt.figure((set(plt.get_fignums()) - before).pop())
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_legend().get_texts()]
    methods = [m for m in report["methods"] if m["kind"] != "fewer-steps" and not m["method"].startswith("native (")]
    assert names[1:] == [m["method"] for m in methods] and names[0].startswith("native at fewer steps")
    curves = [line for line in ax.get_lines() if line.get_linestyle() == "--" and len(line.get_xdata()) > 0]
    fewer = [m for m in report["methods"] if m["kind"] == "fewer-steps"]
    if fewer:  # which step counts fit depends on this machine's speed; on a fast one none may
        expected = sorted([report["methods"][0]["speedup"], *(m["speedup"] for m in fewer)])
        assert len(curves) == 1 and list(curves[0].get_xdata()) == pytest.approx(expected)
    bars = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == len(methods)  # two prompts: every method has an interval
    plt.close(fig)


def test_cli_bad_input_is_one_line(tiny_engines, tmp_path):
    result = CliRunner().invoke(bench_main, [str(tiny_engines), "--taus", "fast"])
    assert result.exit_code == 2 and "cannot parse --taus 'fast'" in result.output
    result = CliRunner().invoke(bench_main, [str(tiny_engines), "--prompts", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    out = tmp_path / "bench.json"
    for args, words in [
        (["--height", "200"], ["200x256", "multiples of 64"]),
        (["--height", "2048", "--width", "2048"], ["2048x2048", "outside", "128x128 to 512x512"]),
        (["--frames", "9"], ["--frames is for Wan", "flux (image) engines"]),
    ]:
        result = CliRunner().invoke(bench_main, [str(tiny_engines), *args, "--json", str(out), "--quiet"])
        assert result.exit_code == 2 and all(w in result.output for w in words), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()


def test_cli_output_paths_and_steps_are_refused_before_the_run(tiny_engines, tmp_path, monkeypatch):
    """A benchmark takes minutes: a --json or --plot that cannot be written, --steps 0 or an unreadable prompt file
    is refused before any engine loads, not after the run (it would lose the whole report)."""
    pytest.importorskip("matplotlib")
    import ddit_runtime

    def refuse(*args, **kwargs):
        raise AssertionError("the engines loaded before the bad input was refused")

    monkeypatch.setattr(ddit_runtime, "runtime_class", refuse)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xff\xfe\x00not utf-8")
    (tmp_path / "folder.json").mkdir()
    for args, words in [
        (["--json", blocker / "x.json"], ["cannot write --json", "notes.txt' is a file, not a folder"]),
        (["--json", tmp_path / "folder.json"], ["--json", "is a folder"]),
        (["--plot", tmp_path / "bench.pdf"], ["--plot", "must end in .png"]),
        (["--plot", blocker / "bench.png"], ["cannot write --plot", "is a file, not a folder"]),
        (["--steps", "0"], ["--steps must be at least 1, got 0"]),
        (["--prompts", binary], ["prompts.txt", "is not UTF-8 text"]),
    ]:
        result = CliRunner().invoke(bench_main, [str(tiny_engines), *map(str, args), "--quiet"])
        assert result.exit_code == 2 and all(w in result.output for w in words), result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "notes.txt", "prompts.txt"]
    assert blocker.read_text() == "mine"


def test_benchmark_scripts_refuse_their_json_path_at_parse_time(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "per_size.py"
    spec = importlib.util.spec_from_file_location("per_size", script)
    per_size = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(per_size)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        per_size.main([str(tmp_path / "no-engines"), "--json", str(tmp_path / "notes.txt" / "x.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write --json" in err and "is a file, not a folder" in err, err
    assert "Traceback" not in err and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_bench_runs_every_method_at_the_asked_resolution(tiny_engines):
    """``--height``/``--width``: every generation, the bare calls and the FLOP-ideal ratios use that shape, not the
    profile's opt size (flux-tiny: 256x256)."""
    spec = get_profile("flux-tiny")
    report = run_bench(
        str(tiny_engines), count=1, steps=3, taus=[1e9], thresholds=[1e9], progress=False, height=128, width=192
    )
    assert (report["height"], report["width"], report["frames"]) == (128, 192, None)
    for m in report["methods"]:
        assert m["output_shapes"] == [[3, 128, 192]], m["method"]
    for k, row in report["per_size"].items():
        assert row["flop_ideal"] == pytest.approx(spec.step_flops(1, 128, 192) / spec.step_flops(k, 128, 192))
        assert row["bare_ms"] > 0
    assert report["per_size"][4]["flop_ideal"] < spec.step_flops(1, 256, 256) / spec.step_flops(4, 256, 256)
    assert markdown(report).startswith("flux-tiny on cpu (ort-cpu), 128x192, 3 steps")
    assert "--sizes" not in markdown(report).splitlines()[0]  # all the folder's sizes: no note


def test_bench_sizes_restrict_every_method_to_the_engines_loaded(tiny_engines):
    """``--sizes 1,2``: DDiT and the fixed schedules use 1p and 2p only, the per-size rows are those two, and a
    resolution that tiles 2p but not 4p (160 = 5 x 32) is accepted."""
    report = run_bench(
        str(tiny_engines), count=1, steps=4, taus=[1e9], thresholds=[1e9], progress=False, height=160, sizes=[1, 2]
    )
    assert set(report["per_size"]) == {1, 2} and report["height"] == 160
    assert report["sizes"] == [1, 2] and report["exported_sizes"] == [1, 2, 4]
    assert markdown(report).splitlines()[0].endswith("1 prompts x 1 seeds, sizes 1, 2 of 1, 2, 4 (--sizes)")
    names = [m["method"] for m in report["methods"]]
    assert "fixed 2p" in names and not any("4p" in n for n in names)
    for m in report["methods"]:
        assert {k for schedule in m["schedules"] for k in schedule} <= {1, 2}, m["method"]
    ddit = next(m for m in report["methods"] if m["method"].startswith("DDiT tau"))
    assert ddit["schedules"] == [[1, 1, 1, 2]]


def test_bench_sizes_are_checked_before_the_engines_load(tiny_engines, monkeypatch):
    import ddit_runtime

    monkeypatch.setattr(ddit_runtime, "runtime_class", lambda folder: pytest.fail("the engines were loaded"))
    for sizes, words in [([2, 4], "leaves out 1, the native baseline's size"), ([1, 8], "[8] not exported")]:
        with pytest.raises(DDiTError, match=re.escape(words)):
            run_bench(str(tiny_engines), count=1, steps=2, progress=False, sizes=sizes)
    result = CliRunner().invoke(bench_main, [str(tiny_engines), "--sizes", "1,x"])
    assert result.exit_code == 2 and "cannot parse --sizes '1,x'" in result.output


def test_bare_calls_timed_between_rounds_are_what_the_report_uses(tiny_engines):
    """``per_size.py``: the bare calls run after each prompt and seed's generations (``between``), and the report's
    bare medians are over every one of them, with no second timing afterwards."""
    from ddit_runtime import runtime_class

    runtime = runtime_class(str(tiny_engines))(str(tiny_engines), provider="cpu")
    bench = Bench(runtime, builtin_prompts("flux", 1), seeds=2, steps=2, progress=False)
    methods = [Method("native", "baseline", dict(schedule=[1, 1]))]
    methods += [Method(f"fixed {k}p", "fixed", dict(schedule=[k, k])) for k in runtime.sizes if k > 1]
    order = []
    bench.run_methods(methods, between=lambda: order.append((len(methods[0].runs), bench.bare_engine_ms(3))))
    assert [n for n, _ in order] == [1, 2]  # after each seed's generations, before the next seed's
    assert {k: len(ts) for k, ts in bench.bare_samples.items()} == {k: 6 for k in runtime.sizes}
    bench.done, bench.tau = methods, 1.0
    bench.bare_engine_ms = lambda reps=10: pytest.fail("the report timed the bare calls again")
    report = bench.report()
    for k, row in report["per_size"].items():
        assert row["bare_ms"] == pytest.approx(statistics.median(bench.bare_samples[k]))


def test_ddit_bench_times_its_bare_calls_beside_the_generations(tiny_engines):
    """``ddit-bench`` (``Bench.run``): a share of the bare calls after each prompt and seed's methods, as in
    ``per_size.py``, not in a phase of their own after every generation (where the machine's state differs)."""
    from ddit_export.bench import BARE_CALLS
    from ddit_runtime import runtime_class

    runtime = runtime_class(str(tiny_engines))(str(tiny_engines), provider="cpu")
    bench = Bench(runtime, builtin_prompts("flux", 1), seeds=2, steps=2, progress=False)
    timed = bench.bare_engine_ms
    order = []

    def bare(reps=10):
        native = next(m for m in bench._methods if m.kind == "baseline")
        order.append((len(native.runs), reps))
        return timed(reps)

    original_methods = bench.methods

    def methods(taus, thresholds):
        bench._methods = original_methods(taus, thresholds)
        return bench._methods

    bench.bare_engine_ms, bench.methods = bare, methods
    report = bench.run([1e9], [1e9])
    per_round = -(-BARE_CALLS // 2)
    assert order == [(1, per_round), (2, per_round)]  # after each seed's methods; none after the run
    assert {k: len(ts) for k, ts in report["bare_samples_ms"].items()} == {k: 2 * per_round for k in runtime.sizes}
    for k, row in report["per_size"].items():
        assert row["bare_ms"] == pytest.approx(statistics.median(bench.bare_samples[k]))


def _interrupt_at(monkeypatch, calls: int):
    """Ctrl-C during the ``calls``-th generation a Bench records (counted from 1)."""
    record, seen = Bench._record, []

    def interrupting(self, method, i, prompt, seed):
        seen.append(method.name)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return record(self, method, i, prompt, seed)

    monkeypatch.setattr(Bench, "_record", interrupting)
    return seen


def test_ctrl_c_keeps_the_prompts_every_method_finished(tiny_engines, monkeypatch):
    """An interrupted ddit-bench reports the prompts and seeds that every method completed, like for like, instead of
    losing the run: here Ctrl-C lands in the third prompt's fourth method."""
    args = dict(count=3, seeds=1, steps=3, taus=[0.002], thresholds=[0.4], progress=False)
    methods = 7  # native, fixed 2p and 4p, DDiT, TeaCache, DDiT+TeaCache and its per-size policy
    seen = _interrupt_at(monkeypatch, 2 * methods + 4)
    report = run_bench(str(tiny_engines), **args)
    assert report["interrupted"] == dict(finished=2, of=3, step_reduction=0)
    assert len(seen) == 2 * methods + 4 and len(report["methods"]) == methods
    assert [m["kind"] for m in report["methods"]].count("fewer-steps") == 0
    for m in report["methods"]:
        assert len(m["schedules"]) == 2, m["method"]  # the third prompt's finished methods were dropped
    assert report["per_size"][1]["bare_ms"] > 0  # timed after each finished prompt, not again afterwards
    text = markdown(report)
    assert (
        "INTERRUPTED (Ctrl-C): every method covers the first 2 of 3 prompt x seed runs; step reduction did not run"
        in text
    )
    assert "| native | 1.00x |" in text


def test_ctrl_c_in_step_reduction_keeps_the_methods_and_the_finished_reduction(tiny_engines, monkeypatch):
    """Step reduction runs after the methods, beside a baseline of its own: Ctrl-C there keeps every method whole,
    and the step counts and their baseline on the prompts they all finished (none: they are dropped)."""

    def fewer_steps(self, done):  # fixed step counts: the real ones follow the measured times
        again = Method("native (again, beside step reduction)", "baseline", dict(schedule=[1] * 3))
        return [again, Method("native 2 steps", "fewer-steps", dict(steps=2, schedule=[1, 1]))]

    monkeypatch.setattr(Bench, "fewer_steps", fewer_steps)
    args = dict(count=2, seeds=1, steps=3, taus=[0.002], thresholds=[0.4], progress=False)
    methods = 7
    _interrupt_at(monkeypatch, 2 * methods + 2 + 1)  # step reduction's second prompt
    report = run_bench(str(tiny_engines), **args)
    assert report["interrupted"] == dict(finished=2, of=2, step_reduction=1)
    assert [m["method"] for m in report["methods"]][methods:] == [
        "native (again, beside step reduction)",
        "native 2 steps",
    ]
    assert [len(m["schedules"]) for m in report["methods"]] == [2] * methods + [1, 1]
    assert "step reduction and its baseline on the first 1 of them" in markdown(report)
    _interrupt_at(monkeypatch, 2 * methods + 1)  # step reduction's first generation
    report = run_bench(str(tiny_engines), **args)
    assert report["interrupted"] == dict(finished=2, of=2, step_reduction=0)
    assert len(report["methods"]) == methods and all(len(m["schedules"]) == 2 for m in report["methods"])


def test_cli_ctrl_c_writes_what_finished_and_exits_130(tiny_engines, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = [str(tiny_engines), "--count", "2", "--steps", "3", "--taus", "0.002", "--teacache-thresholds", "0.4"]
    _interrupt_at(monkeypatch, 10)  # 7 methods a prompt: the second prompt's third
    result = CliRunner().invoke(bench_main, [*args, "--json", str(out), "--plot", str(png), "--quiet"])
    assert result.exit_code == 130, result.output
    assert (
        "INTERRUPTED" in result.output and "interrupted: the report covers 1 of 2 prompt x seed runs" in result.output
    )
    data = json.loads(out.read_text())
    assert data["interrupted"] == dict(finished=1, of=2, step_reduction=0)
    assert all(len(m["schedules"]) == 1 for m in data["methods"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out.unlink(), png.unlink()
    _interrupt_at(monkeypatch, 3)  # nothing finished: nothing to report
    result = CliRunner().invoke(bench_main, [*args, "--json", str(out), "--plot", str(png), "--quiet"])
    assert result.exit_code == 130 and "interrupted: nothing was written" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_scheduler_cold_script_times_every_variant(tiny_engines, capsys):
    """``benchmarks/scheduler_cold.py``: one table row per thing run before ``next_factor``, engine calls included."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "scheduler_cold.py"
    spec = importlib.util.spec_from_file_location("scheduler_cold", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([str(tiny_engines), "--reps", "5", "--mib", "0.25,1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "median" not in line]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == [
        "nothing",
        "5 ms asleep",
        "5 ms busy",
        "writing 0.25 MiB (160 MiB in all)",
        "writing 1 MiB (160 MiB in all)",
        "one 1p engine call",
        "one 2p engine call",
        "one 4p engine call",
    ]
    assert all(float(row.split(" | ")[1].rstrip(" |")) > 0 for row in rows)


def test_save_tau_records_the_largest_tau_that_met_the_bar_and_ddit_run_takes_it_there(tiny_engines, tmp_path):
    """--save-tau on a copy of the engines: tau 1e-9 never goes coarse (the baseline's images, SSIM 1) and 1e9
    always does after warm-up, so with --min-ssim 0.999 only 1e-9 meets the bar. ddit-run then takes it at the
    bench's shape (6 steps) and the profile's tau at any other; a bar no tau meets changes nothing."""
    import shutil

    from ddit_cli import run_main
    from ddit_runtime.manifest import load_manifest

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    args = [str(engines), "--count", "1", "--steps", "6", "--taus", "1e-9,1e9", "--teacache-thresholds", "1e9"]
    result = CliRunner().invoke(bench_main, [*args, "--save-tau", "--min-ssim", "0.999", "--quiet"])
    assert result.exit_code == 0, result.output
    assert re.search(r"--save-tau: tau 1e-09: [\d.]+x, meets the bar", result.output)
    assert re.search(r"--save-tau: tau 1e\+09: [\d.]+x, SSIM 0\.\d+ < 0\.999", result.output)
    assert "recorded tau 1e-09 for 256x256, 6 steps, sizes 1,2,4, rho 0.7" in result.output
    (entry,) = load_manifest(engines).spec.scheduler.calibrated  # sha256 of every file still checks
    assert (entry.tau, entry.steps, entry.frames, entry.sizes) == (1e-9, 6, None, (1, 2, 4))
    assert "SSIM 1.000" in entry.evidence and "over 1 runs" in entry.evidence

    prompt = ["--prompt", "a red circle on a black background", "--json", "-o"]
    at = CliRunner().invoke(run_main, [str(engines), *prompt, str(tmp_path / "a.png"), "--steps", "6"])
    data = json.loads(at.output.strip().splitlines()[-1])
    assert (data["tau"], data["tau_source"]) == (1e-9, f"calibrated: {entry.shape()}")
    assert data["schedule"] == [1] * 6
    off = CliRunner().invoke(run_main, [str(engines), *prompt, str(tmp_path / "b.png"), "--steps", "7"])
    data = json.loads(off.output.strip().splitlines()[-1])
    assert (data["tau"], data["tau_source"]) == (get_profile("flux-tiny").scheduler.tau, "profile")
    said = CliRunner().invoke(run_main, [str(engines), "--prompt", "a red circle", "-o", str(tmp_path / "c.png")])
    tau = get_profile("flux-tiny").scheduler.tau
    assert f"tau {tau:g} (the profile's; calibrated only for 256x256, 6 steps, sizes 1,2,4, rho 0.7)" in said.output

    before = (engines / "manifest.json").read_bytes()
    args = [str(engines), "--count", "1", "--steps", "6", "--taus", "1e9", "--teacache-thresholds", "1e9"]
    result = CliRunner().invoke(bench_main, [*args, "--save-tau", "--min-ssim", "0.999", "--quiet"])
    assert result.exit_code == 2 and "no tau of 1e+09 met the bar, so the manifest is unchanged" in result.output
    assert "Traceback" not in result.output and (engines / "manifest.json").read_bytes() == before
    assert not list(engines.glob(".manifest.json.partial*"))


def test_bench_defaults_to_the_tau_calibrated_at_its_shape():
    import dataclasses

    from ddit_profiles import CalibratedTau

    spec = get_profile("flux-tiny")
    entry = CalibratedTau(*spec.opt_size, None, 6, (1, 2), spec.scheduler.rho, 0.05)  # the bench's default shape

    class Runtime:
        sizes = (1, 2)

    Runtime.spec = dataclasses.replace(spec, scheduler=spec.scheduler.with_calibrated(entry))
    assert Bench(Runtime(), [], seeds=1, steps=6, progress=False).default_tau() == 0.05
    assert Bench(Runtime(), [], seeds=1, steps=8, progress=False).default_tau() == spec.scheduler.tau


def test_choose_tau_keeps_the_largest_tau_that_met_the_bar():
    from ddit_export.bench import DEFAULT_MIN_SSIM, choose_tau

    def row(tau, speedup, ssim, delta):
        return dict(kind="ddit", options=dict(tau=tau), speedup=speedup, ssim=ssim, score_delta=delta)

    rows = [
        row(0.02, 2.0, 0.95, -0.01),
        row(0.05, 1.9, 0.88, -0.02),
        row(0.1, 3.0, 0.80, -0.01),
        row(1, 4.0, 0.9, -0.2),
    ]
    report = dict(methods=[dict(kind="baseline", options={}, speedup=1.0, ssim=1.0, score_delta=0.0), *rows])
    chosen, lines = choose_tau(report)  # 0.05 is larger than 0.02, if timed slower; 0.1 and 1 each miss one bar
    assert DEFAULT_MIN_SSIM == 0.85 and chosen["options"]["tau"] == 0.05
    assert lines == [
        "tau 0.02: 2.00x, meets the bar",
        "tau 0.05: 1.90x, meets the bar",
        "tau 0.1: 3.00x, SSIM 0.800 < 0.85",
        "tau 1: 4.00x, score -0.200 < -0.03",
    ]
    assert choose_tau(report, min_ssim=0.9)[0]["options"]["tau"] == 0.02
    assert choose_tau(report, min_ssim=0.0)[0]["options"]["tau"] == 0.1
    assert choose_tau(report, max_score_drop=0.005)[0] is None
    unscored = dict(methods=[dict(r, score_delta=None) for r in rows])  # --prompts: SSIM only
    assert choose_tau(unscored)[0]["options"]["tau"] == 1
