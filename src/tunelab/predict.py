"""Load a finished run directory and predict or evaluate with it; a multi-task run's task is rebuilt here too (its
shared body and saved heads: `load_task`)."""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import config as config_mod
from . import evaluate, hub, methods, models, tasks, versions
from .errors import TunelabError
from .evaluate import generative, usercode
from .methods import precision


class TunedModel:
    """A trained run, ready for inference: `tunelab.load(run_dir).predict(["great film"])`."""

    def __init__(self, run_dir: str | Path, device: str | None = None, task: str | None = None, *,
                 trust_remote_code: bool = False, allow_pickle: bool = False):
        self.dir = Path(run_dir)
        self.cfg, self.info = read_run(self.dir)
        own_switches(self.cfg, self.dir, trust_remote_code, allow_pickle)
        versions.check(self.dir, "loading", lambda msg: print(msg, file=sys.stderr, flush=True))
        if self.cfg.tasks is None:
            self._setup(device)
            return
        if task is None:
            raise TunelabError(f"'{run_dir}' is a multi-task run; say which task to use with --task (task=...): "
                               f"{', '.join(self.info['tasks'])}.")
        if device:
            self.cfg.model.device = device
        self.device = models.device_of(self.cfg.model)
        self.model, self.tokenizer, self.task, self.info, self.cfg = load_task(self.dir, self.cfg, self.info["tasks"],
                                                                              task, self.device)
        self._runs = {"default": (self.dir, self.cfg, self.info)}

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str | None = None, *, trust_remote_code: bool = False,
                       allow_pickle: bool = False, revision: str | None = None) -> TunedModel:
        """A plain causal-LM model directory (e.g. a merged export) or Hub id (at `revision`, default main) as a chat
        model: `generate` works on it, with the tokenizer's chat template (or the built-in Alpaca one)."""
        if hub.is_hub_id(str(path)):
            path = hub.download(str(path), revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                key="the model", revision_key="--revision").dir
        self = cls.__new__(cls)
        self.dir = Path(path)
        model = {"path": str(path), "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        self.cfg = config_mod.validate({"model": model, "data": {"train": "-"},
                                        "task": {"type": "sft"}, "method": {"name": "full"}}, f"model dir '{path}'")
        self.info = {"task": "sft", "template": "auto", "train_on_prompt": False, "truncation": "cut"}
        self._setup(device, artifact=self.dir)
        return self

    def base_model(self, device: str | None = None) -> TunedModel:
        """The model this run started from (its model.path: a folder, a Hub id at the run's revision, or an earlier
        run) loaded on its own for the run's task, reading inputs as the run does (its labels info: the chat
        template, the pooling, ...): the base that a full fine-tune's replies or vectors are set beside. Loaded with
        this model's trust_remote_code / allow_pickle. A task with a trained head gets a fresh, untrained one."""
        base = TunedModel.__new__(TunedModel)
        base.dir, base.info = self.dir, dict(self.info)
        base.cfg = self.cfg.model_copy(update={"method": config_mod.FullConfig(name="full")}, deep=True)
        with model_source(self.cfg.model) as source:
            base._setup(device, artifact=Path(source.path))
        return base

    def _setup(self, device: str | None, artifact: Path | None = None) -> None:
        if device:
            self.cfg.model.device = device
        self.task = tasks.get(self.cfg.task.type)
        method = methods.get(self.cfg.method.name)
        artifact = artifact or self.dir / method.ARTIFACT
        if not artifact.is_dir():
            raise TunelabError(f"The run '{self.dir}' has no {method.ARTIFACT}/ directory: training did not finish. Re-run `tunelab train`.")
        if method.ARTIFACT == "model":
            self.model, _ = self.task.build_model(self.cfg.model, self.info, path=artifact)
        else:
            # Adapters are stored alone: rebuild the base named in the run's config, then attach them.
            try:
                with model_source(self.cfg.model) as base, methods.loading(self.cfg.method, torch.device("cpu"),
                                                                           artifact):
                    self.model, _ = self.task.build_model(base, self.info)
            except TunelabError as e:
                raise TunelabError(
                    f"The run '{self.dir}' keeps only its {method.ARTIFACT}; its base model could not be loaded: {e} "
                    f"If the base moved, edit model.path in {self.dir / 'config.yaml'}."
                ) from None
            head = self.task.head_modules(self.model)
            # as training attached it: over a bf16 base the head is upcast first, so its float32 weights load unrounded
            self.model = methods.named.record(self.model, "default", self.cfg.method.name, head, methods.in_own_dtype(
                self.cfg.method.name, head, lambda m: method.load(m, artifact)))
        self._runs = {"default": (self.dir, self.cfg, self.info)}
        self.tokenizer = models.load_tokenizer(artifact, self.cfg.model.trust_remote_code)
        self.device = models.device_of(self.cfg.model)
        self.model.to(self.device).eval()

    def add_adapter(self, name: str, run_dir: str | Path) -> TunedModel:
        """Load another adapter run on the same base beside this one and make it active.

        Switch with `set_adapter(name)`; the base is shared, so each extra adapter costs only its own size.
        """
        cfg, info = read_run(Path(run_dir))
        cfg.model.trust_remote_code, cfg.model.allow_pickle = self.cfg.model.trust_remote_code, self.cfg.model.allow_pickle
        method = methods.get(cfg.method.name)
        artifact = Path(run_dir) / method.ARTIFACT
        if method.ARTIFACT != "adapter" or not artifact.is_dir():
            raise TunelabError(f"'{run_dir}' is a {cfg.method.name} run without an adapter/ directory; only adapter "
                               f"runs ({', '.join(methods.named.SWITCHABLE)}) can share a base. Load it on its own "
                               f"with tunelab.load('{run_dir}').")
        if base_of(cfg.model) != base_of(self.cfg.model):
            raise TunelabError(f"'{run_dir}' was trained on the base {describe_base(cfg.model)}, this model's base is "
                               f"{describe_base(self.cfg.model)}; adapters can only share the base they were trained "
                               f"on.")
        if info != self.info:
            raise TunelabError(f"'{run_dir}' has labels {info.get('labels')}, this model has {self.info.get('labels')}; "
                               f"adapters sharing a base here need the same label set (the same head shape).")
        self.model = methods.add_adapter(self.model, name, artifact, self.task.head_modules(self.model),
                                         cfg.method.name).to(self.device).eval()
        self._runs[name] = (Path(run_dir), cfg, info)
        self.dir, self.cfg, self.info = self._runs[name]
        return self

    def set_adapter(self, name: str) -> TunedModel:
        """Predict with adapter `name` from now on ("default" is the run this model was loaded from)."""
        methods.set_adapter(self.model, name)
        self.dir, self.cfg, self.info = self._runs[name]
        return self

    @property
    def adapters(self) -> list[str]:
        return list(self._runs)

    @property
    def labels(self) -> list[str]:
        return list(self.info.get("labels", []))

    def _max_length(self) -> int:
        return models.max_input_length(self.model, self.tokenizer, self.cfg.data.max_length,
                                       methods.reserved_positions(self.cfg.method))

    def encode(self, rows: list[dict]) -> list[dict]:
        """Rows of the run's task (text and label, ...) as the features it was trained on (cv encodes its test split
        with it)."""
        return self.task.encode(rows, self.tokenizer, self.info, self._max_length())[0]

    def _outputs(self, batch_size: int | None):
        """What tasks are given to run the model: features -> (outputs, targets)."""
        return evaluate.runner(self.model, self.task, batch_size or self.cfg.eval.batch_size,
                               self.tokenizer.pad_token_id, self.device)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 system: str | None = None, stream: bool = False) -> list[str]:
        """Replies of an sft / causal_lm model. Each prompt is a user message (str) or a whole conversation (a list
        of {"role", "content"}); causal_lm models continue the text as it is. Greedy when temperature is 0;
        `stream` prints the reply to the terminal as it is produced."""
        if not self.task.GENERATES:
            raise TunelabError(f"'{self.dir}' is a {self.cfg.task.type} run, which labels text: use predict, not generate.")
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        items = [prompts] if single else list(prompts)
        texts = [self.task.generation_prompt(item, system, self.tokenizer, self.info) for item in items]
        streamer = None
        if stream:
            from transformers import TextStreamer

            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.task.generate(self.model, self.tokenizer, texts, self.info, max_new_tokens, temperature, top_p,
                                  streamer, self.device)

    def predict(self, texts: list[str] | str, batch_size: int | None = None, pairs: list[str] | str | None = None) -> list[dict]:
        """Label, its probability and the probability of every class, for each text (regression: the score, in the
        label's own scale; NER: entity spans). `pairs`: each text's second text, for a run trained on pairs
        (data.text_pair_field). qa runs answer {"question", "context"} items, reward runs score {"prompt",
        "response"} items."""
        return self.task.predict(texts, pairs, self.tokenizer, self.info, self.cfg, self._max_length(),
                                 self._outputs(batch_size), self.dir)

    def embed(self, texts: list[str] | str, batch_size: int | None = None) -> np.ndarray:
        """(texts, dim) float32 vectors of an embedding run, L2-normalised when it was trained with task.normalize."""
        if not self.task.EMBEDS:
            raise TunelabError(f"'{self.dir}' is a {self.cfg.task.type} run; embed and search need an embedding run "
                               f"(task.type embedding).")
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TunelabError(f"Text #{bad[0] + 1} to embed is {texts[bad[0]]!r}, not a string ({len(bad)} such in "
                               f"all). Give strings only; in a file, fill or remove rows whose text is empty.")
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return self.task.embed_texts(texts, self.tokenizer, self.info, self._max_length(),
                                     self._outputs(batch_size)).numpy()

    def search(self, queries: list[str] | str, corpus: list[str], top_k: int = 5,
               batch_size: int | None = None) -> list[list[dict]]:
        """For each query, the `top_k` corpus texts nearest by cosine similarity (exact): rank, score, index, text."""
        queries = [queries] if isinstance(queries, str) else list(queries)
        docs = torch.from_numpy(self.embed(corpus, batch_size))
        if not len(docs):
            raise TunelabError("The search corpus is empty: give at least one text to search.")
        scores, top = self.task.search(torch.from_numpy(self.embed(queries, batch_size)), docs, top_k)
        return [[{"rank": r + 1, "score": float(s), "index": int(i), "text": corpus[int(i)]}
                 for r, (s, i) in enumerate(zip(row_s, row_i))] for row_s, row_i in zip(scores, top)]

    def evaluate(self, path: str | Path, text_field: str | None = None, label_field: str | None = None,
                 batch_size: int | None = None) -> dict:
        """Task metrics on a labelled file (whitespace normalised; empty or unlabelled rows dropped and counted).
        For sft / causal_lm runs: loss and perplexity on a file of the run's row format."""
        feats, counts = self.task.eval_features(path, self.cfg, self.info, text_field, label_field, self.tokenizer,
                                                self._max_length())
        metrics = evaluate.run(self.model, self.task, feats, self.info, batch_size or self.cfg.eval.batch_size,
                               self.tokenizer.pad_token_id, self.device)
        return {**metrics, **counts}


    def evaluate_generation(self, path: str | Path, n: int | None = None, text_field: str | None = None,
                            max_new_tokens: int | None = None, batch_size: int | None = None,
                            judge: str | None = None) -> dict:
        """Replies to the first `n` rows of a file (all by default) of the run's row format (conversations for sft,
        text for causal_lm, preference pairs for dpo), scored against each row's reference reply: exact match, token
        F1, ROUGE-L, BLEU, mean length, share ended with EOS; `replies` holds each row's prompt, reference and reply.
        Greedy, or sampled as the run's eval.do_sample / temperature / top_p / train.seed say. `judge`: what also
        scores each reply, as eval.judge takes it (a reward-model run, or a function 'module:function' /
        'file.py:function', which runs your code): each reply's score as its "judge" and their mean as judge_mean."""
        if not self.task.GENERATES:
            raise TunelabError(f"'{self.dir}' is a {self.cfg.task.type} run, which writes no replies: use `tunelab "
                               f"eval RUN FILE` without --generate (TunedModel.evaluate).")
        scorer = usercode.judge(judge, "--judge", reward_scorer) if judge else None  # a wrong name costs no replies
        rows = self.task.read_generation(path, self.cfg, text_field)
        prompts = self.task.generation_rows(rows[:n] if n else rows, self.tokenizer, self.info)
        eval_cfg = self.cfg.eval.model_copy(update={"max_new_tokens": max_new_tokens or self.cfg.eval.max_new_tokens})
        replies = generative.generate(self.task, self.model, self.tokenizer, prompts, self.info, eval_cfg,
                                      self.cfg.train.seed, self.device, batch_size or self.cfg.eval.batch_size)
        out = {**generative.score(prompts, replies), "replies": [{**p, **r} for p, r in zip(prompts, replies)]}
        if scorer is not None:
            scores = scorer(prompts, [r["reply"] for r in replies], f"the run's replies to the prompts of '{path}'")
            for r, s in zip(out["replies"], scores):
                r["judge"] = s
            out["judge_mean"] = sum(scores) / len(scores)
        return out


