"""Hugging Face `datasets` as data sources, beside files.

A data key (data.train / validation / test) may name
- 'hf://org/name': a dataset on the Hugging Face Hub, at data.dataset_config and data.dataset_revision, downloaded
  once into the HF cache by `datasets` itself (HF_HOME / HF_DATASETS_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what
  they mean to every HF tool);
- a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`;
- an in-memory `Dataset` / `DatasetDict` handed to `tunelab.train(..., data=...)` in Python: `hold` keeps it here,
  under a name that says what it is ('<in-memory Dataset, 200 rows, sha256 3f2a...>') and is what config.yaml
  records, since the object itself cannot be written there.
A DatasetDict (every Hub dataset is one) is read at the split its key names: data.train reads data.train_split, and
so on; a key that is not a recipe's data key (a file to predict on) reads a dataset's only split.

`open_split` gives a `Split`: the Arrow-backed dataset (memory-mapped from disk for Hub and save_to_disk sources, so a
split larger than memory is read row by row), how messages name it, and where it came from (the data report records
the Hub commit, or the content hash of an in-memory dataset). A row is named by its index in the split, as
`dataset[17]` shows it. Values come out as files give them: a ClassLabel column as its class names (-1, the datasets
convention for "no label", as None). `datasets` is an optional extra, imported only when a dataset source is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TunelabError

HUB = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_MEMORY = re.compile(r"<in-memory (Dataset|DatasetDict)[^<>]*, sha256 ([0-9a-f]{16})>")
KEYS = ("train", "validation", "test")
BATCH = 1000  # rows converted to Python at a time

# In-memory datasets passed to tunelab.train / resume, by their content hash. Weak: a dataset lives as long as its
# caller holds it (train() does for the whole run), so a notebook that trains many times does not pile them up here.
_HELD: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def is_source(value) -> bool:
    """Whether a data key's value names a dataset rather than a file."""
    return kind(value) is not None


