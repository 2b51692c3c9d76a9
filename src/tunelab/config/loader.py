"""Reading a recipe: YAML (keys given twice are errors, not silently the last one), dotted `key=value`
overrides, then validation (validation.py). Also `to_yaml`, the resolved config as a run directory saves it.

Relative paths are taken relative to the current working directory, like every other command-line tool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import TunelabError
from .schema import Config
from .validation import validate


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`["train.lr=3e-4", ...]` -> {"train.lr": 0.0003}; values parsed as YAML scalars/lists."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        shown = item if item.isprintable() else repr(item)[1:-1]  # a newline in it would split the message
        if not sep or not key.strip():
            raise TunelabError(
                f"Override '{shown}' is not of the form key=value. Write dotted keys with a value, "
                f"e.g. train.lr=3e-4 or method.target_modules=[query,value]."
            )
        try:
            out[key.strip()], twice = _parse_yaml(value) if value.strip() else (None, [])
        except (yaml.YAMLError, RecursionError) as e:
            raise TunelabError(
                f"Override '{shown}': the value is not valid YAML ({_yaml_problem(e)}). Give a number, a word or a list "
                f"like [query,value], and quote text with special characters, e.g. \"data.train='my [1].jsonl'\"."
            ) from None
        if twice:
            raise TunelabError(f"Override '{shown}': the value gives the key '{twice[0][0]}' twice, and YAML would keep "
                               f"only the last one. Give each key once.")
    return out


def _parse_yaml(text: str) -> tuple[Any, list[tuple[str, int, int]]]:
    """yaml.safe_load, and the keys given twice in one mapping at any depth (which PyYAML resolves silently, the last
    one winning): [(dotted key, first line, second line)], sorted by the second line. Each node is visited once, so
    aliases (an anchor bomb) cost nothing extra."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        twice = []
        stack, visited = [(root, "")] if root is not None else [], set()
        while stack:
            node, path = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                stack += [(item, f"{path}{i}.") for i, item in enumerate(node.value)]
            elif isinstance(node, yaml.MappingNode):
                lines: dict[tuple[str, str], int] = {}
                for key, value in node.value:
                    if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                        stack.append((value, path))
                        continue
                    name = key.value if key.value.isprintable() else repr(key.value)[1:-1]
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in lines:
                        twice.append((f"{path}{name}", lines[key.tag, key.value], line))
                    lines[key.tag, key.value] = line
                    stack.append((value, f"{path}{name}."))
        return (loader.construct_document(root) if root is not None else None), sorted(twice, key=lambda t: t[2])
    finally:
        loader.dispose()


def _yaml_problem(e: Exception) -> str:
    """What PyYAML found wrong, on one line (its own messages run over several)."""
    if isinstance(e, RecursionError):
        return "lists or mappings nested too deeply"
    return str(getattr(e, "problem", None) or e).splitlines()[0]


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None, **kw: Any) -> Config:
    """Read a YAML recipe (or start empty), apply dotted overrides, validate."""
    tree: dict = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise TunelabError(f"Config file '{path}' does not exist. Pass the path of a YAML recipe, e.g. configs/classification/minilm-lora.yaml.")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise TunelabError(f"Config file '{path}' could not be read ({e.strerror or e}). Check its permissions, or "
                               f"copy the recipe somewhere readable.") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            # UTF-16 is what Windows editors save as "Unicode"; other bad bytes are usually Latin-1.
            utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
            line = data.count(b"\n", 0, e.start) + 1
            found = " (it starts with a UTF-16 byte-order mark)" if utf16 else f": line {line} has the byte 0x{data[e.start]:02x}"
            raise TunelabError(f"Config file '{path}' is not UTF-8 text{found}. Re-save it as UTF-8, e.g. `iconv -f "
                               f"{'UTF-16' if utf16 else 'latin1'} -t UTF-8 {path} > fixed.yaml`.") from None
        try:
            tree, twice = _parse_yaml(text)
            tree = tree or {}
        except (yaml.YAMLError, RecursionError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise TunelabError(f"Config file '{path}' is not valid YAML{where}: {_yaml_problem(e)}. Fix the syntax there.") from None
        if twice:
            key, first, second = twice[0]
            more = f" ({len(twice) - 1} more key(s) are given twice too)" if len(twice) > 1 else ""
            raise TunelabError(f"Config file '{path}' gives the key '{key}' twice, at lines {first} and {second}{more}; "
                               f"YAML would silently keep only the last one. Remove one of them.")
        if not isinstance(tree, dict):
            raise TunelabError(f"Config file '{path}' must hold a mapping of sections (model, data, task, method, train), not {type(tree).__name__}.")
    changes = {**parse_overrides(overrides), **kw}
    method = tree.get("method")
    if "method.name" in changes and isinstance(method, dict) and method.get("name") != changes["method.name"]:
        # Switching method on the command line replaces the recipe's method section: its
        # keys (r, alpha, ...) belong to the old method and would be rejected as unknown.
        tree["method"] = {}
    for key, value in changes.items():
        _set_dotted(tree, key, value)
    return validate(tree, source)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
