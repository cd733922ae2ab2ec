"""Prompt tokenisation from the engines folder's ``tokenizer.json`` files (the ``tokenizers`` library only)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ddit_profiles import DDiTError


class PromptTokenizer:
    """prompt -> input_ids [1, max_length] int64, padded and truncated as diffusers' pipeline does."""

    def __init__(self, path: Path, max_length: int, pad_id: int, pad_token: str, name: str):
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.max_length, self.name, self.pad_id = max_length, name, pad_id

    def __call__(self, prompt: str) -> torch.Tensor:
        encoding = self.tokenizer.encode(prompt)
        if encoding.overflowing:
            kept = self.tokenizer.decode(encoding.ids)
            print(
                f"warning: the prompt is longer than {self.name}'s {self.max_length} tokens and was truncated "
                f"to: {kept!r}",
                file=sys.stderr,
            )
        return torch.tensor([encoding.ids], dtype=torch.int64)


def check_prompt(prompt: str | None) -> str:
    if prompt is None or not prompt.strip():
        raise DDiTError("the prompt is empty: pass --prompt with some text")
    return prompt
