"""`python -m glm` is the `glm` command. The launcher also runs this file by path for every rank
(`python .../glm/__main__.py finetune ...`), which works whether or not the package is installed."""

import os
import sys

if not __package__:   # run by path: make the package importable instead of its own folder's modules
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from glm.cli import main  # noqa: E402

main()
