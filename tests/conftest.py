import os

# The Triton interpreter must be chosen before any @triton.jit function is defined (ANCHORS.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
