"""Models by Hugging Face Hub id: `model.path: HuggingFaceTB/SmolLM2-135M-Instruct` is downloaded once into the
Hugging Face cache and loaded from there, as transformers would.

- A Hub id is `org/name` or `name` that is not an existing local path: a local directory of that name wins.
- huggingface_hub does the downloading and reads the user's settings itself: HF_HOME / HF_HUB_CACHE (where the
  cache is), HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (no network: the cache only), HF_TOKEN or `hf auth login`
  (private and gated models). tunelab passes none of them, so they mean what they mean in every HF tool.
- Only what loading a model needs is fetched (MODEL_FILES): its config, safetensors weights, tokenizer files,
  generation config and chat template; not a README, other formats (ONNX, GGUF, original checkpoints in
  sub-folders) or pickled weights. Pickles (`pytorch_model*.bin`) only with model.allow_pickle, and only when
  the repo has no safetensors weights; the modelling code a repo ships (`*.py`) only with trust_remote_code.
- The result is the snapshot folder of one commit, and that commit: a run records it as model.revision, so its
  resume and `tunelab.load` use the same weights when the branch has moved on, offline too.
- Every failure (no such model, gated, no such revision, offline with nothing cached, no safetensors weights) is
  one paragraph naming the fix.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, scan_cache_dir, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import (
    are_progress_bars_disabled,
    disable_progress_bars,
    enable_progress_bars,
    validate_repo_id,
)

from .errors import TunelabError

# What transformers reads from a model folder to load a model and its tokenizer. Top-level files only (IGNORE):
# sub-folders hold other formats and original checkpoints (onnx/, openvino/, original/) that would double a download.
MODEL_FILES = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model",  # WordPiece / BPE vocabularies, SentencePiece models (tokenizer.model, ...)
    "chat_template.jinja", "chat_template.json",
]
# transformers' own weight names, whole or sharded; `consolidated.safetensors` (Mistral's other format) is left out.
SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
CODE = ["*.py"]
IGNORE = ["*/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
COMMIT = re.compile(r"[0-9a-f]{40}")
# A connection lost in the middle of a file surfaces as the HTTP library's own error (requests or httpx, by
# huggingface_hub's version), not as one of huggingface_hub's.
HTTP_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


@dataclass(frozen=True)
class Snapshot:
    dir: Path  # the cache's snapshot folder of `commit`
    commit: str  # 40 hex digits


def is_hub_id(path: str) -> bool:
    """`path` names a Hub repo rather than a local folder: `org/name` or `name`, and nothing of that name here."""
    if Path(path).expanduser().exists():
        return False
    try:
        validate_repo_id(path)
    except hf_errors.HFValidationError:
        return False
    return True


def is_commit(revision: str | None) -> bool:
    return bool(revision) and COMMIT.fullmatch(revision) is not None


def download(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
             trust_remote_code: bool = False, key: str = "model.path", revision_key: str = "model.revision") -> Snapshot:
    """The files a model needs of `repo_id` at `revision` (a branch, tag or commit; default main), fetched into the
    Hugging Face cache where they are not there yet, with a progress bar. `key`, `revision_key`: what messages call
    the id and the revision (config keys, or a command's arguments)."""
    patterns = MODEL_FILES + SAFETENSORS + (CODE if trust_remote_code else [])
    with progress_bars():
        folder = fetch(repo_id, revision, patterns, key, revision_key)
        commit = folder.name
        missing = missing_shards(folder)
        if missing:  # an index naming shards outside transformers' naming scheme (model-*.safetensors)
            folder = fetch(repo_id, commit, missing, key, revision_key)
        if not has_weights(folder, ".safetensors"):
            if not allow_pickle:
                raise no_safetensors(repo_id, commit, key)
            folder = fetch(repo_id, commit, PICKLES, key, revision_key)
            if not has_weights(folder, ".bin"):
                raise TunelabError(f"The Hugging Face model '{repo_id}' ({key}, commit {commit[:12]}) has no weights "
                                   f"that transformers loads (model.safetensors, model-*.safetensors, "
                                   f"pytorch_model.bin): it is not a transformers model repo (a GGUF, ONNX or "
                                   f"adapter-only repo?). Point {key} at a repo that has them.")
    return Snapshot(folder, commit)


def fetch(repo_id: str, revision: str | None, patterns: list[str], key: str, revision_key: str) -> Path:
    """snapshot_download of the files matching `patterns`, its errors told as tunelab's."""
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=IGNORE))
    except hf_errors.GatedRepoError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        who = ("the access token in use (HF_TOKEN, or the one `hf auth login` saved) has not been granted access "
               "to it" if status == 403 else "no access token was sent")
        raise TunelabError(
            f"'{repo_id}' ({key}) is a gated model on the Hugging Face Hub and {who}. Accept its terms on its page "
            f"({constants.ENDPOINT}/{repo_id}) with your account, then log in with `hf auth login` (or set HF_TOKEN "
            f"to a read token of that account) and run again.") from None
    except hf_errors.RepositoryNotFoundError:
        raise TunelabError(
            f"'{repo_id}' ({key}) is neither a local directory (there is no '{Path(repo_id).expanduser().absolute()}') "
            f"nor a model on the Hugging Face Hub ({constants.ENDPOINT}). Check the spelling (Hub ids are "
            f"'org/name', e.g. HuggingFaceTB/SmolLM2-135M-Instruct) or the local path; for a private model, log in "
            f"with `hf auth login` or set HF_TOKEN.") from None
    except hf_errors.RevisionNotFoundError:
        raise TunelabError(
            f"Revision '{revision}' ({revision_key}) does not exist in the Hugging Face model '{repo_id}'. Give one "
            f"of its branches, tags or commits (the Files and versions tab of {constants.ENDPOINT}/{repo_id}), or "
            f"leave {revision_key} out for main.") from None
    except hf_errors.LocalEntryNotFoundError as e:
        raise not_reachable(repo_id, revision, e, key) from None
    except hf_errors.HfHubHTTPError as e:
        raise TunelabError(
            f"The Hugging Face Hub ({constants.ENDPOINT}) refused {where} ({key}): "
            f"{first_line(e)}. Try again later, or check HF_ENDPOINT and your access token.") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] in HTTP_LIBRARIES:
            raise not_reachable(repo_id, revision, e, key) from None
        if not isinstance(e, OSError):
            raise
        # the cache cannot be written: a full disk, no permission
        raise TunelabError(
            f"{where} ({key}) could not be written into the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"({type(e).__name__}: {first_line(e)}). Free space there, or set HF_HUB_CACHE (or HF_HOME) to a "
            f"folder with room.") from None


