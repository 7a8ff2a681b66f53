"""Images as a client sends them, made in the tests (no image files in the repository)."""

from __future__ import annotations

import io

import av
import numpy as np


def png_image(height: int, width: int) -> bytes:
    """A seeded random RGB picture encoded as PNG."""
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")), *stream.encode()]:
            container.mux(packet)
    return buffer.getvalue()
