"""One copy of the transformer weights for every patch size, measured against the merged engines, in one run.

    python benchmarks/weight_sharing.py [--profile flux-dev-shape] [--rank 16] [--runs 3] [--work DIR] [--json OUT]

Merged LoRA (what ``ddit-export`` writes) gives each size's graph a full copy of the weights: three copies for
sizes 1,2,4. The alternative measured here: export the coarse sizes with their LoRA as a separate branch (unmerged,
``W x + B (A x)``), so every graph carries the same base weights bit for bit, and hand ONNX Runtime one copy of
those (``SessionOptions.add_initializer``, the same ``OrtValue`` for all three sessions).

From one seeded random model of the profile with random non-zero LoRA (rank ``--rank``) it exports both variants
(each graph checked against torch by the exporter), finds the initializers the three separate-LoRA graphs share
(by content), then loads each variant in a fresh process and reports the resident memory after loading the three
sessions, the peak, and the median bare ``session.run`` time per size at the profile's opt size. It also checks
that the shared sessions compute what the merged ones do. Variants:

- ``merged``: the three merged graphs (today's engines);
- ``merged-noprepack``: the same with ONNX Runtime's weight prepacking off (prepacking copies each constant
  MatMul weight into a packed layout per session; a session that owns its weights then frees the originals, a
  shared weight cannot be freed);
- ``shared-noprepack``: the separate-LoRA graphs, base weights shared, prepacking off;
- ``shared``: the same with prepacking on (on ``flux-dev-shape`` it was killed for memory on a 24 GiB machine).

``--variants`` picks some; a variant whose process dies is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ddit_export.bench import writable_json

SIZES = (1, 2, 4)
VARIANTS = ("merged", "merged-noprepack", "shared-noprepack", "shared")


def _rss_gib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


# ---- export (parent) -------------------------------------------------------------------------------------------


def export(profile: str, rank: int, work: Path) -> dict:
    """Export sizes 1,2,4 merged and with separate LoRA from one seeded random model; return export seconds."""
    import torch

    from ddit_export.adapters import untrained_adapters
    from ddit_export.flux_export import _export_transformer
    from ddit_export.flux_model import size_variant
    from ddit_export.loading import load_flux
    from ddit_profiles import get_profile

    spec = get_profile(profile)
    parts = load_flux("random", spec)
    adapters = untrained_adapters(parts["transformer"], spec, [2, 4], rank=rank)
    gen = torch.Generator().manual_seed(7)
    for k in (2, 4):  # peft's init (B = 0), then a random B: a merged LoRA then changes every targeted weight
        with size_variant(parts["transformer"], adapters, k, trainable=True):
            pass
        adapters.lora[k] = {
            n: torch.randn(v.shape, generator=gen) * 0.02 if "lora_B" in n else v for n, v in adapters.lora[k].items()
        }
    seconds = {}
    for variant, merge in (("merged", True), ("separate", False)):
        folder = work / variant
        folder.mkdir(parents=True, exist_ok=True)
        started = time.time()
        for k in SIZES:
            if k == 1 and variant == "separate":  # size 1 has no LoRA: the two variants' graphs are the same
                for f in (work / "merged").glob("transformer_k1.onnx*"):
                    os.link(f, folder / f.name)
                continue
            entry = _export_transformer(parts, spec, adapters, k, folder, merge_lora=merge)
            print(f"exported {variant} k={k}: max |onnx - torch| {entry['max_abs_error']:.2g}", flush=True)
        seconds[variant] = round(time.time() - started, 1)
    return seconds


# ---- shared initializers ---------------------------------------------------------------------------------------


def external_initializers(model) -> dict[str, tuple[str, int, int]]:
    """name -> (data file, offset, length) of each initializer the ONNX ``model`` stores outside the graph."""
    import onnx

    out = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            out[t.name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    return out


def shared_plan(folder: Path) -> dict:
    """The initializers that two or more graphs in ``folder`` hold with identical bytes, by content hash:
    ``{"weights": {hash: [file, offset, length, dtype, shape]}, "graphs": {k: {name: hash}}}``."""
    import onnx

    graphs, where, seen = {}, {}, {}
    for k in SIZES:
        model = onnx.load(str(folder / f"transformer_k{k}.onnx"), load_external_data=False)
        meta = {
            t.name: (onnx.helper.tensor_dtype_to_np_dtype(t.data_type).str, list(t.dims))
            for t in model.graph.initializer
        }
        graphs[k] = {}
        for name, (file, offset, length) in external_initializers(model).items():
            with open(folder / file, "rb") as f:
                f.seek(offset)
                digest = hashlib.sha256(f.read(length)).hexdigest()
            graphs[k][name] = digest
            seen[digest] = seen.get(digest, 0) + 1
            where.setdefault(digest, [file, offset, length, *meta[name]])
    shared = {h for h, n in seen.items() if n > 1}
    return {
        "weights": {h: where[h] for h in shared},
        "graphs": {str(k): {n: h for n, h in g.items() if h in shared} for k, g in graphs.items()},
    }


# ---- measurement (child) ---------------------------------------------------------------------------------------


def child(work: Path, variant: str, profile: str, runs: int) -> dict:
    import onnxruntime as ort

    from ddit_profiles import get_profile

    spec = get_profile(profile)
    rss0 = _rss_gib()
    folder = work / ("merged" if variant.startswith("merged") else "separate")
    keep = []  # the shared arrays must outlive the sessions
    shared_bytes = 0
    plan = json.loads((work / "plan.json").read_text()) if variant.startswith("shared") else None
    values = {}
    if plan is not None:
        for digest, (file, offset, length, dtype, shape) in plan["weights"].items():
            arr = np.fromfile(
                folder / file, dtype=np.dtype(dtype), count=length // np.dtype(dtype).itemsize, offset=offset
            )
            arr = arr.reshape(shape)
            keep.append(arr)
            values[digest] = ort.OrtValue.ortvalue_from_numpy(arr)
            shared_bytes += arr.nbytes
    sessions = {}
    for k in SIZES:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if variant.endswith("noprepack"):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if plan is not None:
            for name, digest in plan["graphs"][str(k)].items():
                opts.add_initializer(name, values[digest])
        sessions[k] = ort.InferenceSession(
            str(folder / f"transformer_k{k}.onnx"), opts, providers=["CPUExecutionProvider"]
        )
    loaded = _rss_gib()
    rng = np.random.default_rng(0)
    lh, lw = spec.latent_hw(*spec.opt_size)
    feeds = {
        "latent": rng.standard_normal((1, spec.latent_channels, lh, lw), dtype=np.float32),
        "timestep": np.array([0.6], np.float32),
        "guidance": np.array([spec.scheduler.guidance], np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (1, spec.t5_max_length, spec.joint_attention_dim), dtype=np.float32
        ),
        "pooled_projections": rng.standard_normal((1, spec.pooled_dim), dtype=np.float32),
    }
    step_ms = {}
    for k, sess in sessions.items():
        names = {i.name for i in sess.get_inputs()}
        feed = {n: v for n, v in feeds.items() if n in names}
        out = sess.run(None, feed)[0]  # warm-up; its output is what the parent compares
        np.save(work / f"out-{variant}-k{k}.npy", out)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        step_ms[k] = statistics.median(times)
    return dict(
        variant=variant,
        rss_before_gib=round(rss0, 2),
        resident_after_load_gib=round(loaded - rss0, 2),
        peak_gib=round(_rss_gib("VmHWM"), 2),
        shared_weights_gib=round(shared_bytes / 2**30, 2),
        step_ms={str(k): round(v, 1) for k, v in step_ms.items()},
    )


# ---- report ----------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="flux-dev-shape")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per size after one warm-up")
    ap.add_argument("--work", default=None, help="folder for the graphs (default: a temporary one, removed after)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--json", type=writable_json, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.work), args.child, args.profile, args.runs)))
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ddit-weights-"))
    try:
        seconds = export(args.profile, args.rank, work) if not (work / "separate").is_dir() else {}
        plan = shared_plan(work / "separate")
        (work / "plan.json").write_text(json.dumps(plan))
        sizes_bytes = {
            v: sum(f.stat().st_size for f in (work / v).glob("transformer_k*.onnx*")) for v in ("merged", "separate")
        }
        rows, variants = [], [v for v in args.variants.split(",") if v]
        if set(variants) - set(VARIANTS) or "merged" not in variants:
            sys.exit(f"error: --variants needs merged and only {', '.join(VARIANTS)}; got {args.variants}")
        for variant in variants:
            cmd = [sys.executable, __file__, "--child", variant, "--work", str(work), "--profile", args.profile]
            cmd += ["--runs", str(args.runs)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append(dict(variant=variant, failed=f"exit {done.returncode} (-9: killed, e.g. out of memory)"))
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        ran = [r["variant"] for r in rows if "failed" not in r and r["variant"] != "merged"]
        diff = {
            f"{v} k{k}": float(
                np.abs(np.load(work / f"out-{v}-k{k}.npy") - np.load(work / f"out-merged-k{k}.npy")).max()
            )
            for v in ran
            for k in SIZES
        }
        report = dict(
            profile=args.profile,
            rank=args.rank,
            export_seconds=seconds,
            files_gib={v: round(b / 2**30, 2) for v, b in sizes_bytes.items()},
            shared_initializers=len(plan["weights"]),
            max_abs_diff_vs_merged=diff,
            rows=rows,
        )
        print(f"\n{args.profile}, LoRA rank {args.rank}, sizes 1,2,4 ({args.runs} runs per size after a warm-up)\n")
        print("| variant | resident after loading 3 sessions (GiB) | peak (GiB) | k1 ms | k2 ms | k4 ms |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "failed" in r:
                print(f"| {r['variant']} | {r['failed']} | | | | |")
                continue
            ms = r["step_ms"]
            print(
                f"| {r['variant']} | {r['resident_after_load_gib']:.2f} | {r['peak_gib']:.2f} "
                f"| {ms['1']:.0f} | {ms['2']:.0f} | {ms['4']:.0f} |"
            )
        print(f"\nshared initializers: {len(plan['weights'])}; graph files on disk (GiB): {report['files_gib']}")
        print("max |shared - merged| per size: " + ", ".join(f"{k} {v:.2g}" for k, v in diff.items()))
        if args.json:
            tmp = Path(args.json).with_suffix(".partial")
            tmp.write_text(json.dumps(report, indent=2) + "\n")
            tmp.rename(args.json)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
