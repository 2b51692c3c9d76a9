"""A loopback Hugging Face Hub for tests: the real `huggingface_hub` client (snapshot_download, hf_hub_download,
HfApi, HfFileSystem) downloads from it, so no test needs the internet and none stubs the download code.

    server = HubServer()                            # or the `hub` fixture (tests/conftest.py), which also points
    sha = server.commit("org/tiny", model_dir)      # huggingface_hub at it: see point_client_at
    server.commit("org/tiny", other_dir)            # main moves to a new commit; `sha` still resolves
    server.tag("org/tiny", "v1", sha)
    server.commit("org/data", parquet_dir, repo_type="dataset", branch="main")
    server.gate("org/tiny", token="hf_granted")     # files need that token: 401 without one, 403 with another
    server.requests                                 # [(method, path), ...] served, to check what was fetched

A commit snapshots the files of a folder (read at commit time, so later edits of the folder change nothing) and
gets a fixed 40-hex id; a revision is a branch, a tag or a commit id. Files are "LFS" files (ETag = sha256,
X-Linked-Etag / X-Linked-Size, as the Hub serves weights) when their suffix is one the Hub's default
.gitattributes puts in LFS; the others are plain git blobs (ETag = the git blob sha1).

Endpoints ({type}: models or datasets; {rev}: URL-quoted, as the client sends it; repo ids are `name` or `org/name`):

    GET      /api/{type}/{repo_id}                      repo info at main: id, sha, siblings, gated, private, ...
    GET      /api/{type}/{repo_id}/revision/{rev}       repo info at a revision (snapshot_download's first call)
    GET      /api/{type}/{repo_id}/tree/{rev}[/{path}]  file and folder entries (?recursive=true: the whole tree)
    POST     /api/{type}/{repo_id}/paths-info/{rev}     entries of the form field `paths` (HfFileSystem)
    GET      /api/{type}/{repo_id}/refs                 branches and tags
    HEAD|GET /{repo_id}/resolve/{rev}/{path}            a model file: X-Repo-Commit, ETag, X-Linked-Etag,
    HEAD|GET /datasets/{repo_id}/resolve/{rev}/{path}   X-Linked-Size, Content-Length; GET honours Range

Errors are the Hub's: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound (EntryNotFound carries
X-Repo-Commit, which the client caches as a known-missing file); a gated repo's info and tree are public, as on
the Hub, and its files answer 401 (no token) or 403 (another token) with X-Error-Code GatedRepo.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Suffixes that the Hub's default .gitattributes stores in LFS (the ones a model or dataset repo holds).
LFS_SUFFIXES = {".safetensors", ".bin", ".parquet", ".arrow", ".onnx", ".model", ".pt", ".pth", ".ckpt", ".h5",
                ".msgpack", ".gguf", ".pkl", ".npy", ".zip", ".gz"}
TYPES = {"models": "model", "datasets": "dataset"}


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit id -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit id
    tags: set[str] = field(default_factory=set)
    token: str | None = None  # set: the repo is gated and only this token reads its files


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The Hub on 127.0.0.1 at a free port, serving in a background thread until `close()` (or the `with` ends)."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- building repos ------------------------------------------------------------------------------------------

    def commit(self, repo_id: str, folder: str | Path, repo_type: str = "model", branch: str = "main") -> str:
        """A new commit on `branch` holding exactly the files under `folder` (created with the repo if new)."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        repo = self.repos.setdefault((repo_type, repo_id), Repo())
        parent = repo.refs.get(branch, "")
        digest = hashlib.sha1(f"{repo_type}/{repo_id}\0{parent}\0{len(repo.commits)}".encode())
        for path, data in files.items():
            digest.update(f"{path}\0{git_blob_id(data)}\0".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.refs[branch] = sha
        return sha

    def tag(self, repo_id: str, name: str, commit: str, repo_type: str = "model") -> None:
        repo = self.repos[(repo_type, repo_id)]
        repo.refs[name] = commit
        repo.tags.add(name)

    def gate(self, repo_id: str, token: str, repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)].token = token

    def fetched(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """The paths of the files that GET requests downloaded from `repo_id`, in order."""
        prefix = f"/{repo_id}/resolve/" if repo_type == "model" else f"/datasets/{repo_id}/resolve/"
        out = []
        for method, path in self.requests:
            if method == "GET" and path.startswith(prefix):
                out.append(unquote(path[len(prefix):].split("?")[0].split("/", 1)[1]))
        return out

    # -- what the endpoints answer ---------------------------------------------------------------------------------

    def find(self, repo_type: str, parts: list[str]) -> tuple[str, Repo, list[str]] | None:
        """(repo id, repo, the path segments after it) for `org/name/...` or `name/...`, the longer id first."""
        for n in (2, 1):
            repo_id = "/".join(parts[:n])
            if len(parts) >= n and (repo_type, repo_id) in self.repos:
                return repo_id, self.repos[(repo_type, repo_id)], parts[n:]
        return None


def entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
    """Tree entries under folder `prefix` ('' for the root) as the Hub lists them: folders first, then files."""
    base = f"{prefix}/" if prefix else ""
    folders, out = set(), []
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base):].split("/")
        for depth in range(1, len(rest)):
            if depth == 1 or recursive:
                folders.add(base + "/".join(rest[:depth]))
        if len(rest) == 1 or recursive:
            out.append(file_entry(path, files[path]))
    listed = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
              for f in sorted(folders)]
    return listed + out