def not_reachable(repo_id: str, revision: str | None, error: Exception, key: str) -> TunelabError:
    """The cache does not hold what is needed and the Hub cannot be asked: offline by choice, or no network."""
    fetch_cmd = f"`tunelab models fetch {repo_id}{f' --revision {revision}' if revision else ''}`"
    incomplete = type(error).__name__ == "IncompleteSnapshotError"  # huggingface_hub >= 1.x names this case
    held = ("holds only part of the files tunelab needs of it (an earlier download fetched fewer, or was cut off)"
            if incomplete else "does not hold it")
    if constants.HF_HUB_OFFLINE:
        return TunelabError(
            f"'{repo_id}' ({key}) is a Hugging Face Hub id, HF_HUB_OFFLINE=1 is set (no network), and the Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}) {held}. Fetch it once with network: {fetch_cmd} (with HF_HUB_OFFLINE "
            f"unset, here or on a machine that shares this HF_HOME / HF_HUB_CACHE), then train offline.")
    cause = error.__cause__ or error.__context__ or error
    return TunelabError(
        f"'{repo_id}' ({key}) is a Hugging Face Hub id, the Hub ({constants.ENDPOINT}) cannot be reached "
        f"({type(cause).__name__}), and the Hugging Face cache ({constants.HF_HUB_CACHE}) {held}. Check the network, "
        f"proxy and HF_ENDPOINT, or fetch it where there is network: {fetch_cmd}, into the same HF_HOME / "
        f"HF_HUB_CACHE; then HF_HUB_OFFLINE=1 trains from the cache without asking the Hub.")