def base_of(model_cfg) -> tuple:
    """What identifies a base model: a Hub id with its commit, or a local folder."""
    if hub.is_hub_id(model_cfg.path):
        return ("hub", model_cfg.path, model_cfg.revision)
    return ("dir", Path(model_cfg.path).expanduser().resolve())


def describe_base(model_cfg) -> str:
    at = f" at revision {model_cfg.revision}" if model_cfg.revision and hub.is_hub_id(model_cfg.path) else ""
    return f"'{model_cfg.path}'{at}"


@contextmanager
def model_source(model_cfg, key: str = "model.path"):
    """`model_cfg` with a Hugging Face model directory as its path. A Hub id stands for the snapshot folder of the
    commit that model.revision (default main) resolves to, fetched into the Hugging Face cache if it is not there
    (hub.py): the model_cfg given out has that commit as its revision, for the run to record. A tunelab run directory
    stands for the model it trained: a full fine-tune's own model/, or for a method that keeps its weights apart (an
    sft LoRA run, say) the base with the method merged in, written to a temporary directory that lives as long as the
    `with` block. This is how a later stage starts from an earlier one (sft -> reward model / DPO) without an export
    step.

    The run is loaded with `trust_remote_code` / `allow_pickle` as `model_cfg` (the caller's recipe) says: the
    model.* switches in the run's own config.yaml are ignored, so a run folder from someone else cannot turn on code
    or pickles."""
    path = Path(model_cfg.path).expanduser()
    if hub.is_hub_id(model_cfg.path):
        got = hub.download(model_cfg.path, model_cfg.revision, allow_pickle=model_cfg.allow_pickle,
                           trust_remote_code=model_cfg.trust_remote_code, key=key)
        yield model_cfg.model_copy(update={"path": str(got.dir), "revision": got.commit})
        return
    if not models.is_run_dir(path):
        yield model_cfg
        return
    if (path / "model" / "config.json").is_file():
        yield model_cfg.model_copy(update={"path": str(path / "model")})
        return
    with tempfile.TemporaryDirectory(prefix="tunelab-merged-") as tmp:
        try:
            save_merged(load(path, device="cpu", trust_remote_code=model_cfg.trust_remote_code,
                             allow_pickle=model_cfg.allow_pickle), Path(tmp))
        except TunelabError as e:
            raise TunelabError(f"{key}='{model_cfg.path}' is a tunelab run directory, and its model could not be "
                               f"rebuilt with the method merged in: {e}") from None
        yield model_cfg.model_copy(update={"path": tmp})


