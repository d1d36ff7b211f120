"""What a run mode reads from disk, worked out from the typed config alone (no MindSpore): its dataset, its
tokenizer block and its checkpoint files. The run modes, the dry run and `glm validate` share these."""

from __future__ import annotations

from glm import GLMError
from glm.settings import RunConfig, TokenizerConfig, as_run

RANDOM_INIT = "random"   # load_checkpoint value that asks for random initialisation (smoke tests)
# The data a run mode reads (export reads none; predict and chat only the tokenizer).
DATA_OF_MODE = {"train": "train_dataset", "finetune": "train_dataset", "eval": "eval_dataset"}


def checkpoint_paths(value) -> list[str]:
    """`load_checkpoint` may name several files (base weights, then an adapter) separated by commas."""
    if value in (None, "", False):
        return []
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(p).strip() for p in parts if str(p).strip()]


def tokenizer_section(cfg: RunConfig | dict) -> tuple[TokenizerConfig, str]:
    """The tokenizer block to use outside training and where it is: processor.tokenizer if it names a
    vocab file, else the eval dataset's, else the train dataset's."""
    run = as_run(cfg)
    candidates = [(run.processor.tokenizer, "processor.tokenizer")]
    for name in ("eval_dataset", "train_dataset"):
        data = getattr(run, name)
        if data is not None:
            candidates.append((data.tokenizer, f"{name}.tokenizer"))
    for section, where in candidates:
        if section.vocab_file:
            return section, where
    raise GLMError("no tokenizer: set processor.tokenizer.vocab_file (or train_dataset.tokenizer.vocab_file)")
