import pytest
import yaml

from tunelab import config
from tunelab.errors import TunelabError

BASE = ["model.path=m", "data.train=t.jsonl"]


def test_overrides_are_typed():
    cfg = config.load(None, BASE + ["train.lr=3e-4", "train.batch_size=8", "method.name=lora",
                                    "method.target_modules=[query,value]", "train.max_grad_norm=", "train.eval_every=50"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.method.name == "lora" and cfg.method.target_modules == ["query", "value"]
    assert cfg.train.max_grad_norm is None
    assert cfg.train.eval_every == 50


def test_yaml_recipe_with_override_and_kwargs(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "train": {"lr": 1e-4}}))
    cfg = config.load(p, ["train.lr=5e-4"], **{"train.seed": 7})
    assert cfg.train.lr == 5e-4 and cfg.train.seed == 7
    assert cfg.method.name == "full" and cfg.task.type == "classification"


def test_required_keys_exist():
    cfg = config.load(None, BASE)
    for key in ("model.path", "model.dtype", "data.train", "data.validation", "data.test", "data.text_field",
                "data.label_field", "data.val_fraction", "task.type", "method.name", "train.epochs", "train.lr",
                "train.batch_size", "train.seed", "output_dir"):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "did you mean 'train.lr'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("data.text_feild=x", "did you mean 'data.text_field'"),
])
def test_unknown_key_did_you_mean(override, expected):
    with pytest.raises(TunelabError) as e:
        config.load(None, BASE + [override])
    assert expected in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("train.lr=0", "train.lr"),
    ("train.lr=-1e-4", "train.lr"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("data.val_fraction=0", "data.val_fraction"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.dtype=float8", "model.dtype"),
    ("train.eval_every=0", "train.eval_every"),
    ("train.seed=-1", "train.seed"),  # numpy's seed range is 0 ... 2**32 - 1
    ("train.seed=4294967296", "train.seed"),
])
def test_out_of_range_names_the_key(override, key):
    with pytest.raises(TunelabError) as e:
        config.load(None, BASE + [override])
    assert f"'{key}'" in str(e.value)


def test_method_specific_keys():
    with pytest.raises(TunelabError, match="'method.r'"):
        config.load(None, BASE + ["method.name=lora", "method.r=0"])
    with pytest.raises(TunelabError, match="'method.freeze_layers'"):
        config.load(None, BASE + ["method.name=freeze", "method.freeze_layers=-1"])
    # a LoRA key on a freeze method is a typo the user should hear about
    with pytest.raises(TunelabError, match="unknown key 'method.r'"):
        config.load(None, BASE + ["method.name=freeze", "method.r=8"])
    with pytest.raises(TunelabError, match="must be one of full, freeze, lora, dora"):
        config.load(None, BASE + ["method.name=lorra"])


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(TunelabError, match="'model' is required"):
        config.load(None, ["data.train=t.jsonl"])
    with pytest.raises(TunelabError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\n")
    with pytest.raises(TunelabError, match="not valid YAML at line"):
        config.load(bad)
    with pytest.raises(TunelabError, match="key=value"):
        config.load(None, BASE + ["train.lr"])


def test_every_field_is_described_and_explained():
    text = config.explain()
    for key in ("train.lr", "method.r (lora)", "method.freeze_layers (freeze)", "data.val_fraction", "output_dir"):
        assert key in text
    for section in (config.ModelConfig, config.DataConfig, config.TaskConfig, config.TrainConfig, config.EvalConfig,
                    config.FullConfig, config.FreezeConfig, config.LoraConfig):
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no description"


def test_round_trip_yaml():
    cfg = config.load(None, BASE + ["method.name=lora", "method.r=4"])
    again = config.validate(yaml.safe_load(config.to_yaml(cfg)))
    assert again == cfg


def test_switching_method_on_the_command_line_replaces_the_method_section(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "t.jsonl"},
                                 "method": {"name": "lora", "r": 4, "target_modules": ["query"]}}))
    assert config.load(p, ["method.name=full"]).method.name == "full"
    cfg = config.load(p, ["method.name=freeze", "method.freeze_layers=1"])
    assert cfg.method.freeze_layers == 1
    assert config.load(p, ["method.r=2"]).method.r == 2  # same method: keys merge


