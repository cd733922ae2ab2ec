"""torch.onnx (dynamo) export of one module, the float64 check, and the ONNX Runtime-versus-torch parity check."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ddit_profiles import DDiTError, Tolerance

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; stay clear of it
# The exporter logs one warning per torchvision op it cannot register; we export no torchvision ops.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def param_bytes(module: torch.nn.Module) -> int:
    seen = {id(p): p for p in list(module.parameters()) + list(module.buffers())}
    return sum(p.numel() * p.element_size() for p in seen.values())


def export_onnx(
    module,
    args: tuple,
    names: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic_shapes: dict,
    path: Path,
    opset: int,
    keep_metadata: bool = False,
) -> list[Path]:
    """Export ``module(*args)`` to ``path`` with dynamo at ``opset``; return the files written (graph + data).

    The exporter's per-node ``pkg.torch.*`` metadata (stack traces and module scopes, no part of the computation)
    is dropped before saving unless ``keep_metadata`` (``fp8.quantize_graph`` reads the scopes, then drops them).
    """
    external = param_bytes(module) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=list(names),
                output_names=list(outputs),
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; name the component and keep the cause
            raise DDiTError(
                f"torch.onnx export of {path.name} failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
        if not keep_metadata:
            drop_exporter_metadata(program.model)
        fusable_forms(program.model)
        program.save(str(path), external_data=external)
    return graph_files(path)


#: key prefix of the dynamo exporter's per-node metadata (``pkg.torch.onnx.name_scopes``, stack traces, ...)
EXPORTER_METADATA = "pkg.torch."


def drop_exporter_metadata(model) -> int:
    """Remove the ``pkg.torch.*`` metadata from every node of an ``onnx_ir`` model (subgraphs and functions too);
    returns how many entries went."""
    removed = 0
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in graph.all_nodes():
            keys = [k for k in node.metadata_props if k.startswith(EXPORTER_METADATA)]
            for k in keys:
                del node.metadata_props[k]
            removed += len(keys)
    return removed


def _scalar(value, expected: float) -> bool:
    """Whether ``value`` (an ``onnx_ir`` value) is a one-element constant equal to ``expected``."""
    tensor = value.const_value if value is not None else None
    if tensor is None:
        return False
    array = tensor.numpy()
    return array.size == 1 and float(array.reshape(())) == expected


def _only_use(value) -> object | None:
    """The one node that reads ``value``, or None when it has several readers or is a graph output."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0][0]


def _feeds(value, node, depth: int) -> bool:
    """Whether ``value`` is an input of ``node`` or of one of its producers, at most ``depth`` nodes up."""
    if depth < 0 or node is None:
        return False
    return any(v is value or (v is not None and _feeds(value, v.producer(), depth - 1)) for v in node.inputs)


def fusable_forms(model) -> dict[str, int]:
    """Rewrite two exported patterns into the forms ONNX Runtime's graph optimiser fuses; return the counts.

    torch's decompositions reach the graph in orders that ORT's fusions do not match, so every RMSNorm (FLUX's
    and Wan's q/k norms, T5's layer norm) and every tanh GELU ran as 7-10 separate kernels:

    - ``Mul(x, Reciprocal(y))`` (RMSNorm's ``x * rsqrt(var + eps)``) -> ``Div(x, y)``, which ORT fuses into
      ``SimplifiedLayerNormalization`` (within one ulp of the original).
    - ``Mul(Mul(Add(Tanh(...), 1), 0.5), x)`` (the tanh GELU as exported) -> ``Mul(Add(Tanh(...), 1), Mul(x, 0.5))``,
      the order ORT's ``FastGeluFusion`` matches (bitwise equal: a product with 0.5 is exact).

    Both stay standard ONNX ops, so a TensorRT build reads the same graph. Measured on the tiny FLUX engines (ORT
    1.32, 2 CPU threads, batch 2 at 256x256): 898 -> 718 nodes after ORT's optimiser, and calls 13-18% faster at
    1p and 2p, 4-12% at 4p. At FLUX.1-dev widths the fused GELU and RMSNorm run 3.7x and 2.3x faster than their
    unfused graphs, and a whole native step 3%.
    """
    counts = {"rmsnorm": 0, "gelu": 0}
    for graph in [model.graph, *model.functions.values()]:
        for node in list(graph.all_nodes()):
            if node.op_type == "Mul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
                for i, value in enumerate(node.inputs):
                    recip = value.producer() if value is not None else None
                    if recip is None or recip.op_type != "Reciprocal" or _only_use(value) is not node:
                        continue
                    other = node.inputs[1 - i]
                    node.op_type = "Div"
                    node.replace_input_with(0, other)
                    node.replace_input_with(1, recip.inputs[0])
                    recip.graph.remove(recip, safe=True)
                    counts["rmsnorm"] += 1
                    break
            if node.op_type == "Tanh":
                add = _only_use(node.outputs[0])
                if add is None or add.op_type != "Add" or not any(_scalar(v, 1.0) for v in add.inputs):
                    continue
                half = _only_use(add.outputs[0])
                if half is None or half.op_type != "Mul" or not any(_scalar(v, 0.5) for v in half.inputs):
                    continue
                outer = _only_use(half.outputs[0])
                if outer is None or outer.op_type != "Mul":
                    continue
                x = outer.inputs[1] if outer.inputs[0] is half.outputs[0] else outer.inputs[0]
                if not _feeds(x, node, depth=6):  # a GELU's tanh argument is computed from x; else leave it
                    continue
                const = next(v for v in half.inputs if _scalar(v, 0.5))
                half.replace_input_with(0, x)
                half.replace_input_with(1, const)
                outer.replace_input_with(0, add.outputs[0])
                outer.replace_input_with(1, half.outputs[0])
                counts["gelu"] += 1
    return counts


