"""Report writers: atomic files (JSON, text, npz) and video figures (PNG grids, comparison GIFs)."""

from __future__ import annotations

from vidleak_jax.io import (
    load_npz,
    save_npz,
    to_jsonable,
    write_bytes,
    write_json,
    write_text,
)
from vidleak_jax.report.frames import (
    comparison_frames,
    comparison_gif,
    encode_gif,
    encode_png,
    frame_grid,
    save_png,
    to_rgb,
    to_uint8,
    upscale,
)

__all__ = [
    "comparison_frames",
    "comparison_gif",
    "encode_gif",
    "encode_png",
    "frame_grid",
    "load_npz",
    "save_npz",
    "save_png",
    "to_jsonable",
    "to_rgb",
    "to_uint8",
    "upscale",
    "write_bytes",
    "write_json",
    "write_text",
]
