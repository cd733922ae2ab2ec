"""``--precision fp8``: FP8 (E4M3) weights and activations on a transformer graph's Linear layers, as explicit
QuantizeLinear / DequantizeLinear pairs in the ONNX graph, so a strongly typed TensorRT build runs those GEMMs in
FP8 on a GPU that has FP8 tensor cores (compute capability 8.9 and newer) with no builder flags.

- **Scope.** The Linear layers whose module path matches the profile's ``fp8_scope`` (FLUX: every Linear of the
  double and single blocks, their AdaLN modulation included, as ModelOpt's FLUX recipe does; not the embedders,
  ``norm_out``, ``proj_out`` or the DDiT size adapters). Everything else runs in fp16 (the graph is exported as
  ``TypedGraph(..., "fp16")`` first).
- **Scales.** One per tensor, ``amax / 448`` (E4M3's largest finite value), as NVIDIA ModelOpt's default FP8
  recipe does. Weights: their own amax. Activations: the largest input each layer saw over a calibration run
  (``calibrate``), the engine's inputs along the native model's own Euler trajectory for the profile's calibration
  prompts. Quantisation saturates (``saturate=1``), so a value past the calibrated range is clipped, not lost.
- **Storage.** Weights are stored as FLOAT8E4M3FN initializers (one byte each, half of fp16) behind a
  DequantizeLinear; activations get a QuantizeLinear -> DequantizeLinear pair (one per tensor and scale, shared by
  the layers that read it, e.g. q, k and v).
- **Checked here.** ONNX Runtime's CPU provider runs float8 Q/DQ (by simulation: dequantised fp16 arithmetic), so
  every fp8 graph is run against the float32 torch model within the profile's ``fp8_tolerance``, like fp16 ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, numpy_helper

from ddit_profiles import DDiTError

from .onnx_io import EXPORTER_METADATA

E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value
FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear take float8 from opset 19
ZERO_POINT = "ddit_fp8_zero_point"


def linears_in_scope(engine: torch.nn.Module, scope: str) -> dict[str, torch.nn.Linear]:
    """The engine's ``nn.Linear`` modules whose path (``engine.named_modules()``) matches the regex ``scope``."""
    pattern = re.compile(scope)
    return {n: m for n, m in engine.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)}


@torch.no_grad()
def calibrate(engine: torch.nn.Module, inputs: list[tuple], scope: str) -> dict[str, float]:
    """Run ``engine`` on each input tuple; return the largest |input| each in-scope Linear saw, by module path."""
    layers = linears_in_scope(engine, scope)
    if not layers:
        raise DDiTError(f"fp8: no Linear layer of the transformer matches the profile's fp8_scope '{scope}'")
    amax: dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for args in inputs:
            engine(*args)
    finally:
        for h in handles:
            h.remove()
    return amax


