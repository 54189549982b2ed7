"""M-RoPE positions of a prompt, computed with numpy on a preparation thread.

The same values as transformers' `Qwen3VLModel.get_rope_index` for one unpadded prompt: text
tokens count up on all three axes; a picture's tokens take (frame, row, column) of its merged
patch grid, each offset by the position where the picture starts; the text after a picture goes
on from that start plus the grid's longer side. transformers builds this with a Python loop over
token-type groups and small tensors per picture (~2 ms of Python per picture prompt, under the GIL
that the worker and the event loop want); here it is a few array operations.
"""

from __future__ import annotations

import numpy as np

from .prefix import picture_starts


def mrope_positions(
    input_ids: list[int], image_token_id: int, grids: list[tuple[int, int, int]], merge: int
) -> tuple[np.ndarray, int]:
    """((3, tokens) positions, the position of the first generated token). *grids*: each picture's
    (frames, rows, columns) of patches before merging, in order; *merge*: the spatial merge size."""
    n = len(input_ids)
    out = np.empty((3, n), dtype=np.int64)
    starts = picture_starts(input_ids, image_token_id)
    if len(starts) != len(grids):
        raise ValueError(f"expected {len(grids)} pictures in the prompt, found {len(starts)}")
    position, cursor = 0, 0
    for start, (frames, rows, columns) in zip(starts, grids, strict=True):
        rows, columns = rows // merge, columns // merge
        out[:, cursor:start] = np.arange(position, position + start - cursor)
        position += start - cursor
        count = frames * rows * columns
        end = start + count
        if end > n or input_ids[end - 1] != image_token_id or (end < n and input_ids[end] == image_token_id):
            raise ValueError(f"a picture of {count} tokens does not match its run of tokens at {start}")
        block = slice(start, end)
        out[0, block] = np.repeat(np.arange(frames), rows * columns) + position
        out[1, block] = np.tile(np.repeat(np.arange(rows), columns), frames) + position
        out[2, block] = np.tile(np.arange(columns), frames * rows) + position
        position += max(rows, columns)
        cursor = end
    out[:, cursor:] = np.arange(position, position + n - cursor)
    return out, int(out.max()) + 1 if n else 0
