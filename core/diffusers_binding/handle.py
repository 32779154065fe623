"""What an install changed on a UNet or a DiT transformer, and how to put it back."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle


@dataclass
class ProcessorHandle:
    """Processors to restore and hooks to remove on `model` (a UNet or a DiT transformer); `remove()` (also on
    leaving a `with`) does it once.

    `registry`, when given, is the set of models carrying this kind of install: the model leaves it.
    """

    model: torch.nn.Module
    previous: dict[str, Any] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    registry: weakref.WeakSet | None = field(default=None, repr=False)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for path, processor in self.previous.items():
            self.model.get_submodule(path).set_processor(processor)
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.registry is not None:
            self.registry.discard(self.model)
        self.removed = True

    def __enter__(self) -> ProcessorHandle:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.remove()