def kind(value) -> str | None:
    """'hub', 'memory' or 'disk' (a save_to_disk folder); None for anything else (a file, or nothing)."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    text = str(value)
    if text.startswith(HUB):
        return "hub"
    if _MEMORY.fullmatch(text):
        return "memory"
    p = Path(text).expanduser()
    if p.is_dir() and any((p / name).is_file() for name in ("dataset_dict.json", "state.json")):
        return "disk"
    return None


def split_for(key: str | None, options) -> str | None:
    """The split a data key reads: data.train -> data.train_split (also inside tasks[i]); None for other keys."""
    name = (key or "").rsplit(".", 1)[-1]
    if not (key or "").startswith(("data.", "tasks[")) or name not in KEYS:
        return None
    return getattr(options, f"{name}_split", name)  # without the data section: the keys' defaults


def describe(value, key: str | None, split: str | None = None) -> str:
    """How messages name a dataset source: "Dataset 'hf://org/name' split 'train' (data.train)"; a single Dataset
    (saved or in memory) has no splits to name."""
    how = kind(value)
    single = how == "memory" and str(value).startswith("<in-memory Dataset,") or \
        how == "disk" and not (Path(value).expanduser() / "dataset_dict.json").is_file()
    where = f" split '{split}'" if split and not single else ""
    return f"Dataset '{value}'{where}" + (f" ({key})" if key else "")


def need_datasets(what: str):
    """The `datasets` module, or the error naming the extra that brings it."""
    try:
        import datasets
    except ImportError:
        raise TunelabError(
            f"{what} is a Hugging Face dataset, and reading one needs the `datasets` package, which tunelab installs "
            f"only as an extra: pip install 'tunelab[datasets]' (or pip install datasets). Alternatively export the "
            f"data to a .jsonl, .csv or .parquet file and point the key at it.") from None
    return datasets


@dataclass
class Split:
    """One split of a dataset source, ready to read."""
    dataset: object  # a datasets.Dataset
    what: str  # how messages name it
    origin: dict = field(default_factory=dict)  # where it came from, for the data report

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return self.dataset.num_rows

    def rows(self, columns: list[str] | None = None):
        """(index, {column: value}) of every row, values as files give them (class names for ClassLabel columns)."""
        ds = self.dataset.with_format(None)  # plain Python values whatever format the caller set (torch, numpy...)
        ds = ds.select_columns(columns) if columns is not None else ds
        convert = converters(ds.features)
        start = 0
        for batch in ds.iter(batch_size=BATCH):
            n = len(next(iter(batch.values()))) if batch else 0
            for column, fn in convert.items():
                batch[column] = [fn(v) for v in batch[column]]
            names = list(batch)
            for i, values in enumerate(zip(*(batch[c] for c in names))):
                yield start + i, dict(zip(names, values))
            start += n

    def column(self, name: str):
        """A reader of one column by row index (as files give values): data.streaming reads rows back with it."""
        ds = self.dataset.with_format(None).select_columns([name])
        fn = converters(ds.features).get(name, lambda v: v)
        return lambda i: fn(ds[int(i)][name])


def converters(features) -> dict:
    """{column: function} for the columns whose stored values are not what a file would hold: ClassLabel ids become
    their names (in lists too, as NER tags are stored)."""
    datasets = sys.modules["datasets"]
    lists = tuple(getattr(datasets, n) for n in ("List", "LargeList", "Sequence") if isinstance(getattr(datasets, n, None), type))

    def of(feature):
        if isinstance(feature, datasets.ClassLabel):
            names = feature.names

            def name(v):
                if isinstance(v, int) and not isinstance(v, bool):
                    return names[v] if 0 <= v < len(names) else None if v < 0 else v
                return v
            return name
        inner = getattr(feature, "feature", None)
        if isinstance(feature, lists) and inner is not None:
            fn = of(inner)
            return (lambda vs: vs if vs is None else [fn(v) for v in vs]) if fn else None
        return None

    return {name: fn for name, feature in features.items() if (fn := of(feature)) is not None}


# -- opening a source ---------------------------------------------------------------------------------------------

def open_split(value, key: str | None = None, options=None) -> Split:
    """The split of dataset source `value` that `key` reads (see split_for), or the error that says why it cannot be
    read. `options`: the data section (dataset_config, dataset_revision, the *_split keys); None for defaults."""
    how = kind(value)
    split = split_for(key, options)
    if how == "hub":
        return _hub(str(value), key, split, options)
    datasets = need_datasets(describe(value, key))
    if how == "memory":
        obj = _held(str(value), key)
    else:
        try:
            obj = datasets.load_from_disk(str(Path(value).expanduser()))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise TunelabError(f"{describe(value, key)} could not be read as a folder written by save_to_disk: "
                               f"{str(e).rstrip('.')}. Save it again with dataset.save_to_disk(folder).") from None
    origin = {"source": str(value), "kind": how}
    if how == "disk":
        origin["path"] = str(Path(value).expanduser().absolute())
    else:
        origin["sha256"] = _MEMORY.fullmatch(str(value)).group(2)
    if isinstance(obj, datasets.DatasetDict):
        split = pick_split(list(obj), split, value, key)
        ds = obj[split]
    else:
        ds, split = obj, None  # a single Dataset has no splits: every key reads all of it
    return Split(ds, describe(value, key, split), {**origin, "split": split, "rows": ds.num_rows})


def pick_split(available: list[str], wanted: str | None, value, key: str | None) -> str:
    if wanted is None and len(available) == 1:
        return available[0]
    if wanted in available:
        return wanted
    names = ", ".join(f"'{s}'" for s in available) or "none"
    if wanted is None:
        raise TunelabError(f"{describe(value, key)} has several splits ({names}) and nothing says which to read. Name "
                           f"it as a recipe data key with its split key (data.train with data.train_split, ...).")
    split_key = f"data.{(key or '').rsplit('.', 1)[-1]}_split"
    raise TunelabError(f"{describe(value, key)} has no split '{wanted}'; its splits: {names}. Set {split_key} to one "
                       f"of them.")


def _hub(value: str, key: str | None, split: str | None, options) -> Split:
    repo = value[len(HUB):].strip("/")
    what = describe(value, key)
    if repo.startswith("datasets/"):
        raise TunelabError(f"{what}: write a Hub dataset as hf://org/name, without 'datasets/' (that is the Hub's "
                           f"URL path): hf://{repo[len('datasets/'):]}.")
    if not _REPO_ID.fullmatch(repo):
        raise TunelabError(f"{what} is not a Hub dataset id. Write hf://org/name (e.g. hf://stanfordnlp/imdb), as the "
                           f"dataset's Hub page names it.")
    datasets = need_datasets(what)
    config = getattr(options, "dataset_config", None)
    revision = getattr(options, "dataset_revision", None)
    try:
        builder = datasets.load_dataset_builder(repo, name=config, revision=revision)
        check_offline_revision(builder, repo, revision, what)
        builder.download_and_prepare()
    except TunelabError:
        raise
    except Exception as e:  # datasets raises ValueError, ConnectionError, FileNotFoundError and its own classes
        raise hub_error(e, repo, config, revision, what) from None
    splits = list(builder.info.splits or {})
    split = pick_split(splits, split, value, key)
    ds = builder.as_dataset(split=split)
    commit = builder.hash if isinstance(builder.hash, str) and _COMMIT.fullmatch(builder.hash) else None
    origin = {"source": value, "kind": "hub", "repo": repo, "config": builder.config.name, "split": split,
              "revision": revision or "main", "commit": commit, "rows": ds.num_rows,
              "datasets": getattr(datasets, "__version__", None)}
    return Split(ds, describe(value, key, split), origin)


def offline() -> bool:
    datasets = sys.modules.get("datasets")
    return bool(getattr(getattr(datasets, "config", None), "HF_HUB_OFFLINE", False))


def check_offline_revision(builder, repo: str, revision: str | None, what: str) -> None:
    """Offline, `datasets` reads the newest cached copy of a dataset whatever revision was asked for; a copy of
    another commit than the one asked for (or than the cached branch points at) is refused, not trained on."""
    if not offline():
        return
    wanted = revision or "main"
    if not _COMMIT.fullmatch(wanted):
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / wanted
        wanted = ref.read_text().strip() if ref.is_file() else None
    if wanted is not None and builder.hash != wanted:
        raise TunelabError(
            f"{what}: offline (HF_HUB_OFFLINE=1), the cache holds commit {builder.hash} of {repo}, not revision "
            f"'{revision or 'main'}'{f' (commit {wanted})' if wanted != revision else ''}. Run once with network access "
            f"(HF_HUB_OFFLINE unset) to download it, or set data.dataset_revision={builder.hash} to use the cached copy.")


def hub_error(e: Exception, repo: str, config: str | None, revision: str | None, what: str) -> TunelabError:
    """One paragraph for each way `datasets` fails to find a Hub dataset."""
    text = " ".join(str(e).split())
    datasets = sys.modules["datasets"]
    not_found = getattr(getattr(datasets, "exceptions", None), "DatasetNotFoundError", ())
    if isinstance(e, not_found) and "gated" in text.lower():
        return TunelabError(
            f"{what} is a gated dataset: accept its terms on https://huggingface.co/datasets/{repo} and log in "
            f"(`hf auth login`, or set HF_TOKEN to a token of an account that has access), then run again.")
    if isinstance(e, not_found) and "revision" in text.lower():
        return TunelabError(f"{what}: the dataset has no revision '{revision}' (data.dataset_revision). Give a branch, "
                            f"a tag or a commit id of {repo}, or remove the key to read 'main'.")
    if isinstance(e, not_found):
        return TunelabError(
            f"{what}: there is no dataset '{repo}' on the Hub, or it is private. Check the id on its Hub page "
            f"(hf://org/name); for a private dataset log in (`hf auth login` or HF_TOKEN).")
    if isinstance(e, ConnectionError) or "offline" in text.lower() or type(e).__name__ == "LocalEntryNotFoundError":
        mode = "offline mode is on (HF_HUB_OFFLINE=1)" if offline() else "the Hub could not be reached"
        cache = getattr(getattr(datasets, "config", None), "HF_DATASETS_CACHE", None) or "~/.cache/huggingface/datasets"
        return TunelabError(
            f"{what}: {mode} and the datasets cache ({cache}; HF_HOME / HF_DATASETS_CACHE) holds no copy of "
            f"{repo}{f' (config {config})' if config else ''}. Download it once on a machine with network access with "
            f"the same HF_HOME (e.g. python -c \"import datasets; datasets.load_dataset('{repo}'"
            f"{f', {config!r}' if config else ''})\"), or point the key at a local copy (save_to_disk folder or file).")
    found = re.search(r"available configs[^\[]*(\[[^\]]*\])|Available: (\[[^\]]*\])|among the available configs: (\[[^\]]*\])",
                      text, re.IGNORECASE)
    if isinstance(e, ValueError) and found:
        names = next(g for g in found.groups() if g)
        if config is None:
            return TunelabError(f"{what} has several configurations: {names}. Choose one with data.dataset_config.")
        return TunelabError(f"{what} has no configuration '{config}' (data.dataset_config); its configurations: "
                            f"{names}. Set data.dataset_config to one of them.")
    return TunelabError(f"{what} could not be read with datasets.load_dataset: {type(e).__name__}: {text[:400]}")


# -- what a run records ------------------------------------------------------------------------------------------

def record(report: dict) -> dict:
    """{data key: {"repo", "config", "split", "revision", "commit"}} of every split a data report says was read from
    the Hub: what versions.json keeps beside the model's commit, so a run says which rows it trained on."""
    out = {}
    for name, entry in (report.get("splits") or {}).items():
        origin = entry.get("dataset") or {}
        if origin.get("kind") == "hub":
            out[f"data.{name}"] = {k: origin.get(k) for k in ("repo", "config", "split", "revision", "commit")}
    return out


