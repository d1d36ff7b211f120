"""glm-launcher: train, fine-tune, evaluate, predict with and export ChatGLM2/3 on MindSpore."""

__version__ = "0.1.0"


class GLMError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
