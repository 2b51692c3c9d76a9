"""Load a finished run directory and predict or evaluate with it."""

from __future__ import annotations

import json
from pathlib import Path

from . import config as config_mod
from . import evaluate, methods, models, tasks
from .data.clean import clean_examples
from .data.sources import read_examples
from .errors import TunelabError


class TunedModel:
    """A trained run, ready for inference: `tunelab.load(run_dir).predict(["great film"])`."""

    def __init__(self, run_dir: str | Path, device: str | None = None):
        self.dir = Path(run_dir)
        if not self.dir.is_dir():
            raise TunelabError(f"Run directory '{run_dir}' does not exist. Pass the output_dir of a completed `tunelab train`.")
        if not (self.dir / "config.yaml").is_file() or not (self.dir / "labels.json").is_file():
            raise TunelabError(
                f"'{run_dir}' is not a finished tunelab run directory (config.yaml and labels.json are missing). "
                f"Pass the output_dir of a completed `tunelab train`."
            )
        self.cfg = config_mod.load(self.dir / "config.yaml")
        if device:
            self.cfg.model.device = device
        self.info = json.loads((self.dir / "labels.json").read_text(encoding="utf-8"))
        self.task = tasks.get(self.cfg.task.type)
        method = methods.get(self.cfg.method.name)
        artifact = self.dir / method.ARTIFACT
        if not artifact.is_dir():
            raise TunelabError(f"The run '{run_dir}' has no {method.ARTIFACT}/ directory: training did not finish. Re-run `tunelab train`.")
        if method.ARTIFACT == "model":
            self.model, _ = self.task.build_model(self.cfg.model, self.info, path=artifact)
        else:
            # Adapters are stored alone: rebuild the base named in the run's config, then attach them.
            try:
                self.model, _ = self.task.build_model(self.cfg.model, self.info)
            except TunelabError as e:
                raise TunelabError(
                    f"The run '{run_dir}' keeps only its {method.ARTIFACT}; its base model could not be loaded: {e} "
                    f"If the base moved, edit model.path in {self.dir / 'config.yaml'}."
                ) from None
            self.model = method.load(self.model, artifact)
        self.tokenizer = models.load_tokenizer(artifact, self.cfg.model.trust_remote_code)
        self.device = models.device_of(self.cfg.model)
        self.model.to(self.device).eval()

    @property
    def labels(self) -> list[str]:
        return list(self.info["labels"])

    def _features(self, rows: list[dict]) -> list[dict]:
        max_length = models.max_input_length(self.model, self.tokenizer, self.cfg.data.max_length,
                                             getattr(self.cfg.method, "num_virtual_tokens", 0))
        return self.task.encode(rows, self.tokenizer, self.info, max_length)

    def predict(self, texts: list[str] | str, batch_size: int | None = None) -> list[dict]:
        """Label, its probability and the probability of every class, for each text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TunelabError(
                f"Text #{bad[0] + 1} to predict is {texts[bad[0]]!r}, not a string ({len(bad)} such in all). "
                f"Give strings only; in a file, fill or remove rows whose text is empty or not text."
            )
        feats = self._features([{"text": " ".join(str(t).split()), "label": None} for t in texts])
        out, _ = evaluate.outputs(self.model, self.task, feats, batch_size or self.cfg.eval.batch_size,
                                  self.tokenizer.pad_token_id, self.device)
        return [{"text": t, **p} for t, p in zip(texts, self.task.predictions(out, self.info))]

    def evaluate(self, path: str | Path, text_field: str | None = None, label_field: str | None = None,
                 batch_size: int | None = None) -> dict:
        """Task metrics on a labelled file (whitespace normalised; empty or unlabelled rows dropped and counted)."""
        text_field = text_field or self.cfg.data.text_field
        label_field = label_field or self.cfg.data.label_field
        rows, dropped = clean_examples(read_examples(path, text_field, label_field, key="eval file"), dedupe=False)
        if not rows:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in dropped.items() if n)
            raise TunelabError(f"Eval file '{path}' has no rows with both a text and a label ({reasons}). "
                               f"Check --text-field and --label-field name the right columns.")
        self.task.check_labels(rows, self.info, f"file '{path}'")
        feats = self._features(rows)
        metrics = evaluate.run(self.model, self.task, feats, self.info, batch_size or self.cfg.eval.batch_size,
                               self.tokenizer.pad_token_id, self.device)
        return {**metrics, "dropped": dropped}


def load(run_dir: str | Path, device: str | None = None) -> TunedModel:
    return TunedModel(run_dir, device)
