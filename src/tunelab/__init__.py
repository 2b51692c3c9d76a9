"""tunelab: fine-tune pretrained transformers with any paradigm.

    run = tunelab.train("recipe.yaml", **{"train.lr": 3e-4})
    clf = tunelab.load(run.dir); clf.predict(["great film"])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

# PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages when this is set. It reads
# the variable once, at its first allocation, so it is set here, before anything of tunelab imports torch; a
# value the user set wins (0 turns it off). On the bench's 58M LoRA run it cut page faults from 1.5M to 0.34M,
# peak RSS by 14 % and the step time by 7 %: each step's large activation buffers are freed and faulted in again.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# transformers imports torchao when it is installed (qlora needs it), and torchao then logs, on
# every start, that its optional CUDA kernels are absent; on a CPU machine that is only noise
# in front of tunelab's own messages.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from typing import TYPE_CHECKING  # noqa: E402

from .errors import TunelabError  # noqa: E402

if TYPE_CHECKING:
    from .predict import TunedModel, load

__version__ = "0.1.0"
__all__ = ["train", "resume", "load", "TunedModel", "TunelabError", "__version__"]


def train(recipe: str | Path | None = None, overrides: list[str] | None = None, overwrite: bool = False,
          data=None, **kw):
    """Train from a YAML recipe plus dotted overrides (`**{"train.lr": 3e-4}` or ["train.lr=3e-4"]).

    `data`: Hugging Face `datasets` objects to train on instead of the recipe's files: a Dataset (data.train), a
    DatasetDict (data.train, and data.validation / data.test where it has the splits data.validation_split /
    data.test_split name), or a dict {"train": ds, "validation": ds2, "test": ...} of datasets or paths. config.yaml
    records each as '<in-memory Dataset, N rows, sha256 ...>'; resuming such a run needs the same data again
    (`tunelab.resume(run_dir, data=...)`)."""
    from . import config, pipeline
    from .data import hub

    given = hub.overrides(data)  # `data` keeps the objects alive for the run: hub holds them weakly
    cfg = config.load(recipe, overrides, **{**kw, **given})
    extra = hub.dict_splits(given, cfg.data) if cfg.data is not None else {}
    if extra:
        cfg = config.load(recipe, overrides, **{**kw, **given, **extra})
    return pipeline.train(cfg, overwrite=overwrite, recipe_name=Path(recipe).stem if recipe else "run")


def resume(run_dir: str | Path, anyway: bool = False, data=None, *, trust_remote_code: bool = False,
           allow_pickle: bool = False):
    """Continue an unfinished run from its last good checkpoint, exactly where it stopped. A run whose config.yaml,
    data files or model changed since that checkpoint is refused, naming what changed, unless `anyway`. `data`: the
    datasets a run trained on in memory (as given to `train`), which config.yaml names but cannot hold.

    The run's model.trust_remote_code and model.allow_pickle (its config.yaml) are ignored, as tunelab.load ignores
    them: a run folder, perhaps someone else's, runs no code and loads no pickles unless you pass
    `trust_remote_code=True` / `allow_pickle=True` here (`--trust-remote-code` / `--allow-pickle` with --resume). A
    run whose model needs either is refused, naming it, before anything is loaded or written."""
    from . import config, pipeline, predict, runs
    from .data import hub

    given = hub.overrides(data)
    runs.check_resumable(Path(run_dir), anyway)
    cfg = config.load(Path(run_dir) / "config.yaml", [])
    # Only the copy in memory takes the caller's switches: config.yaml, which the checkpoints' fingerprints are
    # compared with, stays as the run wrote it.
    predict.own_switches(cfg, Path(run_dir), trust_remote_code, allow_pickle, resuming=True)
    hub.check_resumed(given, cfg.data)
    return pipeline.train(cfg, resume=Path(run_dir))


def __getattr__(name: str):
    """`tunelab.load` and `tunelab.TunedModel`, imported on first use: they bring torch and transformers (seconds),
    which `import tunelab` (and so `tunelab --help`, whose module imports this package first) does not wait for."""
    if name in ("load", "TunedModel"):
        from . import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