def file_entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
    if Path(path).suffix in LFS_SUFFIXES:
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    # -- replies -----------------------------------------------------------------------------------------------------

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None, method: str = "GET") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def json(self, obj, method: str = "GET") -> None:
        self.reply(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, method)

    def error(self, status: int, code: str, message: str, method: str, headers: dict | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.reply(status, body, {"Content-Type": "application/json", "X-Error-Code": code,
                                  "X-Error-Message": message, **(headers or {})}, method)

    # -- routing -----------------------------------------------------------------------------------------------------

    def route(self, method: str) -> None:
        self.hub.requests.append((method, self.path))
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode()) if length else {}
        if parts[:1] == ["api"] and len(parts) > 2 and parts[1] in TYPES:
            self.api(method, TYPES[parts[1]], parts[2:], parse_qs(url.query), form)
        elif parts[:1] == ["datasets"]:
            self.resolve(method, "dataset", parts[1:])
        else:
            self.resolve(method, "model", parts)

    def lookup(self, method: str, repo_type: str, parts: list[str]):
        found = self.hub.find(repo_type, parts)
        if found is None:
            self.error(404, "RepoNotFound", "Repository not found", method)
        return found

    def revision(self, method: str, repo_id: str, repo: Repo, rev: str) -> str | None:
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}", method)
        return sha

    def api(self, method: str, repo_type: str, parts: list[str], query: dict, form: dict) -> None:
        found = self.lookup(method, repo_type, parts)
        if found is None:
            return
        repo_id, repo, rest = found
        if rest == ["refs"]:
            refs = {"branches": [], "tags": [], "converts": []}
            for name, sha in repo.refs.items():
                kind = "tags" if name in repo.tags else "branches"
                refs[kind].append({"name": name, "ref": f"refs/{'tags' if kind == 'tags' else 'heads'}/{name}",
                                   "targetCommit": sha})
            return self.json(refs, method)
        op, rev = (rest[0], rest[1]) if len(rest) >= 2 else ("revision", "main") if not rest else (None, None)
        if op not in ("revision", "tree", "paths-info"):
            return self.error(404, "EntryNotFound", f"No such endpoint: {self.path}", method)
        sha = self.revision(method, repo_id, repo, rev)
        if sha is None:
            return
        files = repo.commits[sha]
        if op == "revision":
            info = {"id": repo_id, "sha": sha, "private": False, "gated": "manual" if repo.token else False,
                    "disabled": False, "downloads": 0, "likes": 0, "tags": [],
                    "lastModified": "2026-01-01T00:00:00.000Z", "siblings": [{"rfilename": p} for p in sorted(files)]}
            return self.json(info, method)
        if op == "tree":
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self.json(entries(files, "/".join(rest[2:]), recursive), method)
        paths = form.get("paths", [])
        folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
        found_entries = [file_entry(p, files[p]) if p in files else
                         {"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                         for p in paths if p in files or p in folders]
        return self.json(found_entries, method)

    def resolve(self, method: str, repo_type: str, parts: list[str]) -> None:
        found = self.lookup(method, repo_type, parts)
        if found is None:
            return
        repo_id, repo, rest = found
        if len(rest) < 3 or rest[0] != "resolve":
            return self.error(404, "EntryNotFound", f"No such endpoint: {self.path}", method)
        sha = self.revision(method, repo_id, repo, rest[1])
        if sha is None:
            return
        if repo.token is not None:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if given != repo.token:
                what = f"{repo_type} {repo_id}"
                if not given:
                    return self.error(401, "GatedRepo", f"Access to {what} is restricted. You must have access to "
                                      f"it and be authenticated to access it. Please log in.", method)
                return self.error(403, "GatedRepo", f"Access to {what} is restricted and you are not in the "
                                  f"authorized list.", method)
        path = "/".join(rest[2:])
        files = repo.commits[sha]
        if path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist on \"{rest[1]}\"", method,
                              {"X-Repo-Commit": sha})
        data = files[path]
        entry = file_entry(path, data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{entry["lfs"]["oid"]}"'})
        wanted = self.headers.get("Range", "")
        if method == "GET" and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start, end = int(first or 0), min(int(last) if last else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self.reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, method)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self.reply(206, data[start:end + 1], headers, method)
        self.reply(200, data, headers, method)


def point_client_at(url: str, home: Path, monkeypatch, offline: bool = False) -> None:
    """Make huggingface_hub, in this process and in subprocesses, use the Hub at `url` and a cache under `home`.

    Subprocesses read the environment variables. This process has imported huggingface_hub already (transformers
    imports it), and huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and the token paths
    once, at import, into `huggingface_hub.constants`, which its functions read at call time: so those constants
    are patched too. The user's own token (HF_TOKEN, ~/.cache/huggingface/token) is kept out of the tests."""
    from huggingface_hub import constants

    home = Path(home)
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    patched = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": offline,
               "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
               "HF_XET_CACHE": str(home / "xet"), "HF_ASSETS_CACHE": str(home / "assets")}
    for key, value in patched.items():
        monkeypatch.setattr(constants, key, value)


def set_offline(monkeypatch, offline: bool) -> None:
    """HF_HUB_OFFLINE for this process and its subprocesses (see point_client_at)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
