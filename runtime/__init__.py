"""The DDiT runtime: reads an engines folder and runs the denoising loop. Installed as ``ddit_runtime``.

It imports torch, onnxruntime, tokenizers and pillow only: never ddit_export, diffusers, transformers or peft.
"""