def no_safetensors(repo_id: str, commit: str, key: str) -> TunelabError:
    pickles = [f for f in repo_files(repo_id, commit) if "/" not in f and f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        has = f"has its weights only as pickle files ({', '.join(pickles[:3])}), which can run arbitrary code when loaded"
    else:
        has = "has no safetensors weights (model.safetensors or model-*.safetensors)"
    return TunelabError(
        f"The Hugging Face model '{repo_id}' ({key}, commit {commit[:12]}) {has}, and tunelab loads only "
        f"safetensors unless told otherwise. Pick a revision or a copy of the model that has model.safetensors (the "
        f"Hub's 'Convert to safetensors' pull requests are revisions: model.revision=refs/pr/N), or, for files you "
        f"trust, pass --allow-pickle (model.allow_pickle=true in a recipe).")


def repo_files(repo_id: str, commit: str) -> list[str]:
    """The files of `repo_id` at `commit`, as far as they can be known (none when the Hub cannot be asked)."""
    try:
        return HfApi().list_repo_files(repo_id, revision=commit)
    except Exception:  # noqa: BLE001 - offline or refused: the message then names both cases
        return []


def has_weights(folder: Path, suffix: str) -> bool:
    """Weight files in the snapshot: what was fetched of them (by name, or named by the index) is all there."""
    return folder.is_dir() and any(p.suffix == suffix for p in folder.iterdir())


def missing_shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []  # no index, or a damaged one: loading names the problem
    return sorted(n for n in names if isinstance(n, str) and not (folder / n).is_file())


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@contextmanager
def progress_bars():
    """huggingface_hub's progress bars for a download, although tunelab's model loading turns them off (through
    transformers' disable_progress_bar, to keep its own output readable); HF_HUB_DISABLE_PROGRESS_BARS=1 wins."""
    turned_off = are_progress_bars_disabled() and constants.HF_HUB_DISABLE_PROGRESS_BARS is not True
    if turned_off:
        enable_progress_bars()
    try:
        yield
    finally:
        if turned_off:
            disable_progress_bars()


def cached(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` if the cache has one, without asking the Hub."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                      ignore_patterns=IGNORE, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or a cache huggingface_hub cannot read: nothing to show
        return None


def pinned(model_cfg):
    """`model_cfg` with model.revision set to the commit its Hub id resolves to now (downloading it), so that every
    run made from it (compare's methods, each in its own process) trains the same weights. Others as they are."""
    if not is_hub_id(model_cfg.path) or is_commit(model_cfg.revision):
        return model_cfg
    got = download(model_cfg.path, model_cfg.revision, allow_pickle=model_cfg.allow_pickle,
                   trust_remote_code=model_cfg.trust_remote_code)
    return model_cfg.model_copy(update={"revision": got.commit})


def cached_models() -> list[dict]:
    """The models in the Hugging Face cache, by id: their size in bytes and each cached revision (commit, the refs
    that point at it, size, file count, folder), the most recently used first."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except hf_errors.CacheNotFound:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = [{"commit": r.commit_hash, "refs": sorted(r.refs), "size": r.size_on_disk,
                      "files": r.nb_files, "dir": str(r.snapshot_path)}
                     for r in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)]
        out.append({"id": repo.repo_id, "size": repo.size_on_disk, "revisions": revisions})
    return sorted(out, key=lambda r: r["id"])