def save_merged(run: TunedModel, out: Path) -> Path:
    """Fold the run's method into the base weights and save a plain model dir (config, safetensors, tokenizer)."""
    model = methods.get(run.cfg.method.name).merge(run.model)
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    return out


def reward_scorer(run_dir: str, key: str, fix: str = ""):
    """A tunelab reward-model run as a function (prompts, replies) -> one score each; `key` names the setting that
    gave it (task.reward_model, eval.judge) and `fix` ends the message when it is another kind of run."""
    scorer = load(run_dir)
    if not scorer.task.SCORES_REPLIES:
        raise TunelabError(f"{key}: '{run_dir}' is a {scorer.cfg.task.type} run, not a reward model (task.type "
                           f"reward){fix}.")
    return lambda prompts, replies: [s["score"] for s in scorer.predict(
        [{"prompt": p, "response": r} for p, r in zip(prompts, replies)])]


def read_run(run_dir: Path) -> tuple:
    """(config, labels info) of a finished run directory, or a clear error."""
    if not run_dir.is_dir():
        raise TunelabError(f"Run directory '{run_dir}' does not exist. Pass the output_dir of a completed `tunelab train`.")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "labels.json").is_file():
        raise TunelabError(
            f"'{run_dir}' is not a finished tunelab run directory (config.yaml and labels.json are missing). "
            f"Pass the output_dir of a completed `tunelab train`."
        )
    return config_mod.load(run_dir / "config.yaml"), json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))


