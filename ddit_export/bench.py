"""``ddit-bench``: speed and quality of every schedule on one engines folder, side by side, in one process.

On the same prompts and seeds it runs the native fixed schedule (the baseline), the fixed coarse schedules, DDiT at
each tau preset, TeaCache alone, DDiT + TeaCache, and the baseline with fewer steps matched to the time of DDiT and of
each DDiT + TeaCache threshold (the paper's step-reduction comparison). The methods run interleaved, each prompt
through every method in turn, so that the machine's drift hits them alike. For each it reports step times per
patch size against the FLOP-ideal ratios from the profile, end-to-end speedup, the scheduler's overhead, memory, and
quality: PSNR/SSIM against the baseline's images, plus the shapes evaluator's score when the prompts are the
built-in held-out captions (the embedded tiny models are trained on that grammar). The speedups carry a bootstrap
interval over the prompts, and the score changes (against the baseline, and against step reduction at equal time)
a standard error over the prompts, so that a difference can be told from noise.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ddit_profiles import CalibratedTau, DDiTError, FittedTeaCache
from ddit_runtime.outputs import check_writable, discard
from ddit_runtime.teacache import polynomials

from .evaluator import evaluate, evaluate_frames, frame_scores
from .manifest import save_fitted_teacache
from .quality import psnr, ssim
from .shapes import sample_clip, scene_from_seed
from .teacache_fit import DEFAULT_DEGREE, fit_teacache

HELD_OUT_SEED = 900_000_000  # the recipes train on seeds below 10^8
FIT_OFFSET = 50_000  # --fit-teacache's captions: HELD_OUT_SEED + 50 000 + i, not the benchmark's
FIT_WITH_COEFFICIENTS = "--fit-teacache fits the polynomials --teacache-coefficients would replace: give one of them"


@dataclass
class Prompt:
    """One benchmark prompt; ``score`` rates an output with the shapes evaluator (None for user prompts)."""

    text: str
    score: object = None
    simple: bool | None = None
    frame_scores: object = None  # Wan: video -> per-frame scores (``evaluator.frame_scores``)


def example(family: str, seed: int, simple: bool | None = None) -> Prompt:
    """The held-out image (FLUX) or clip (Wan) example of ``seed``: its caption and its evaluator."""
    if family == "wan":
        clip = sample_clip(random.Random(seed), simple)
        return Prompt(
            clip.caption(),
            lambda video: evaluate_frames(list(video), clip.scene, clip.motion, clip.second_colour),
            simple,
            lambda video: frame_scores(list(video), clip.scene, clip.motion, clip.second_colour),
        )
    scene = scene_from_seed(seed, simple)
    return Prompt(scene.caption(), lambda image: evaluate(image, scene), simple)


def builtin_prompts(family: str, count: int, offset: int = 0) -> list[Prompt]:
    """Held-out captions of the shapes grammar, alternating simple and detailed, each with its evaluator."""
    return [example(family, HELD_OUT_SEED + offset + i, i % 2 == 0) for i in range(count)]


def read_prompt_file(path: str) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise DDiTError(f"prompt file '{path}' does not exist: give a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DDiTError(f"prompt file '{path}' is not UTF-8 text: save it as UTF-8, one prompt per line") from None
    except OSError as e:
        raise DDiTError(f"cannot read prompt file '{path}' ({e.strerror or e})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DDiTError(f"prompt file '{path}' has no prompts: put one prompt per line")
    return [Prompt(line) for line in lines]


def frames_of(output: torch.Tensor) -> list[torch.Tensor]:
    """An image [3, H, W] or a video [F, 3, H, W] -> a list of images."""
    return [output] if output.dim() == 3 else list(output)


def _rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB; NaN where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def _outside_ms(methods, keep, with_size: bool = False) -> list:
    """Each step's time outside its engine calls (step ms - engine ms: the scheduler, buffers, guidance, Euler
    update), over the methods' runs, for the steps ``keep(step index, factor)`` accepts; ``with_size``: as
    (factor, ms) pairs."""
    out = []
    for m in methods:
        for r in m.runs:
            for i, (k, step, call) in enumerate(zip(r["schedule"], r["step_ms"], r["engine_ms"], strict=True)):
                if keep(i, k):
                    out.append((k, step - call) if with_size else step - call)
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x == x and x != float("inf")]
    return statistics.fmean(xs) if xs else float("nan")


def _psnr_mean(xs) -> float:
    """Mean PSNR over the finite values; inf when every image was identical to the baseline's."""
    finite = [x for x in xs if x != float("inf")]
    return statistics.fmean(finite) if finite else float("inf")


def paired(runs: list[dict], base_runs: list[dict], key) -> list[tuple[float, float]]:
    """``(key(base run), key(run))`` for every prompt and seed that both lists ran, in ``runs``' order."""
    base = {(r["prompt"], r["seed"]): r for r in base_runs}
    return [(key(base[(r["prompt"], r["seed"])]), key(r)) for r in runs if (r["prompt"], r["seed"]) in base]


def speedup_interval(pairs: list[tuple[float, float]], level: float = 0.95, resamples: int = 2000):
    """A percentile-bootstrap interval of the speedup sum(base s) / sum(method s) over (base s, method s) pairs,
    one per prompt and seed: the prompts are resampled, so the interval says how much the figure would move on
    other prompts of the same kind and with this run's noise. Seeded, so a report is reproducible from its runs.
    None with fewer than two pairs."""
    if len(pairs) < 2:
        return None
    rng = random.Random(0)
    n = len(pairs)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        stats.append(sum(pairs[i][0] for i in idx) / sum(pairs[i][1] for i in idx))
    stats.sort()
    cut = round((1 - level) / 2 * resamples)
    return stats[cut], stats[resamples - 1 - cut]


def paired_difference(pairs: list[tuple[float, float]]) -> tuple[float, float | None]:
    """Mean of (second - first) over pairs, and its standard error (sample stdev / sqrt n; None below 2 pairs)."""
    d = [b - a for a, b in pairs]
    if not d:
        return float("nan"), None
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else None
    return statistics.fmean(d), se