def pinned(report: dict) -> str | None:
    """The commit to write as data.dataset_revision in a run's config.yaml, so that --resume reads the same rows
    when the branch has moved on: the one commit every Hub split was read at. None where no split came from the
    Hub, or where two repos were read (one key cannot pin both; record() still names each commit)."""
    found = {(o["repo"], o["commit"]) for o in record(report).values()}
    if len(found) != 1:
        return None
    return next(iter(found))[1]


# -- in-memory datasets (the Python API) --------------------------------------------------------------------------

def content_sha256(obj) -> str:
    """sha256 of what a Dataset (or every split of a DatasetDict) holds: its features and its rows' values in order.
    Equal rows give equal hashes however the dataset was built, selected or concatenated (datasets' own fingerprint of
    an in-memory dataset is random, and Arrow's bytes depend on how the columns are chunked)."""
    h = hashlib.sha256()
    datasets = sys.modules["datasets"]
    parts = sorted(obj.items()) if isinstance(obj, datasets.DatasetDict) else [("", obj)]
    for name, ds in parts:
        h.update(f"split {name}\0{json.dumps(ds.features.to_dict(), sort_keys=True)}\0{ds.num_rows}\0".encode())
        for batch in ds.with_format("arrow").iter(batch_size=65536):
            h.update(json.dumps(batch.to_pydict(), ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def hold(obj) -> str:
    """Keep an in-memory Dataset or DatasetDict for this process and return the name data keys give it."""
    datasets = sys.modules.get("datasets")
    iterable = tuple(getattr(datasets, n) for n in ("IterableDataset", "IterableDatasetDict") if hasattr(datasets, n))
    if datasets is not None and iterable and isinstance(obj, iterable):
        raise TunelabError(
            "data= got an IterableDataset (load_dataset(..., streaming=True)), which can be read only once, in order: "
            "tunelab needs to index rows (for the seeded order, the validation split and resume). Pass a Dataset "
            "(load without streaming=True), or give the Hub id as data.train: hf://org/name with data.streaming=true.")
    if datasets is None or not isinstance(obj, (datasets.Dataset, datasets.DatasetDict)):
        raise TunelabError(f"data= takes a datasets.Dataset, a datasets.DatasetDict, or a dict of them (or of paths) "
                           f"by split ('train', 'validation', 'test'), not {type(obj).__name__}.")
    digest = content_sha256(obj)[:16]
    if isinstance(obj, datasets.DatasetDict):
        size = ", ".join(f"{name} {ds.num_rows} rows" for name, ds in obj.items())
        name = f"<in-memory DatasetDict ({size}), sha256 {digest}>"
    else:  # no ': ' in the name, so it reads back as one string in YAML and in key=value overrides
        name = f"<in-memory Dataset, {obj.num_rows} rows, sha256 {digest}>"
    _HELD[digest] = obj
    return name


def overrides(data) -> dict:
    """The data.* overrides for tunelab.train's data= argument (objects kept by `hold`): a Dataset or a DatasetDict is
    data.train; a dict names the keys, {"train": ds, "validation": ds2}, its values datasets or paths."""
    if data is None:
        return {}
    datasets = sys.modules.get("datasets")
    if not isinstance(data, dict) or datasets is not None and isinstance(data, datasets.DatasetDict):
        return {"data.train": hold(data)}  # a DatasetDict is a dict too, but of splits: *_split pick from it
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise TunelabError(f"data= has the key(s) {', '.join(map(repr, unknown))}; use 'train', 'validation' and "
                           f"'test' (a split of a DatasetDict is chosen with data.train_split etc.).")
    return {f"data.{k}": (v if v is None or isinstance(v, (str, os.PathLike)) and not isinstance(v, bytes) else hold(v))
            for k, v in data.items()}


def dict_splits(given: dict, data_cfg) -> dict:
    """A DatasetDict passed as data= also gives data.validation / data.test when it has the splits data.validation_split
    / data.test_split name and the recipe does not set those keys: the overrides to add."""
    train = given.get("data.train")
    if set(given) != {"data.train"} or not isinstance(train, str) or not train.startswith("<in-memory DatasetDict "):
        return {}
    obj = _HELD.get(_MEMORY.fullmatch(train).group(2))
    return {f"data.{k}": train for k in ("validation", "test")
            if getattr(data_cfg, k) is None and obj is not None and getattr(data_cfg, f"{k}_split") in obj}


def _held(value: str, key: str | None):
    digest = _MEMORY.fullmatch(value).group(2)
    obj = _HELD.get(digest)
    if obj is None:
        held = ", ".join(sorted(_HELD.keys())) or "none"
        raise TunelabError(
            f"{key or 'The data'} names an in-memory dataset ({value}) that was passed to tunelab.train(data=...) in "
            f"Python; it is not saved with the run, and this process holds no dataset with that content (sha256 "
            f"{digest}; held now: {held}). Pass the same dataset, unchanged, again (tunelab.resume(run_dir, "
            f"data=...)), or save it with dataset.save_to_disk(folder) and point {key or 'the key'} at the folder.")
    return obj


def check_resumed(given: dict, data_cfg) -> None:
    """Resuming with data=: each dataset passed must be the one config.yaml names for its key (same content)."""
    for key, value in given.items():
        recorded = getattr(data_cfg, key.split(".", 1)[1], None) if data_cfg is not None else None
        if value == recorded:
            continue
        if not (isinstance(recorded, str) and _MEMORY.fullmatch(recorded)):
            raise TunelabError(f"data= gives {key}, but this run read {key} from {recorded!r}, not from an in-memory "
                               f"dataset: resume it without data= (or with `tunelab train --resume`).")
        raise TunelabError(
            f"The dataset passed as {key} ({value}) is not the one this run trained on ({recorded}): its rows, columns "
            f"or features differ, so the run cannot go on where it stopped. Pass the dataset it trained on, unchanged, "
            f"or start a new run.")