def graph_files(path: Path) -> list[Path]:
    """The files of the graph at ``path``: itself and its external data (``NAME.onnx.data``)."""
    return sorted(p for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))


#: torch dtype of each ``--precision`` but fp8 (profiles.PRECISIONS), which is an fp16 graph rewritten by ``fp8``.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TypedGraph(torch.nn.Module):
    """``module`` run in ``precision`` behind float32 inputs and outputs.

    The exported graph casts at its edges, so a typed engine keeps the family's one I/O contract (the runtime does
    not change) and a strongly typed TensorRT build runs the body in that type. ``module`` is deep-copied (its
    float32 weights stay intact for the next size), then every floating parameter and buffer is cast, except in the
    modules of ``keep`` types: the RoPE frequency tables (a half-precision frequency's rounding error, about 1e-3
    relative, grows with the token position in every angle). Memory: one extra copy of the weights in
    ``precision`` while it lives.
    """

    def __init__(self, module: torch.nn.Module, precision: str, keep: tuple[type, ...] = ()):
        super().__init__()
        self.dtype = DTYPES[precision]
        self.module = copy.deepcopy(module).to(self.dtype)
        for sub in self.module.modules():
            if isinstance(sub, keep):
                sub.float()

    def forward(self, *args):
        args = tuple(a.to(self.dtype) if a.is_floating_point() else a for a in args)
        out = self.module(*args)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def export_checked(
    module, example, io: tuple, path: Path, spec, label: str, feeds, precision, keep=(), amax=None
) -> dict:
    """Export ``module`` (a float32 transformer engine or probe) typed in ``precision``, check it, and return its
    manifest entry: ``onnx``, ``files``, ``precision``, ``max_abs_error``, ``parity`` (and ``fp8`` for fp8).

    ``io`` is (input names, output names, dynamic shapes by input name). fp32, fp16 and fp8 graphs are run by ONNX
    Runtime on ``feeds`` against the float32 torch ``module``, within the profile's ``transformer_tolerance``
    (fp32), ``fp16_tolerance`` or ``fp8_tolerance``. ONNX Runtime's CPU provider has no bfloat16 kernels, so a
    bf16 graph's check is left to a GPU (``max_abs_error`` None; ``parity`` says so). fp8 is an fp16 graph whose
    in-scope Linear layers ``fp8.quantize_graph`` then rewrites, with ``amax`` (``fp8.calibrate``'s activation
    ranges by module path).
    """
    names, outputs, dynamic = io
    if precision == "fp8" and not amax:  # quantize_graph would quantise nothing: never ship that as fp8
        raise DDiTError(f"{label}: fp8 needs calibrated activation ranges (fp8.calibrate); only FLUX has them")
    body = "fp16" if precision == "fp8" else precision
    if body == "fp32":
        graph = module
    else:  # TypedGraph.forward takes *args: torch.export then wants the dynamic shapes by position
        graph, dynamic = TypedGraph(module, body, keep).eval(), (tuple(dynamic.get(n) for n in names),)
    files = export_onnx(graph, example, names, outputs, dynamic, path, spec.opset, keep_metadata=precision == "fp8")
    del graph
    extra = {}
    if precision == "fp8":
        from .fp8 import quantize_graph

        extra["fp8"] = quantize_graph(path, amax or {}, EXTERNAL_DATA_BYTES)
        files = graph_files(path)  # the rewrite may have moved the weights in or out of external data
    if precision == "bf16":
        err, parity = None, "not run: ONNX Runtime's CPU provider has no bfloat16 kernels (check on a GPU)"
    else:
        bound = spec.transformer_tolerance
        if precision in ("fp16", "fp8"):  # WanSpec has no fp8 fields: read only what the precision needs
            bound = getattr(spec, f"{precision}_tolerance")
        err = check_parity(path, module, feeds, names, bound, label)
        parity = f"ONNX Runtime CPU against float32 torch, {len(feeds)} input shapes"
    entry = dict(onnx=path.name, files=[f.name for f in files], precision=precision, max_abs_error=err, parity=parity)
    return entry | extra