def scheduler_step_ms(scheduler, latent: torch.Tensor, reps: int) -> float:
    """Median ms of one scheduler update (``observe`` + ``next_factor``) on ``latent``, over ``reps`` updates, under
    ``torch.inference_mode`` as the runtimes' ``generate`` runs it."""
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            scheduler.observe(latent)
            scheduler.next_factor()
            times.append((time.perf_counter() - t0) * 1000)
    return _median(times)


@dataclass
class Method:
    name: str
    kind: str  # baseline | fixed | ddit | teacache | ddit+teacache | fewer-steps
    options: dict
    runs: list = field(default_factory=list)
    base: Method | None = None  # the baseline run interleaved with this one: its speedup is against that
    matched: list = field(default_factory=list)  # step reduction: the methods whose time this step count fits


def bench_shape(spec, sizes, height=None, width=None, frames=None) -> tuple[int, int, int | None]:
    """The benchmark's (height, width, frames): the given ones, else the profile's opt shape; frames is None for
    FLUX. With the engines' ``sizes`` it is checked as the runtime checks a generation (one-line errors)."""
    if frames is not None and spec.family != "wan":
        raise DDiTError(f"--frames is for Wan (video) engines; this folder holds {spec.family} (image) engines")
    height = spec.opt_size[0] if height is None else height
    width = spec.opt_size[1] if width is None else width
    frames = (spec.opt_frames if frames is None else frames) if spec.family == "wan" else None
    if sizes is not None:
        if frames is not None:
            spec.check_frames(frames)
        spec.check_resolution(height, width, tuple(sizes))
    return height, width, frames


def call_batch(spec) -> int:
    """The batch of one engine call in the runtime's step: 2 under batched guidance (the runtimes' default: FLUX's
    true CFG above 1, Wan's guidance scale above 1), else 1."""
    d = spec.scheduler
    return 2 if (d.true_cfg if spec.family == "flux" else d.guidance) > 1.0 else 1


def bare_feeds(spec, height: int, width: int, batch: int, device, frames: int | None = None) -> dict[str, torch.Tensor]:
    """Random inputs of one transformer call at ``height`` x ``width`` (Wan: ``frames`` video frames, default the
    profile's opt count): the same for every size, as the engines share one contract."""
    lh, lw = spec.latent_hw(height, width)
    if spec.family == "wan":
        lf = spec.latent_frames(spec.opt_frames if frames is None else frames)
        latent = torch.randn(batch, spec.latent_channels, lf, lh, lw, device=device)
        text = (batch, spec.t5_max_length, spec.text_dim)
    else:
        latent = torch.randn(batch, spec.latent_channels, lh, lw, device=device)
        text = (batch, spec.t5_max_length, spec.joint_attention_dim)
    feeds = {
        "latent": latent,
        "timestep": torch.full((batch,), 0.5, device=device),
        "encoder_hidden_states": torch.randn(text, device=device),
    }
    if spec.family == "flux":
        feeds["guidance"] = torch.full((batch,), spec.scheduler.guidance, device=device)
        feeds["pooled_projections"] = torch.randn(batch, spec.pooled_dim, device=device)
    return feeds


def bare_outputs(spec, engine, k: int, feeds: dict, height: int, width: int) -> dict[str, torch.Tensor]:
    """Output buffers of size ``k``'s transformer ``engine`` for ``feeds``: the velocity, and the TeaCache
    residual [B, (F,) rows, cols, D] where the graph has one."""
    latent = feeds["latent"]
    outputs = {"velocity": torch.empty_like(latent)}
    if "residual" in engine.output_names:
        rows, cols = spec.token_grid(k, height, width)
        grid = latent.shape[2:3] if spec.family == "wan" else ()
        outputs["residual"] = torch.empty(
            latent.shape[0], *grid, rows, cols, engine.output_dim("residual"), device=latent.device
        )
    return outputs


#: ``ddit-bench --save-tau``'s floor on the mean SSIM against the baseline's images (see ``choose_tau``)
DEFAULT_MIN_SSIM = 0.85
BARE_CALLS = 16  # bare engine calls per size in a ddit-bench run, spread over its prompts and seeds