def own_switches(cfg, run_dir: Path, trust_remote_code: bool, allow_pickle: bool, resuming: bool = False) -> None:
    """Put the caller's trust_remote_code / allow_pickle in place of the run's own: a run folder, perhaps someone
    else's, never turns on code or pickles by itself. A run trained with custom code says which flag loads it; one
    that is `resuming` (`tunelab train --resume`) says so for pickled base weights too, before its data are read or
    its checkpoints touched (a finished run being loaded meets models.refuse_pickle before anything else anyway)."""
    check_code = cfg.model.trust_remote_code and not trust_remote_code
    check_pickle = resuming and cfg.model.allow_pickle and not allow_pickle
    cfg.model.trust_remote_code, cfg.model.allow_pickle = trust_remote_code, allow_pickle
    if not (check_code or check_pickle):
        return
    base = Path(cfg.model.path).expanduser()
    if hub.is_hub_id(cfg.model.path):  # its code, if the cache has it (nothing is downloaded to find out)
        base = hub.cached(cfg.model.path, cfg.model.revision) or base
    base = base / "model" if models.is_run_dir(base) else base
    folders = [run_dir / "model", run_dir / "adapter", *sorted(run_dir.glob("tasks/*/model")), base]
    code = sorted({c for folder in folders for c in models.custom_code(folder)}) if check_code else []
    if code:
        how = ("--trust-remote-code to `tunelab train --resume` (trust_remote_code=True for tunelab.resume); its "
               "checkpoints were trained with that code, so there is no resuming without it" if resuming else
               "--trust-remote-code (trust_remote_code=True for tunelab.load; for a run used as model.path, "
               f"model.trust_remote_code: true in your recipe), or set model.trust_remote_code: false in "
               f"'{run_dir / 'config.yaml'}' to load it without that code")
        raise TunelabError(
            f"The run '{run_dir}' was trained with model.trust_remote_code=true (its config.yaml), and its model "
            f"names Python code to run ({', '.join(code[:3])}). A run folder never turns that on by itself: if you "
            f"trust this run and its code, pass {how}.")
    if check_pickle and base.is_dir():
        try:
            models.refuse_pickle(base, False)  # what loading would refuse, said here before anything is read
        except TunelabError:
            pickles = sorted(p.name for p in base.iterdir() if p.suffix in hub.PICKLE_SUFFIXES)
            raise TunelabError(
                f"The run '{run_dir}' was trained with model.allow_pickle=true (its config.yaml), and its base model "
                f"'{base}' has its weights only as pickle files ({', '.join(pickles[:3])}), which can run code when "
                f"loaded. A run folder never turns that on by itself: if you trust this run and those files, pass "
                f"--allow-pickle to `tunelab train --resume` (allow_pickle=True for tunelab.resume).") from None


