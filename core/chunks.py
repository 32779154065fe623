"""Batch chunks and their reference rows.

A host runs the model on a batch made of chunks (ComfyUI: one per entry of `cond_or_uncond`,
diffusers: the `[uncond, cond]` halves of a CFG batch); each chunk holds the whole latent batch,
so the reference image of a chunk sits at `chunk_start + reference_index`. Deriving the rows from
the chunk count, never from `batch // 2`, keeps the method right when a host runs cond and uncond
together, apart, or with more than two chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChunkLayout:
    chunks: int
    rows_per_chunk: int
    reference_index: int = 0

    @property
    def batch(self) -> int:
        return self.chunks * self.rows_per_chunk

    @property
    def reference_rows(self) -> list[int]:
        return [c * self.rows_per_chunk + self.reference_index for c in range(self.chunks)]

    @property
    def target_rows(self) -> list[int]:
        refs = set(self.reference_rows)
        return [row for row in range(self.batch) if row not in refs]

    def reference_of_row(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """For every row, the row of its chunk's reference (a reference maps to itself)."""
        starts = torch.arange(self.batch, device=device) // self.rows_per_chunk * self.rows_per_chunk
        return starts + self.reference_index

    def chunk_rows(self, chunk: int) -> slice:
        return slice(chunk * self.rows_per_chunk, (chunk + 1) * self.rows_per_chunk)


def chunk_layout(chunks: int, batch: int, reference_index: int = 0) -> ChunkLayout:
    """Layout of a batch of `batch` rows made of `chunks` equal chunks."""
    if chunks < 1 or batch % chunks:
        raise ValueError(f"a batch of {batch} rows cannot be split into {chunks} equal chunks")
    rows = batch // chunks
    if not 0 <= reference_index < rows:
        raise IndexError(f"reference index {reference_index} is outside a chunk of {rows} images")
    return ChunkLayout(chunks, rows, reference_index)