class Bench:
    """Runs the methods on one runtime; ``report()`` aggregates. Generation settings come from the profile."""

    def __init__(
        self,
        runtime,
        prompts: list[Prompt],
        seeds: int,
        steps: int | None,
        progress: bool = True,
        teacache_coefficients: tuple[float, ...] | None = None,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
    ):
        """``teacache_coefficients`` (highest power first) replace the manifest's TeaCache polynomial in every
        TeaCache method. ``height``, ``width`` and (Wan) ``frames`` set the shape every generation, bare call,
        scheduler timing and FLOP count uses (default: the profile's opt shape); a shape given is checked against
        the engines first, so a bad one fails before any work."""
        self.runtime, self.prompts, self.seeds, self.progress = runtime, prompts, seeds, progress
        self.teacache_coefficients = teacache_coefficients
        self.spec = runtime.spec
        self.steps = self.spec.scheduler.steps if steps is None else steps
        self.family = self.spec.family
        explicit = (height, width, frames) != (None, None, None)
        self.height, self.width, self.frames = bench_shape(
            self.spec, runtime.sizes if explicit else None, height, width, frames
        )
        self.teacache = True  # both runtimes take generate(..., teacache=THRESH)
        self.native: dict[tuple[int, int], torch.Tensor] = {}
        self.bare_samples: dict[int, list[float]] = {}  # every bare call timed so far, per size
        self.interrupted: dict | None = None  # set by run_methods on Ctrl-C: what finished, and of how many

    # ---- running ----------------------------------------------------------------------------------------------------

    def _generate(self, prompt: Prompt, seed: int, options: dict):
        opts = dict(options)
        steps = opts.pop("steps", self.steps)
        if self.frames is not None:
            opts["frames"] = self.frames
        return self.runtime.generate(
            prompt.text, height=self.height, width=self.width, steps=steps, seed=seed, progress=False, **opts
        )

    def run_method(self, method: Method) -> Method:
        """One method on every prompt and seed (see ``run_methods`` for several, interleaved)."""
        return self.run_methods([method])[0]

    def run_methods(self, methods: list[Method], between=None) -> list[Method]:
        """Every method on every prompt and seed, interleaved: for each prompt and seed, each method once, in
        order. Machine drift (these CPUs vary 10-20% over minutes) then hits every method alike, where running
        one method after another would credit it to whichever ran in a slow minute. A baseline among them becomes
        the others' ``base``; the baseline's image is the quality reference. ``between`` (no arguments) runs after
        each prompt and seed's methods: ``per_size.py`` times its bare calls there, beside the generations.

        Ctrl-C (KeyboardInterrupt) keeps what finished instead of losing it: every method keeps its runs of the
        prompts and seeds that all of them completed (so the comparison stays like for like), the rest is dropped,
        ``self.interrupted`` says how many of how many finished, and the methods return as usual. At real widths a
        run takes an hour; its first prompts are worth a report."""
        base = next((m for m in methods if m.kind == "baseline"), None)
        jobs = [(i, p, s) for i, p in enumerate(self.prompts) for s in range(self.seeds)]
        start = [len(m.runs) for m in methods]
        finished = 0
        try:
            for i, prompt, seed in tqdm(jobs, desc="prompt x seed", disable=not self.progress, leave=False):
                for method in methods:
                    self._record(method, i, prompt, seed)
                finished += 1
                if between is not None:
                    between()
        except KeyboardInterrupt:
            for method, n in zip(methods, start, strict=True):
                del method.runs[n + finished :]
            # step_reduction: how many of them ``run`` got through step reduction with (0: none)
            self.interrupted = dict(finished=finished, of=len(jobs), step_reduction=0)
        for method in methods:
            method.base = method.base or base
        return methods

    def _record(self, method: Method, i: int, prompt: Prompt, seed: int) -> None:
        result = self._generate(prompt, seed, method.options)
        if method.kind == "baseline":
            self.native[(i, seed)] = result.image
        ref = self.native[(i, seed)]
        pairs = list(zip(frames_of(result.image), frames_of(ref), strict=True))
        method.runs.append(
            dict(
                prompt=i,
                seed=seed,
                total_s=result.total_s,
                denoise_s=sum(result.step_ms) / 1000,
                step_ms=result.step_ms,
                engine_ms=result.engine_ms,
                schedule=result.schedule,
                computed=result.computed or [True] * len(result.schedule),
                forced=result.settings.get("teacache_forced_by_switch", 0),
                reused=result.settings.get("teacache_reused_across_switch", 0),
                score=prompt.score(result.image) if prompt.score else None,
                ssim=_mean([ssim(a, b) for a, b in pairs]),
                psnr=_psnr_mean([psnr(a, b) for a, b in pairs]),
                rss_mb=_rss_mb(),
                output_shape=list(result.image.shape),  # [3, H, W], or [F, 3, H, W] for a video
            )
        )

    def methods(self, taus: list[float], thresholds: list[float]) -> list[Method]:
        """Every method; DDiT+TeaCache uses the middle tau preset (the profile's default unless --taus)."""
        steps, sizes = self.steps, self.runtime.sizes
        tau = taus[len(taus) // 2]
        out = [Method("native", "baseline", dict(schedule=[1] * steps))]
        out += [Method(f"fixed {k}p", "fixed", dict(schedule=[k] * steps)) for k in sizes if k > 1]
        out += [Method(f"DDiT tau={t:g}", "ddit", dict(tau=t)) for t in taus]
        if self.teacache:
            poly = {} if self.teacache_coefficients is None else dict(teacache_coefficients=self.teacache_coefficients)
            out += [
                Method(f"TeaCache {h:g}", "teacache", dict(schedule=[1] * steps, teacache=h, **poly))
                for h in thresholds
            ]
            out += [
                Method(f"DDiT+TeaCache {h:g}", "ddit+teacache", dict(tau=tau, teacache=h, **poly)) for h in thresholds
            ]
            out += [  # the other switch policy: a residual per size, reusable across a switch
                Method(
                    f"DDiT+TeaCache {h:g} per-size",
                    "ddit+teacache",
                    dict(tau=tau, teacache=h, teacache_switch="per-size", **poly),
                )
                for h in thresholds
            ]
        return out

    def fewer_steps(self, done: list[Method]) -> list[Method]:
        """The paper's step-reduction comparison: the baseline with as many steps as fit the time of DDiT (the
        middle tau) and of each DDiT + TeaCache run (every threshold, both switch policies), one run per step
        count.

        The match is on the whole generation's time: the baseline's text encoding and decoding (its total minus its
        denoising) cost the same at any step count, so the steps that fit are (target's total - that) / the
        baseline's time per step. Matching on total time alone would ask too many steps where decoding is a large
        share (the tiny Wan: about a third)."""
        total = sum(r["total_s"] for r in done[0].runs)
        denoise = sum(r["denoise_s"] for r in done[0].runs)
        fixed, per_step = total - denoise, denoise / self.steps
        targets = [m for m in done if m.kind in ("ddit", "ddit+teacache") and m.options.get("tau") == self.tau]
        out: dict[int, Method] = {}
        for m in targets:
            fewer = max(1, round((sum(r["total_s"] for r in m.runs) - fixed) / per_step))
            if fewer not in out and fewer < self.steps:
                out[fewer] = Method(
                    f"native {fewer} steps ({m.name}'s time)",
                    "fewer-steps",
                    dict(steps=fewer, schedule=[1] * fewer),
                )
            if fewer in out:
                out[fewer].matched.append(m.name)
        if not out:
            return []
        # A second pass of the baseline, interleaved with these: their speedups are against it, not against the
        # first pass's, which ran minutes earlier.
        again = Method("native (again, beside step reduction)", "baseline", dict(schedule=[1] * self.steps))
        return [again, *out.values()]

    def default_tau(self) -> float:
        """The tau a plain ``ddit-run`` takes at the bench's shape: one calibrated there (``--save-tau``), else the
        profile's."""
        scheduler = self.spec.scheduler
        steps, sizes = self.steps, self.runtime.sizes
        return scheduler.tau_for(self.height, self.width, self.frames, steps, sizes, scheduler.rho)[0]

    def teacache_polynomials(self):
        """(the default polynomial, {size: its own} or None, source) every TeaCache method of this bench runs with:
        ``--teacache-coefficients``, else those ``--fit-teacache`` fitted at the bench's shape, else the manifest's."""
        return polynomials(
            self.spec.teacache, self.teacache_coefficients, self.height, self.width, self.frames, self.steps
        )

    def default_thresholds(self) -> list[float]:
        """The TeaCache thresholds swept when none are given: a fit's own (its polynomials predict the output's
        change, on another scale than the published ones') where the bench uses one, else the profile's."""
        fitted = self.spec.teacache.fitted_for(self.height, self.width, self.frames, self.steps)
        if self.teacache_coefficients is None and fitted is not None and fitted.presets:
            return list(fitted.presets)
        return list(self.spec.teacache.presets)

    def fit_teacache(self, prompts: list[str], degree: int = DEFAULT_DEGREE) -> tuple[FittedTeaCache, list[str]]:
        """Fit TeaCache's polynomial per loaded size at the bench's shape on ``prompts`` (see ``teacache_fit``), and
        use the fit from here on (the manifest is the caller's to update)."""
        if self.teacache_coefficients is not None:
            raise DDiTError(FIT_WITH_COEFFICIENTS)

        def generate(text: str, seed: int, schedule: list[int]) -> None:
            self._generate(Prompt(text), seed, dict(schedule=schedule, teacache=0.0))

        entry, lines = fit_teacache(
            self.runtime, generate, prompts, self.height, self.width, self.frames, self.steps, degree, self.progress
        )
        self.spec = replace(self.spec, teacache=self.spec.teacache.with_fitted(entry))
        self.runtime.spec = self.spec
        return entry, lines

    def run(self, taus: list[float] | None = None, thresholds: list[float] | None = None) -> dict:
        tau = self.default_tau()
        taus = taus or [tau / 2, tau, tau * 2]
        thresholds = thresholds or self.default_thresholds()
        self._generate(self.prompts[0], 0, dict(schedule=[1] * self.steps))  # warm the sessions up
        # The bare calls run beside the generations, a share after each prompt and seed, as in per_size.py: timed
        # after all of them, in a phase of their own, they once read 78% of the runtime's ratio on the tiny FLUX
        # where beside them they read 100-108%.
        per_round = max(1, -(-BARE_CALLS // (len(self.prompts) * self.seeds)))
        self.interrupted = None
        done = self.run_methods(self.methods(taus, thresholds), between=lambda: self.bare_engine_ms(per_round))
        self.tau = taus[len(taus) // 2]
        stopped = self.interrupted  # Ctrl-C: report the prompts and seeds every method finished, if any
        if stopped is None:
            fewer = self.run_methods(self.fewer_steps(done))
            if self.interrupted is not None:  # step reduction's own prompts and seeds, against its own baseline
                n = len(done[0].runs)
                stopped = dict(finished=n, of=n, step_reduction=self.interrupted["finished"])
                fewer = fewer if stopped["step_reduction"] else []
            done += fewer
        elif not stopped["finished"]:
            raise KeyboardInterrupt
        self.interrupted = stopped
        self.done = done
        return self.report()

    # ---- aggregation ----------------------------------------------------------------------------------------------

    def scheduler_overhead_ms(self, reps: int = 50) -> float:
        """Median time of one scheduler update (observe + next_factor with a full history) on a latent of the
        benchmark's shape, on the runtime's device."""
        from ddit_runtime.scheduler import PatchScheduler

        spec, dev = self.spec, self.runtime.device
        shape = (1, spec.latent_channels, *spec.latent_hw(self.height, self.width))
        if self.family == "wan":
            shape = (1, spec.latent_channels, spec.latent_frames(self.frames), *shape[2:])
        sched = PatchScheduler(self.runtime.sizes, spec.native_patch, spec.scheduler.tau, spec.scheduler.rho, 0)
        latent = torch.randn(shape, device=dev)
        for _ in range(4):
            sched.observe(latent)
        return scheduler_step_ms(sched, latent, reps)

    @property
    def call_batch(self) -> int:
        return call_batch(self.spec)

    def bare_engine_ms(self, reps: int = 10) -> dict[int, float]:
        """Median ms of one bare engine call per size at the batch the runtime's step uses (IOBinding on
        preallocated buffers, nothing else), over these ``reps`` calls; every call is also kept in
        ``bare_samples``, which ``report`` uses when there are any."""
        dev = self.runtime.device
        feeds = bare_feeds(self.spec, self.height, self.width, self.call_batch, dev, self.frames)
        bound = {}
        for k, engine in self.runtime.engines.items():
            outputs = bare_outputs(self.spec, engine, k, feeds, self.height, self.width)
            engine.run(feeds, outputs)
            bound[k] = (engine, outputs)
        # Round-robin over the sizes (1p, 2p, 4p, 1p, ...), not every call of one size then the next: at real
        # widths the native calls alone take minutes, and drift over them would land in the ratios.
        times: dict[int, list[float]] = {k: [] for k in bound}
        for _ in range(reps):
            for k, (engine, outputs) in bound.items():
                t0 = time.perf_counter()
                engine.run(feeds, outputs)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times[k].append((time.perf_counter() - t0) * 1000)
        for k, ts in times.items():
            self.bare_samples.setdefault(k, []).extend(ts)
        return {k: _median(ts) for k, ts in times.items()}

    def _flops(self, k: int) -> float:
        """The profile's analytic FLOPs of one call at size ``k`` at the benchmark's shape."""
        if self.family == "wan":
            return self.spec.step_flops(k, self.frames, self.height, self.width)
        return self.spec.step_flops(k, self.height, self.width)

    def equal_time(self, rows: list[dict]) -> list[dict]:
        """The paper's step-reduction comparison, pair by pair: each method that a step-reduction run was matched
        to against that run, with the score difference (method - step reduction) per prompt and seed and its
        standard error, so a report says whether "better than step reduction at equal time" is more than noise."""
        by_name = {m.name: m for m in self.done}
        row = {r["method"]: r for r in rows}
        out = []
        for reduction in (m for m in self.done if m.kind == "fewer-steps"):
            for name in reduction.matched:
                method = by_name.get(name)
                if method is None:
                    continue
                scored = all(r["score"] is not None for r in method.runs + reduction.runs)
                delta, se = paired_difference(paired(method.runs, reduction.runs, _score)) if scored else (None, None)
                out.append(
                    dict(
                        method=name,
                        reduction=reduction.name,
                        steps=reduction.options["steps"],
                        pairs=len(paired(method.runs, reduction.runs, lambda r: r["total_s"])),
                        speedup=row[name]["speedup"],
                        speedup_ci95=row[name]["speedup_ci95"],
                        reduction_speedup=row[reduction.name]["speedup"],
                        reduction_speedup_ci95=row[reduction.name]["speedup_ci95"],
                        score=row[name]["score"],
                        reduction_score=row[reduction.name]["score"],
                        score_delta=delta,
                        score_delta_se=se,
                        ssim=row[name]["ssim"],
                        reduction_ssim=row[reduction.name]["ssim"],
                    )
                )
        return out

    def report(self) -> dict:
        # Per-size step time of the runtime: the fixed schedule's median step (bound buffers, the engine call with
        # its in-graph patchify, the Euler update) plus the scheduler's measured per-step cost, which every DDiT
        # step adds. DDiT's own steps at each size (noisier: fewer samples) are reported beside it as a check.
        overhead = self.scheduler_overhead_ms()
        poly, fitted, source = self.teacache_polynomials()
        if not self.bare_samples and self.interrupted is None:  # no bare calls yet (a Bench driven by hand)
            self.bare_engine_ms()
        bare = {k: _median(ts) for k, ts in self.bare_samples.items()}
        per_size, fixed_by_size = {}, {}
        for k in self.runtime.sizes:
            fixed = next(m for m in self.done if m.kind in ("baseline", "fixed") and m.options["schedule"][0] == k)
            fixed_by_size[k] = fixed
            observed = [
                ms
                for m in self.done
                if m.kind == "ddit"
                for r in m.runs
                for f, ms in zip(r["schedule"], r["step_ms"], strict=True)
                if f == k
            ]
            fixed_ms = _median([ms for r in fixed.runs for ms in r["step_ms"]])
            # The step's own time outside the engine calls (buffers, guidance, Euler update), read off the same
            # steps: unlike the bare column, no drift between two phases of the run can move it.
            loop_ms = _median(_outside_ms([fixed], lambda i, f: True))
            per_size[k] = dict(
                step_ms=fixed_ms + overhead,
                fixed_step_ms=fixed_ms,
                loop_ms=loop_ms,
                ddit_step_ms=_median(observed),
                bare_ms=bare.get(k),
            )
        for k, row in per_size.items():
            row["ratio"] = per_size[1]["step_ms"] / row["step_ms"]
            if row["bare_ms"] is not None:
                row["bare_ratio"] = per_size[1]["bare_ms"] / row["bare_ms"]
                row["ratio_vs_bare"] = row["ratio"] / row["bare_ratio"]
            flops = self._flops(k)
            if flops is not None:
                row["flop_ideal"] = self._flops(1) / flops
                row["efficiency"] = row["ratio"] / row["flop_ideal"]
        native_ms = per_size[1]["fixed_step_ms"]
        # In the loop the scheduler costs more than alone (its torch ops also delay the next engine call), so the
        # overhead is also read off the runs themselves: the median DDiT step at the native size less the median
        # fixed-schedule native step, measured interleaved. NaN when no DDiT run stayed native for a step. Whole
        # steps are moved by a method's place in the interleaved order (measured 2026-12-04: DDiT's warm-up steps,
        # where the scheduler only stores the latent, were as much slower), so the direct cost is also read off
        # the time outside the engine calls, where the scheduler runs: DDiT's deciding steps less the fixed
        # schedule's steps of the same size and step indices.
        in_loop = per_size[1]["ddit_step_ms"] - native_ms
        warm = self.spec.scheduler.warmup
        # the same fixed runs as the per-size rows (the first native pass, not the one beside step reduction)
        fixed_outside = {k: _median(_outside_ms([m], lambda i, f: i >= warm)) for k, m in fixed_by_size.items()}
        ddit = [m for m in self.done if m.kind == "ddit"]
        excess = [ms - fixed_outside[k] for k, ms in _outside_ms(ddit, lambda i, f: i >= warm, with_size=True)]
        direct = _median(excess)
        rows = []
        for m in self.done:
            total = sum(r["total_s"] for r in m.runs)
            scores = [r["score"]["score"] for r in m.runs if r["score"] is not None]
            steps = [len(r["schedule"]) for r in m.runs]
            base_runs = (m.base or m).runs
            # How sure each figure is: the speedup's spread over the prompts (bootstrap), and the score's change
            # against the baseline's images of the same prompts and seeds, with its standard error.
            interval = speedup_interval(paired(m.runs, base_runs, lambda r: r["total_s"]))
            delta, delta_se = (
                paired_difference(paired(m.runs, base_runs, _score))
                if all(r["score"] is not None for r in m.runs + base_runs)
                else (None, None)
            )
            rows.append(
                dict(
                    method=m.name,
                    kind=m.kind,
                    options={k: v for k, v in m.options.items() if k != "schedule"},
                    total_s=total,
                    speedup=sum(r["total_s"] for r in base_runs) / total,
                    speedup_ci95=list(interval) if interval else None,
                    score_delta=delta,
                    score_delta_se=delta_se,
                    mean_s=total / len(m.runs),
                    coarse_fraction=_mean([sum(f > 1 for f in r["schedule"]) / len(r["schedule"]) for r in m.runs]),
                    computed_fraction=_mean([sum(r["computed"]) / len(r["computed"]) for r in m.runs]),
                    forced_by_switch=_mean([r["forced"] for r in m.runs]),
                    reused_across_switch=_mean([r.get("reused", 0) for r in m.runs]),
                    steps=_median(steps),
                    score=_mean(scores) if scores else None,
                    ssim=_mean([r["ssim"] for r in m.runs]),
                    psnr=_psnr_mean([r["psnr"] for r in m.runs]),
                    peak_rss_mb=max(r["rss_mb"] for r in m.runs),
                    schedules=[r["schedule"] for r in m.runs],
                    output_shapes=[r["output_shape"] for r in m.runs],
                    computed=[r["computed"] for r in m.runs],
                    step_ms=[r["step_ms"] for r in m.runs],
                    engine_ms=[r["engine_ms"] for r in m.runs],
                )
            )
        return dict(
            equal_time=self.equal_time(rows),
            engines=str(self.runtime.manifest.folder),
            sizes=list(self.runtime.sizes),  # loaded (--sizes), so the ones DDiT could pick
            exported_sizes=list(self.runtime.manifest.sizes),
            tau=self.tau,
            rho=self.spec.scheduler.rho,
            family=self.family,
            profile=self.spec.name,
            device=str(self.runtime.device),
            backend=self.runtime.backend.name,
            height=self.height,
            width=self.width,
            frames=self.frames,
            steps=self.steps,
            call_batch=self.call_batch,
            prompts=[p.text for p in self.prompts],
            seeds=self.seeds,
            per_size=per_size,
            bare_samples_ms=self.bare_samples,
            scheduler_overhead_ms=overhead,
            scheduler_overhead_pct=100 * overhead / native_ms,
            scheduler_in_loop_ms=in_loop,
            scheduler_in_loop_pct=100 * in_loop / native_ms,
            scheduler_in_loop_direct_ms=direct,
            scheduler_in_loop_direct_pct=100 * direct / native_ms,
            teacache_coefficients=list(poly),
            teacache_coefficients_source="--teacache-coefficients" if source == "given" else source,
            teacache_fitted=None if fitted is None else {str(k): list(v) for k, v in fitted.items()},
            methods=rows,
            interrupted=self.interrupted,
        )


def choose_tau(
    report: dict, max_score_drop: float = 0.03, min_ssim: float = DEFAULT_MIN_SSIM
) -> tuple[dict | None, list[str]]:
    """What ``ddit-bench --save-tau`` keeps: of the DDiT rows (one per tau), the largest tau whose quality met the
    bar, and one line per tau saying how it fared. Returns (None, lines) when no tau met it.

    The bar: a mean SSIM against the baseline's images of at least ``min_ssim`` and, where the evaluator scored
    the runs (the built-in prompts), a score at most ``max_score_drop`` below the baseline's. The score alone is too
    weak a guard where the evaluator is: on the tiny Wan at 8 steps, every step after the warm-up at 4p (tau 1e9)
    moved the score by less than 0.03 over two captions at SSIM 0.56. The SSIM floor alone is a strict proxy: on
    the tiny FLUX fine-tuned at 512, DDiT over 1p and 2p kept the score (-0.013, s.e. 0.018) at SSIM 0.90.

    The largest tau, not the one timed fastest: given the same latents a larger tau picks the same size or a coarser
    one, so it is the faster in expectation, while the measured speedups of taus a few percent apart swap with the
    machine's noise (four prompts on the tiny FLUX timed tau 0.002 at 1.19x and 0.004 at 1.26x, at 19% and 20%
    of the steps coarse)."""
    rows = [r for r in report["methods"] if r["kind"] == "ddit"]
    passed, lines = [], []
    for r in rows:
        misses = []
        if not r["ssim"] >= min_ssim:
            misses.append(f"SSIM {r['ssim']:.3f} < {min_ssim:g}")
        if r["score_delta"] is not None and not r["score_delta"] >= -max_score_drop:
            misses.append(f"score {r['score_delta']:+.3f} < -{max_score_drop:g}")
        verdict = "; ".join(misses) if misses else "meets the bar"
        lines.append(f"tau {r['options']['tau']:g}: {r['speedup']:.2f}x, {verdict}")
        if not misses:
            passed.append(r)
    return max(passed, key=lambda r: r["options"]["tau"], default=None), lines


def calibrated_tau(report: dict, row: dict) -> CalibratedTau:
    """The manifest entry for ``row`` (a DDiT row of ``report``): the bench's shape, and what it measured there."""
    runs = len(row["schedules"])
    quality = f"SSIM {row['ssim']:.3f}"
    if row["score_delta"] is not None:
        se = f" (s.e. {row['score_delta_se']:.3f})" if row["score_delta_se"] is not None else ""
        quality += f", score {row['score_delta']:+.3f}{se} against native"
    evidence = (
        f"{row['speedup']:.2f}x end to end, {row['coarse_fraction']:.0%} of steps coarse, {quality}, over {runs} "
        f"runs ({len(report['prompts'])} prompts x {report['seeds']} seeds) on {report['device']} "
        f"({report['backend']}), ddit-bench {time.strftime('%Y-%m-%d')}"
    )
    return CalibratedTau(
        report["height"],
        report["width"],
        report["frames"],
        report["steps"],
        tuple(report["sizes"]),
        report["rho"],
        row["options"]["tau"],
        evidence,
    )


def _score(run: dict) -> float:
    return run["score"]["score"]


def interrupted_lines(report: dict) -> list[str]:
    """What an interrupted report covers, in words (none for a whole run)."""
    stop = report.get("interrupted")
    if not stop:
        return []
    reduction = (
        "step reduction did not run"
        if not stop["step_reduction"]
        else f"step reduction and its baseline on the first {stop['step_reduction']} of them"
    )
    return [
        f"INTERRUPTED (Ctrl-C): every method covers the first {stop['finished']} of {stop['of']} prompt x seed runs; "
        f"{reduction}"
    ]


def _interval(ci) -> str:
    return f"{ci[0]:.2f}-{ci[1]:.2f}x" if ci else "-"


def _delta(delta, se) -> str:
    if delta is None:
        return "-"
    return f"{delta:+.3f} ({se:.3f})" if se is not None else f"{delta:+.3f}"


def subset_note(report: dict) -> str:
    """', sizes 1, 2 of 1, 2, 4 (--sizes)' when the run loaded a subset of the folder's sizes, else ''."""
    loaded, exported = report.get("sizes"), report.get("exported_sizes")
    if not loaded or not exported or list(loaded) == list(exported):
        return ""
    return f", sizes {', '.join(map(str, loaded))} of {', '.join(map(str, exported))} (--sizes)"


def markdown(report: dict) -> str:
    """The report as two markdown tables (per size; per method) and the scheduler overhead."""
    lines = [
        f"{report['profile']} on {report['device']} ({report.get('backend', 'ort')}), {report['height']}x{report['width']}"
        f"{', ' + str(report['frames']) + ' frames' if report.get('frames') else ''}, {report['steps']} steps, "
        f"{len(report['prompts'])} prompts x {report['seeds']} seeds{subset_note(report)}",
        *interrupted_lines(report),
        "",
        "| size | runtime step ms | of which outside the engines | ratio | DDiT's steps ms | bare engine ms | bare ratio "
        "| runtime/bare | FLOP-ideal | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in report["per_size"].items():
        bare = (
            f"{r['bare_ms']:.1f} | {r['bare_ratio']:.2f}x | {r['ratio_vs_bare']:.1%}"
            if r.get("bare_ms") is not None
            else "- | - | -"
        )
        ideal = f"{r['flop_ideal']:.2f}x | {r['efficiency']:.0%}" if "flop_ideal" in r else "- | -"
        observed = f"{r['ddit_step_ms']:.1f}" if r["ddit_step_ms"] == r["ddit_step_ms"] else "-"
        loop_ms = r.get("loop_ms", float("nan"))  # reports written before 2026-12-04 have none
        loop = f"{loop_ms:.2f}" if loop_ms == loop_ms else "-"
        lines.append(f"| {k}p | {r['step_ms']:.1f} | {loop} | {r['ratio']:.2f}x | {observed} | {bare} | {ideal} |")
    lines += [
        "",
        f"scheduler overhead: {report['scheduler_overhead_ms']:.3f} ms per step = "
        f"{report['scheduler_overhead_pct']:.2f}% of a native step, timed alone (runtime step = fixed-schedule step "
        "+ this)",
    ]
    direct = report.get("scheduler_in_loop_direct_ms", float("nan"))  # reports before 2026-12-04 have none
    if direct == direct:
        lines.append(
            f"in the loop, outside the engine calls: a DDiT step after the warm-up takes {direct:.3f} ms more than a "
            f"fixed-schedule step of its size = {report['scheduler_in_loop_direct_pct']:.2f}% of a native step "
            "(the scheduler's own cost there)"
        )
    in_loop = report.get("scheduler_in_loop_ms", float("nan"))
    if in_loop == in_loop:
        lines.append(
            f"in the loop, whole steps: a DDiT step at 1p takes {in_loop:.3f} ms more than a fixed-schedule 1p step "
            f"(medians) = {report['scheduler_in_loop_pct']:.2f}% of a native step (also moved by the methods' order)"
        )
    lines += [
        "",
        "| method | speedup | 95% CI | s / image | steps run (computed) | switches forced / reused | coarse | score "
        "| score - native (s.e.) | SSIM | PSNR dB | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["methods"]:
        score = f"{r['score']:.3f}" if r["score"] is not None else "-"
        psnr_ = f"{r['psnr']:.1f}"
        lines.append(
            f"| {r['method']} | {r['speedup']:.2f}x | {_interval(r.get('speedup_ci95'))} | {r['mean_s']:.3f} "
            f"| {r['steps']:g} ({r['computed_fraction']:.0%}) "
            f"| {r['forced_by_switch']:.1f} / {r.get('reused_across_switch', 0):.1f} | {r['coarse_fraction']:.0%} "
            f"| {score} | {_delta(r.get('score_delta'), r.get('score_delta_se'))} | {r['ssim']:.3f} | {psnr_} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    pairs = report.get("equal_time") or []  # reports written before 2026-12-06 have none
    if pairs:
        lines += [
            "",
            "step reduction at equal time (speedup and 95% CI; score; method's score - step reduction's per prompt "
            "and seed, with its standard error; SSIM against the baseline):",
        ]
        for e in pairs:
            score = (
                f"score {e['score']:.3f} vs {e['reduction_score']:.3f}, "
                f"{_delta(e['score_delta'], e['score_delta_se'])} over {e['pairs']}; "
                if e["score"] is not None
                else ""
            )
            lines.append(
                f"- {e['method']} {e['speedup']:.2f}x ({_interval(e['speedup_ci95'])}) against {e['steps']} native "
                f"steps {e['reduction_speedup']:.2f}x ({_interval(e['reduction_speedup_ci95'])}): {score}"
                f"SSIM {e['ssim']:.3f} vs {e['reduction_ssim']:.3f}"
            )
    if report.get("teacache_coefficients_source") == "--teacache-coefficients":
        poly = ", ".join(f"{c:g}" for c in report["teacache_coefficients"])
        lines += ["", f"TeaCache rescaling polynomial from --teacache-coefficients (highest power first): {poly}"]
    elif str(report.get("teacache_coefficients_source", "")).startswith("fitted") and report.get("teacache_fitted"):
        polys = "; ".join(
            f"{k}p {', '.join(f'{c:g}' for c in v)}"
            for k, v in sorted(report["teacache_fitted"].items(), key=lambda kv: int(kv[0]))
        )
        shape = report["teacache_coefficients_source"].split(": ", 1)[1]
        lines += [
            "",
            f"TeaCache rescaling polynomials fitted for {shape} by --fit-teacache (highest power first): {polys}",
        ]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DDiTError("--plot needs matplotlib: pip install matplotlib (or 'ddit-toolchain[bench]')") from None
    return plt


def check_plot_path(path: str) -> Path:
    """Refuse a ``--plot`` that is not a writable .png, or matplotlib missing, before the benchmark runs."""
    if Path(path).suffix.lower() != ".png":
        raise DDiTError(f"--plot '{path}' must end in .png")
    _pyplot()
    return check_writable(path, "--plot")


def plot(report: dict, path: str) -> Path:
    """Quality against speedup for every method, and DDiT's patch schedule per prompt (default tau)."""
    plt = _pyplot()
    rows = report["methods"]
    use_score = all(r["score"] is not None for r in rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw=dict(width_ratios=[1.4, 1]))

    def quality(r):
        return r["score"] if use_score else r["ssim"]

    # Step reduction as a curve (the baseline at fewer steps): a method above it beats step reduction at its speed.
    curve = sorted(
        (r for r in rows if r["kind"] == "fewer-steps" or r["method"] == "native"), key=lambda r: r["speedup"]
    )
    if len(curve) > 1:
        ax.plot([r["speedup"] for r in curve], [quality(r) for r in curve], "k--", marker="x", lw=1, alpha=0.6)
        last = curve[0]["speedup"]
        for r in curve[1:]:
            if r["speedup"] - last < 0.1:  # a neighbour's label is there already
                continue
            last = r["speedup"]
            ax.annotate(
                f"{r['steps']:g} steps",
                (r["speedup"], quality(r)),
                fontsize=6,
                color="dimgrey",
                xytext=(2, -9),
                textcoords="offset points",
            )
        ax.plot([], [], "k--", marker="x", lw=1, alpha=0.6, label="native at fewer steps (step reduction)")
    # Named in the legend, not beside the points: methods cluster (TeaCache with and without DDiT, at one score),
    # and labels there print over one another.
    shown = [r for r in rows if r["kind"] != "fewer-steps" and not r["method"].startswith("native (again")]
    colours = plt.get_cmap("tab20")
    for i, r in enumerate(shown):
        y, s = quality(r), r["speedup"]
        ax.scatter(s, y, s=40, color=colours(i % 20), marker="osD^vPX*"[i % 8], label=r["method"], zorder=3)
        ci = r.get("speedup_ci95")
        if ci:  # the speedup's 95% bootstrap interval over the prompts
            ax.errorbar(s, y, xerr=[[s - ci[0]], [ci[1] - s]], fmt="none", ecolor=colours(i % 20), alpha=0.5, capsize=2)
    ax.legend(fontsize=6.5, loc="best", framealpha=0.8)
    ax.set_xlabel("end-to-end speedup over the native schedule (bars: 95% interval over the prompts)")
    ax.set_ylabel("evaluator score" if use_score else "SSIM vs native")
    ax.set_title("quality vs speed")
    ax.grid(alpha=0.3)
    ddit = next((r for r in rows if r["kind"] == "ddit" and r["options"].get("tau") == report.get("tau")), None)
    ddit = ddit or next(r for r in rows if r["kind"] == "ddit")
    grid = torch.tensor(ddit["schedules"], dtype=torch.float32).log2()
    sizes = sorted({int(k) for k in report["per_size"]})  # the sizes loaded (--sizes), so the ones DDiT could pick
    top = max(2.0, math.log2(sizes[-1]))  # a size keeps its colour whichever sizes a run loaded
    im = bx.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
    bx.set_xlabel("step")
    bx.set_ylabel("prompt x seed")
    bx.set_title(f"{ddit['method']}: patch size per step")
    cbar = fig.colorbar(im, ax=bx, ticks=[math.log2(k) for k in sizes])
    cbar.ax.set_yticklabels([f"{k}p" for k in sizes])
    for line in interrupted_lines(report):  # a partial run must not pass for a whole one
        fig.suptitle(line, color="red", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    except OSError as e:
        discard(tmp)
        raise DDiTError(f"cannot write --plot '{out}' ({e.strerror or e}): pick a writable path") from None
    finally:
        plt.close(fig)
    return out


def run_bench(
    engines: str,
    prompts_file: str | None = None,
    count: int = 8,
    seeds: int = 1,
    steps: int | None = None,
    taus: list[float] | None = None,
    thresholds: list[float] | None = None,
    backend: str | None = None,
    provider: str | None = None,
    progress: bool = True,
    teacache_coefficients: tuple[float, ...] | None = None,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
    sizes: list[int] | None = None,
    fit_teacache: int | None = None,
) -> dict:
    """``sizes``: the exported patch sizes to load (default: all); the native 1 is the baseline's and must be one.
    ``fit_teacache``: first fit TeaCache's polynomial per loaded size on that many prompts (built-in captions
    disjoint from the benchmark's, or the first of ``prompts_file``'s), record the fit in the folder's manifest,
    and bench with it; its lines are printed to stderr."""
    from ddit_runtime import runtime_class
    from ddit_runtime.manifest import load_manifest

    if seeds < 1 or count < 1:
        raise DDiTError("--seeds and --count must be at least 1")
    if steps is not None and steps < 1:
        raise DDiTError(f"--steps must be at least 1, got {steps}")
    if fit_teacache is not None and teacache_coefficients is not None:
        raise DDiTError(FIT_WITH_COEFFICIENTS)
    if fit_teacache is not None and fit_teacache < 1:
        raise DDiTError(f"--fit-prompts must be at least 1, got {fit_teacache}")
    if sizes is not None and 1 not in sizes:
        raise DDiTError(f"--sizes {','.join(map(str, sizes))} leaves out 1, the native baseline's size: add 1")
    prompts = read_prompt_file(prompts_file) if prompts_file else None  # before the sessions load
    if (height, width, frames) != (None, None, None) or sizes is not None:  # a bad shape or size fails before the
        manifest = load_manifest(engines, verify=False)  # sessions load (minutes at real widths); the runtime
        if sizes is not None:  # verifies the files after
            missing = sorted(set(sizes) - set(manifest.sizes))
            if missing:
                raise DDiTError(f"--sizes: {missing} not exported to '{engines}' (it has {list(manifest.sizes)})")
        bench_shape(manifest.spec, sizes or manifest.sizes, height, width, frames)
    runtime = runtime_class(engines)(engines, backend=backend, provider=provider, sizes=sizes)
    if progress:
        print(f"{runtime.backend}; {runtime.loader.resident}", file=sys.stderr, flush=True)
    prompts = prompts or builtin_prompts(runtime.spec.family, count)
    bench = Bench(runtime, prompts, seeds, steps, progress, teacache_coefficients, height, width, frames)
    if fit_teacache:
        if prompts_file:
            fit_prompts = [p.text for p in prompts[:fit_teacache]]
        else:
            fit_prompts = [p.text for p in builtin_prompts(runtime.spec.family, fit_teacache, FIT_OFFSET)]
        entry, lines = bench.fit_teacache(fit_prompts)
        path = save_fitted_teacache(engines, entry)
        for line in lines:
            print(f"--fit-teacache: {line}", file=sys.stderr)
        presets = ", ".join(f"{h:g}" for h in entry.presets)
        print(
            f"--fit-teacache: recorded for {entry.shape()} in {path} (thresholds on its scale: {presets}); ddit-run "
            "uses it at that shape unless --teacache-coefficients is given",
            file=sys.stderr,
            flush=True,
        )
    report = bench.run(taus, thresholds)
    report["quality_source"] = "built-in held-out captions (evaluator)" if not prompts_file else "PSNR/SSIM vs native"
    return report


def writable_json(path: str) -> str:
    """argparse ``type=`` for the benchmark scripts' ``--json``: refused at parse time, before minutes of work."""
    import argparse

    try:
        check_writable(path, "--json")
    except DDiTError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def write_json(report: dict, path: str) -> Path:
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(out)
    except OSError as e:
        discard(tmp)
        raise DDiTError(f"cannot write --json '{out}' ({e.strerror or e}): pick a writable path") from None
    return out