def test_a_key_given_twice_is_an_error_at_any_depth(tmp_path):
    """PyYAML keeps the last of two equal keys without a word; a recipe with one is an error naming both lines."""
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: m}\ndata: {train: t.jsonl}\ntrain:\n  lr: 1.0e-3\n  batch_size: 4\n  lr: 1.0e-4\n")
    with pytest.raises(TunelabError, match=r"'.*r\.yaml' gives the key 'train\.lr' twice, at lines 4 and 6"):
        config.load(p)
    p.write_text("model: {path: m}\ntasks:\n  - name: a\n    data: {train: a.jsonl, train: b.jsonl}\n")
    with pytest.raises(TunelabError, match=r"'tasks\.0\.data\.train' twice, at lines 4 and 4"):
        config.load(p)
    p.write_text("model: {path: m}\ndata: {train: t.jsonl}\nmodel: {path: n}\n")
    with pytest.raises(TunelabError, match=r"'model' twice, at lines 1 and 3"):
        config.load(p)
    with pytest.raises(TunelabError, match=r"Override 'method.rank_pattern=\{q: 4, q: 8\}'.*'q' twice"):
        config.load(None, BASE + ["method.name=lora", "method.rank_pattern={q: 4, q: 8}"])
    # not duplicates: a merge key overridden by an explicit one, an alias used twice, equal keys in two sections
    p.write_text("defaults: &d {lr: 1.0e-3, batch_size: 4}\nmodel: {path: m}\ndata: {train: t.jsonl, dedupe: true}\n"
                 "eval: {batch_size: 8}\n")
    with pytest.raises(TunelabError, match="unknown key 'defaults'"):
        config.load(p)
    p.write_text("model: {path: m}\ndata: {train: t.jsonl}\ntrain: &t\n  <<: {lr: 1.0e-3, batch_size: 4}\n  lr: 3.0e-4\n"
                 "tasks_: *t\n")
    with pytest.raises(TunelabError, match="unknown key 'tasks_'"):
        config.load(p)
    p.write_text("model: {path: m}\ndata: {train: t.jsonl}\ntrain:\n  <<: {lr: 1.0e-3, batch_size: 4}\n  lr: 3.0e-4\n")
    cfg = config.load(p)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.batch_size == 4


@pytest.mark.parametrize("overrides, expected", [
    (["task.threshold=0.3"], "unknown key 'task.threshold' — it is a key of task.type multilabel, not classification"),
    (["task.type=sft", "task.beta=0.2"], "it is a key of task.type dpo and grpo, not sft; valid keys here: type, template"),
    (["task.type=causal_lm", "task.template=chat"], "a key of task.type sft, reward, dpo and grpo, not causal_lm"),
    (["task.type=sft", "task.tempalte=chat"], "did you mean 'task.template'?"),
    (["method.name=freeze", "method.r=8"], "it is a key of method.name lora, dora and qlora, not freeze"),
    (["task.type=nli"], "'task.type' = 'nli': Input should be 'classification', 'regression'"),
    (["task=3"], "'task' = 3: Input should be a mapping"),
])
def test_a_key_of_another_task_or_method_is_named_as_such(overrides, expected):
    with pytest.raises(TunelabError) as e:
        config.load(None, BASE + overrides)
    assert expected in str(e.value)


def test_each_task_section_holds_its_own_keys():
    assert list(config.load(None, BASE).task.model_dump()) == ["type"]  # classification: no keys of its own
    sft = config.load(None, BASE + ["task.type=sft", "task.train_on_prompt=true"]).task
    assert isinstance(sft, config.SftConfig) and sft.model_dump() == {"type": "sft", "template": "auto",
                                                                      "train_on_prompt": True}
    assert config.load(None, BASE + ["task.type=dpo", "task.beta=0.3"]).task.beta == 0.3
    with pytest.raises(TunelabError, match=r"'tasks\.0\.task\.label_all_subwords' — it is a key of task.type "
                                           r"token_classification, not qa"):
        config.validate({"model": {"path": "m"}, "tasks": [{"name": "a", "task": {"type": "qa", "label_all_subwords": 1},
                                                            "data": {"train": "x"}}]})
    for task in config.TASK_CONFIGS:
        for name, field in task.model_fields.items():
            assert field.description, f"{task.__name__}.{name} has no description"
            assert f"task.{name} ({task().type})" in config.explain() or name == "type"


def test_a_task_section_written_before_the_split_still_loads(tmp_path):
    """Runs made when the task section held every task's keys saved them all in config.yaml; they load, keeping the
    keys of their own task."""
    flat = {"type": "multilabel", "template": "auto", "train_on_prompt": False, "regression_loss": "mse",
            "huber_delta": 1.0, "threshold": "tuned", "pooling": "mean", "normalize": True, "scale": 20.0,
            "symmetric": False, "gradient_cache": 0, "mask_probability": 0.15, "whole_word_mask": False,
            "new_mlm_head": False, "beta": 0.1, "dpo_loss": "sigmoid", "dpo_label_smoothing": 0.0, "reference": "auto",
            "reward_function": None, "reward_model": None, "group_size": 4, "temperature": 1.0,
            "label_all_subwords": False, "doc_stride": 128, "max_answer_length": 30, "n_best": 20,
            "null_threshold": 0.0, "version_2": None}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "task": flat}))
    assert config.load(p).task.model_dump() == {"type": "multilabel", "threshold": "tuned"}
    # a section with only some of them is a user's: a key of another task is an error there
    del flat["version_2"]
    p.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"train": "t.jsonl"}, "task": flat}))
    with pytest.raises(TunelabError, match="unknown key 'task.template'"):
        config.load(p)
