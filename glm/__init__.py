"""glm-launcher: train, fine-tune, evaluate, predict with and export ChatGLM2/3 on MindSpore."""

import os

# MindSpore prints hundreds of harmless C++ warnings (dynamic shapes, cluster retries) unless GLOG_v
# is set before it is imported. Every module of this package is imported after this file, so this
# is the one place that needs it. 3 = errors only.
os.environ.setdefault("GLOG_v", "3")

__version__ = "0.1.0"


class GLMError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
