#!/usr/bin/env python
"""MindFormers-style entry point, kept for scripts that call it: the same as the `glm` command.

    python run_glm.py --config configs/glm2/run_glm2_tiny.yaml --run_mode finetune [key=value ...]
    (= glm finetune --config configs/glm2/run_glm2_tiny.yaml [key=value ...])
"""

from glm.cli import run_glm_main

if __name__ == "__main__":
    run_glm_main()
