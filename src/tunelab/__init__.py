"""tunelab: fine-tune pretrained transformers with any paradigm.

    run = tunelab.train("recipe.yaml", **{"train.lr": 3e-4})
    clf = tunelab.load(run.dir); clf.predict(["great film"])
"""

from __future__ import annotations

import logging
from pathlib import Path

# transformers imports torchao when it is installed (qlora needs it), and torchao then logs, on
# every start, that its optional CUDA kernels are absent; on a CPU machine that is only noise
# in front of tunelab's own messages.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from .errors import TunelabError  # noqa: E402
from .predict import TunedModel, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["train", "load", "TunedModel", "TunelabError", "__version__"]


def train(recipe: str | Path | None = None, overrides: list[str] | None = None, overwrite: bool = False, **kw):
    """Train from a YAML recipe plus dotted overrides (`**{"train.lr": 3e-4}` or ["train.lr=3e-4"])."""
    from . import config, pipeline

    cfg = config.load(recipe, overrides, **kw)
    return pipeline.train(cfg, overwrite=overwrite, recipe_name=Path(recipe).stem if recipe else "run")