def double_tensors(path: Path) -> list[str]:
    """Names of every float64 value in the graph: inputs, outputs, initializers, value_info, Casts, Constants."""
    return typed_tensors(path, {onnx.TensorProto.DOUBLE})


#: ONNX's complex element types (TensorRT has none; diffusers' RoPE variants can produce them).
COMPLEX_TYPES = frozenset({onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128})


def complex_tensors(path: Path) -> list[str]:
    """Names of every complex64/complex128 value in the graph (as ``double_tensors`` does for float64)."""
    return typed_tensors(path, set(COMPLEX_TYPES))


def typed_tensors(path: Path, types: set[int]) -> list[str]:
    """Names of every value of an ONNX element type in ``types``: inputs, outputs, initializers, value_info,
    Casts to it, and tensor attributes (Constants), in subgraphs and functions too."""
    model = onnx.load(str(path), load_external_data=False)
    found: list[str] = []

    def walk(graph):
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.tensor_type.elem_type in types:
                found.append(v.name)
        found.extend(t.name for t in graph.initializer if t.data_type in types)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i in types:
                    found.append(f"{node.op_type}:{node.name}")
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in types:
                    found.append(f"{node.op_type}:{node.name}")
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    for fn in model.functions:
        for node in fn.node:
            if node.op_type == "Cast" and any(a.name == "to" and a.i in types for a in node.attribute):
                found.append(f"{fn.name}/Cast:{node.name}")
    return found


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(path: Path, module, feeds: list[tuple], names: tuple[str, ...], tol: Tolerance, label: str) -> float:
    """Run the graph and ``module`` on each input tuple; return the worst error over every output, raise above
    the tolerance (scaled by each output's own magnitude)."""
    session = ort_session(path)
    worst = 0.0
    for args in feeds:
        with torch.no_grad():
            refs = module(*args)
        refs = refs if isinstance(refs, tuple) else (refs,)
        gots = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
        for ref, got in zip(refs, gots, strict=True):
            got = torch.from_numpy(got)
            if got.shape != ref.shape:
                raise DDiTError(f"{label}: ONNX output shape {tuple(got.shape)} != torch {tuple(ref.shape)}")
            err = (got - ref).abs().max().item()
            bound = tol.bound(ref.abs().max().item())
            worst = max(worst, err)
            if not err <= bound:  # also catches NaN
                raise DDiTError(
                    f"{label}: ONNX Runtime differs from torch by {err:.3g} at input shape "
                    f"{tuple(args[0].shape)} (tolerance {bound:.3g}); the export is not trustworthy"
                )
    del session
    return worst


def check_graph_dtypes(folder: Path) -> None:
    """Refuse float64 and complex tensors in every graph: TensorRT runs neither."""
    for path in sorted(folder.glob("*.onnx")):
        for kind, found in (("float64", double_tensors(path)), ("complex", complex_tensors(path))):
            if found:
                raise DDiTError(f"{path.name} contains {kind} tensors ({', '.join(found[:3])}); TensorRT cannot run it")
