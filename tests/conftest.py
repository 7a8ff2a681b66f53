"""Suite-wide settings."""

import os

# One intra-op thread per torch/onnxruntime call: on a 2-core machine where a server thread, the client and the
# model run at once, more threads only fight each other (a tiny Qwen generation took 22.8 s with 2 threads, 1.3 s
# with 1). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
