"""Timing and peak-memory helpers for the benchmarks (one process, alternating calls)."""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while the mode is on (each storage counted once).

    CPU has no allocator statistics like `torch.cuda.max_memory_allocated`; this counts what such
    a statistic would, for the tensors made inside the measured call.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.references: dict[int, int] = {}
        self.seen: set[int] = set()  # ids of live tracked tensors (a WeakSet would compare tensors by value)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and id(tensor) not in self.seen:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        self.seen.add(id(tensor))
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if self.references.get(key, 0) == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.references[key] = self.references.get(key, 0) + 1
        weakref.finalize(tensor, self._release, id(tensor), key, size)

    def _release(self, tensor_id: int, key: int, size: int) -> None:
        self.seen.discard(tensor_id)
        self.references[key] -= 1
        if self.references[key] == 0:
            self.live -= size


def peak_mib(run: Callable[[], object]) -> float:
    """Peak MiB of tensors alive at once during `run` (its result included)."""
    with PeakTensorMemory() as meter:
        result = run()
    del result
    return meter.peak / 2**20


def alternate_rounds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call of each run, calling them in turn (one round = one call of each) so drift hits all alike;
    each round starts one run later, so no run always follows the same one."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for run in runs.values():  # warm-up
        run()
    for round_index in range(repeats):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return times


def alternate(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each run, calling them in turn so drift hits all alike."""
    return {name: statistics.median(values) for name, values in alternate_rounds(runs, repeats).items()}


def paired_cost(rounds: dict[str, list[float]], with_name: str, without_name: str, base_name: str) -> float:
    """Median over rounds of (with - without) / base: what one setting adds, in base calls, robust to drift."""
    return statistics.median((w - wo) / b for w, wo, b in zip(rounds[with_name], rounds[without_name], rounds[base_name]))


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops run while the mode is on, by torch.utils.flop_counter's formulas (matmuls, convolutions, the
    SDPA kernels it knows). Unlike FlopCounterMode it sets no module hooks, so a call that runs autograd.grad inside
    (Spatial Guidance's guided pass) can be counted, backward included."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        formula = flop_registry.get(func._overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # a composite op (linear, SDPA under inference_mode): count what it decomposes into
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def math_flops(run: Callable[[], object]) -> int:
    """FLOPs of `run`, attention through PyTorch's math kernel (matmuls the formulas count; the CPU's fused kernel has
    none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCount() as counter:
        run()
    return counter.total


def family_main(description: str, unets: Callable[[int], None], dits: Callable[[int], None], repeats: int) -> None:
    """The command line of a ComfyUI node benchmark: the UNets, or with --dit the tiny SD3.5 and Flux, one thread."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dit", action="store_true", help="the tiny SD3.5-L-like and Flux-dev-like models instead "
                                                           "of the UNets")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"alternated rounds (default {repeats})")
    options = parser.parse_args()
    torch.set_num_threads(1)  # steady timings on a shared machine
    (dits if options.dit else unets)(options.repeats)