def _module_path(node: onnx.NodeProto) -> str | None:
    """The torch module a node came from, as the dynamo exporter records it (``pkg.torch.onnx.name_scopes``: the
    scopes from the root down, the last being the op), without TypedGraph's leading ``module.``."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip().strip("'\"") for s in prop.value.strip("[]").split(",")]
            if len(scopes) < 2:
                return None
            path = scopes[-2]
            return path[len("module.") :] if path.startswith("module.") else path
    return None


def _scale(name: str, amax: float, dtype: int) -> onnx.TensorProto:
    value = torch.tensor(max(amax, 1e-12) / E4M3_MAX)
    numpy_dtype = {TensorProto.FLOAT16: "float16", TensorProto.FLOAT: "float32"}[dtype]
    return numpy_helper.from_array(value.numpy().astype(numpy_dtype), name)


def _fp8_weight(init: onnx.TensorProto, name: str) -> tuple[onnx.TensorProto, float]:
    """``init`` (fp16/fp32) -> (the FLOAT8E4M3FN initializer of ``init / scale``, amax)."""
    w = torch.from_numpy(numpy_helper.to_array(init).astype("float32"))
    amax = float(w.abs().max())
    scaled = (w / (max(amax, 1e-12) / E4M3_MAX)).clamp(-E4M3_MAX, E4M3_MAX)  # torch's cast does not saturate
    raw = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    return onnx.helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(init.dims), raw, raw=True), amax


def quantize_graph(path: Path, amax: dict[str, float], external_bytes: int) -> dict:
    """Rewrite the fp16 graph at ``path`` in place: every MatMul/Gemm whose module is in ``amax`` and whose weight
    is a 2-D initializer gets FP8 Q/DQ on its activation and an FP8 weight. Returns the manifest's ``fp8`` block.

    Raises a one-line ``DDiTError`` when a calibrated layer is not found in the graph (the exporter's node metadata
    changed), so a graph never ships half-quantised without saying so.
    """
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    zero = onnx.helper.make_tensor(ZERO_POINT, TensorProto.FLOAT8E4M3FN, [], [0.0])
    new_inits: list[onnx.TensorProto] = [zero]
    weight_dq: dict[str, str] = {}  # fp16 weight name -> its DequantizeLinear output
    act_dq: dict[tuple[str, float], str] = {}  # (activation, amax) -> its DequantizeLinear output
    found: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        module = _module_path(node) if node.op_type in ("MatMul", "Gemm") else None
        weight = inits.get(node.input[1]) if module in amax and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 2 or amax[module] <= 0.0:
            nodes.append(node)
            continue
        dtype = weight.data_type
        if node.input[1] not in weight_dq:
            w8, w_amax = _fp8_weight(weight, f"{weight.name}_fp8")
            new_inits += [w8, _scale(f"{weight.name}_fp8_scale", w_amax, dtype)]
            out = f"{weight.name}_dq"
            nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear", [w8.name, f"{weight.name}_fp8_scale", ZERO_POINT], [out], name=f"{out}_node"
                )
            )
            weight_dq[node.input[1]] = out
        key = (node.input[0], amax[module])
        if key not in act_dq:
            base = f"{node.input[0]}_fp8_{len(act_dq)}"
            new_inits.append(_scale(f"{base}_scale", amax[module], dtype))
            nodes.append(
                onnx.helper.make_node(
                    "QuantizeLinear", [node.input[0], f"{base}_scale", ZERO_POINT], [f"{base}_q"], name=f"{base}_q_node"
                )
            )
            nodes.append(
                onnx.helper.make_node(
                    "DequantizeLinear",
                    [f"{base}_q", f"{base}_scale", ZERO_POINT],
                    [f"{base}_dq"],
                    name=f"{base}_dq_node",
                )
            )
            act_dq[key] = f"{base}_dq"
        node.input[0], node.input[1] = act_dq[key], weight_dq[node.input[1]]
        nodes.append(node)
        found.add(module)
    missing = sorted(set(amax) - found)
    if missing:
        raise DDiTError(
            f"fp8: {len(missing)} calibrated layers (e.g. {missing[0]}) were not found as a MatMul/Gemm with a "
            f"constant weight in {path.name}; this exporter's graph layout is not supported for fp8: use --precision fp16"
        )
    used = {i for n in nodes for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    del graph.node[:]
    graph.node.extend(nodes)
    metadata = strip_exporter_metadata(graph)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < FP8_OPSET:
            opset.version = FP8_OPSET
    _save(model, path, external_bytes)
    onnx.checker.check_model(str(path))
    return dict(
        format="float8_e4m3fn, per-tensor scales (amax / 448), saturating",
        layers=len(found),
        weights=len(weight_dq),
        activation_scales=len(act_dq),
        metadata_props_removed=metadata,
    )


def strip_exporter_metadata(graph: onnx.GraphProto) -> int:
    """Drop the dynamo exporter's per-node ``pkg.torch.*`` metadata (stack traces, module scopes: two fifths of a
    tiny fp8 graph's bytes), in subgraphs too, once ``quantize_graph`` has read the scopes. Returns how many."""
    removed = 0
    for node in graph.node:
        kept = [p for p in node.metadata_props if not p.key.startswith(EXPORTER_METADATA)]
        removed += len(node.metadata_props) - len(kept)
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                removed += strip_exporter_metadata(sub)
    return removed


def _save(model: onnx.ModelProto, path: Path, external_bytes: int) -> None:
    """Save over ``path`` (and its old external data file), externalising the weights above ``external_bytes``."""
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > external_bytes
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
