"""The DDiT runtime: reads an engines folder and runs the denoising loop. Installed as ``ddit_runtime``.

It imports torch, onnxruntime, tokenizers and pillow only: never ddit_export, diffusers, transformers or peft.
"""


def runtime_class(folder):
    """The runtime for the engines folder ``folder``: ``WanRuntime`` when its manifest says Wan, else ``FluxRuntime``
    (whose loading then reports an unreadable manifest). Imported on demand."""
    from .manifest import peek_family

    if peek_family(folder) == "wan":
        from .wan_pipeline import WanRuntime

        return WanRuntime
    from .pipeline import FluxRuntime

    return FluxRuntime