def load(run_dir: str | Path, device: str | None = None, task: str | None = None, *, trust_remote_code: bool = False,
         allow_pickle: bool = False) -> TunedModel:
    """A finished run, ready for predict / evaluate / generate; `task` picks one task of a multi-task run.

    The run's model.trust_remote_code and model.allow_pickle (its config.yaml) are ignored: a run folder, perhaps
    someone else's, cannot run code or load pickles unless you pass `trust_remote_code=True` / `allow_pickle=True`
    here (`--trust-remote-code` / `--allow-pickle` on the command line)."""
    return TunedModel(run_dir, device, task, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


# -- multi-task runs: one body shared by every task's model, each task's head saved apart ----------------------------

def share_body(owner: nn.Module, model: nn.Module, owner_head: list[str], head: list[str]) -> None:
    """Point `model`'s body children at `owner`'s (weights shared by reference); its head stays its own."""
    prefix, owner_body = models.body_of(owner)
    other_prefix, body = models.body_of(model)
    if type(body) is not type(owner_body):
        raise TunelabError(f"Tasks of one multi-task run must share a body of one architecture, but "
                           f"{type(owner).__name__} has a {type(owner_body).__name__} and {type(model).__name__} a "
                           f"{type(body).__name__}. Use one model.path for all tasks (it is shared).")
    for name, child in owner_body.named_children():
        if f"{prefix}.{name}" in owner_head or f"{other_prefix}.{name}" in head:
            continue  # e.g. BERT's pooler belongs to the classification head
        if getattr(body, name, None) is not None:
            setattr(body, name, child)


def head_file(run_dir: Path, name: str) -> Path:
    """Where a multi-task run with an adapter method keeps task `name`'s head."""
    return run_dir / "heads" / f"{name}.safetensors"


def save_head(model: nn.Module, head: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{h}.{k}": t.detach().cpu().contiguous().clone()
               for h in head for k, t in model.get_submodule(h).state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_head(model: nn.Module, head: list[str], path: Path) -> None:
    saved = load_file(str(path))
    expected = {f"{h}.{k}" for h in head for k in model.get_submodule(h).state_dict()}
    if set(saved) != expected:
        raise TunelabError(f"'{path}' does not hold this task's head ({len(saved)} tensors, expected {len(expected)}: "
                           f"{sorted(expected)[:3]}...). Was the run's config.yaml edited? Re-run `tunelab train`.")
    for h in head:
        module = model.get_submodule(h)
        module.load_state_dict({k[len(h) + 1:]: v for k, v in saved.items() if k.startswith(h + ".")})


def load_task(run_dir: Path, cfg, infos: dict, name: str, device):
    """(model, tokenizer, task module, info, single-task config) of task `name` of a multi-task run.

    Adapters are put back as they were trained: onto the first task's model, whose body the task's model then
    shares (an adapter's layer names need not mean the same layers in another task's model: BERT's pooler)."""
    if name not in infos:
        raise TunelabError(f"The run '{run_dir}' has no task {name!r}; its tasks are: {', '.join(infos)}. "
                           f"Pass one with --task.")
    sub = config_mod.single(cfg, name)
    task, info = tasks.get(sub.task.type), infos[name]
    method = methods.get(cfg.method.name)
    if method.ARTIFACT == "model":
        model, tok = task.build_model(cfg.model, info, path=run_dir / "tasks" / name / "model")
        return model.to(device).eval(), tok, task, info, sub
    first = cfg.tasks[0].name
    first_task = tasks.get(cfg.tasks[0].task.type)
    adapter = run_dir / "adapters" / name if cfg.multitask.adapters == "per_task" else run_dir / "adapter"
    with model_source(cfg.model) as model_cfg, methods.loading(cfg.method, device, adapter):
        owner, tok = first_task.build_model(model_cfg, infos[first])
        other = task.build_model(model_cfg, info) if name != first else None
    owner = methods.named.record(owner, "default", cfg.method.name, [], lambda m: method.load(m, adapter))
    model = owner
    if other is not None:
        model, tok = other
        share_body(owner, model, first_task.head_modules(owner), task.head_modules(model))
    if method.TRAINABLE_DTYPE == "float32":  # each task's head trained float32 over a bf16 base: load it unrounded
        precision.float32_head(model, task.head_modules(model))
    load_head(model, task.head_modules(model), head_file(run_dir, name))
    return model.to(device).eval(), tok, task, info, sub
