from pathlib import Path

import pytest

from tunelab import config

RECIPES = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"minilm-full.yaml", "minilm-freeze.yaml", "minilm-lora.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_recipe_validates(path):
    cfg = config.load(path)
    assert cfg.method.name in path.stem
