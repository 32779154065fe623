"""What an install changed on a UNet, and how to put it back."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from diffusers import UNet2DConditionModel
from torch.utils.hooks import RemovableHandle


@dataclass
class UNetHandle:
    """Processors to restore and hooks to remove; `remove()` (also on leaving a `with`) does it once.

    `registry`, when given, is the set of UNets carrying this kind of install: the UNet leaves it.
    """

    unet: UNet2DConditionModel
    previous: dict[str, Any] = field(default_factory=dict)
    hooks: list[RemovableHandle] = field(default_factory=list)
    registry: weakref.WeakSet | None = field(default=None, repr=False)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for path, processor in self.previous.items():
            self.unet.get_submodule(path).set_processor(processor)
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        if self.registry is not None:
            self.registry.discard(self.unet)
        self.removed = True

    def __enter__(self) -> UNetHandle:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.remove()
