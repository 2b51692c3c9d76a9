"""GRPO (online RL against a reward): sampled groups, group-standardised advantages, a KL penalty to the
adapter-disabled reference; on a tiny model with a simple reward the mean reward rises over 50 steps."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import forward_ops, size, tol
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab import methods
from tunelab.config import FullConfig, LoraConfig
from tunelab.training import grpo


def _share_of_o(prompts, completions):
    """Reward: the share of the letter 'o' among the completion's letters (a preference for a given token)."""
    return [c.count("o") / max(sum(ch.isalpha() for ch in c), 1) for c in completions]


def test_the_mean_reward_rises_over_50_steps(tiny_chat_llama):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = methods.prepare(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), FullConfig(name="full"), [])
    prompts = [f"<|im_start|>user\nsay word {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(8)]
    history = grpo.train(model, tok, prompts, _share_of_o, steps=50, lr=1e-2, prompts_per_step=2, group_size=8,
                         max_new_tokens=12, beta=0.04, seed=0)
    first, last = (statistics.fmean(h["reward"] for h in part) for part in (history[:10], history[-10:]))
    print(f"mean reward: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last > first + 0.1
    # full fine-tuning compares against a frozen copy of the starting model: the KL grows from 0 (at step 1 the same
    # weights through the same kernels: a log-prob gap d of 0, and exp(d) - d - 1 a few float32 roundings of 1)
    assert history[0]["kl"] == pytest.approx(0, abs=tol(1.0, 3)) and history[-1]["kl"] > 1e-3


def test_adapters_use_their_own_base_as_the_reference(tiny_chat_llama):
    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    model = methods.prepare(AutoModelForCausalLM.from_pretrained(tiny_chat_llama), LoraConfig(name="lora", r=4), [])
    assert grpo.has_adapters(model)
    history = grpo.train(model, tok, ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"], _share_of_o,
                         steps=3, lr=1e-2, prompts_per_step=1, group_size=4, max_new_tokens=6, seed=0)
    # B starts at 0: policy == base, and the KL estimator exp(d) - d - 1 at d = 0 a few float32 roundings of 1
    assert history[0]["kl"] == pytest.approx(0, abs=tol(1.0, 3)) and history[-1]["kl"] > 0


def test_completion_logps_match_a_plain_forward(tiny_chat_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama).eval()
    prompt, completions = [5, 9, 13], [[20, 21, 22], [30]]
    with torch.no_grad():
        got = grpo.completion_logps(model, prompt, completions)
        for c, lp in zip(completions, got):
            raw = model(input_ids=torch.tensor([prompt + c])).logits[0]
            logits = raw.log_softmax(-1)
            expected = torch.stack([logits[len(prompt) - 1 + i, t] for i, t in enumerate(c)])
            # a forward pass (padded with the other completion there), a log-softmax over the vocabulary of terms up
            # to 2 max |logit| + log(vocab)
            vocab = raw.shape[-1]
            atol = tol(2 * size(raw) + math.log(vocab), forward_ops(32, 64, 2, tokens=6) + vocab)
            torch.testing.assert_close(lp, expected, atol=atol, rtol=0)


# -- task.type grpo through the pipeline --------------------------------------------------

def _prompt_file(tmp_path, n=16):
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say word {i}"} for i in range(n)])


def test_a_grpo_run_raises_the_validation_reward(tmp_path, tiny_chat_llama):
    import tunelab

    (tmp_path / "rewards.py").write_text(
        "def share_of_o(prompts, completions):\n"
        "    return [c.count('o') / max(sum(ch.isalpha() for ch in c), 1) for c in completions]\n")
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={_prompt_file(tmp_path)}",
                               "task.type=grpo", f"task.reward_function={tmp_path / 'rewards.py'}:share_of_o",
                               "task.group_size=8", "method.name=full", "train.lr=1e-2", "train.batch_size=2",
                               "train.max_steps=40", "eval.max_new_tokens=12", "data.val_fraction=0.25",
                               f"output_dir={tmp_path / 'rl'}"])
    s = run.summary
    assert s["eval"]["reward"] > s["base"]["validation"]["reward"] + 0.1, s
    records = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "train" for r in records) == 40 and (run.dir / "report.html").is_file()
    assert tunelab.load(run.dir).generate(["say word 3"], max_new_tokens=4)


def test_grpo_with_a_reward_model_run(tmp_path, tiny_chat_llama):
    from conftest import write_jsonl

    import tunelab

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q {i}", "chosen": "thanks kind", "rejected": "no go"}
                                                     for i in range(40)])
    rm = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={pairs}", "task.type=reward",
                              "train.max_steps=3", "eval.samples=0", f"output_dir={tmp_path / 'rm'}"])
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={_prompt_file(tmp_path, 8)}",
                               "task.type=grpo", f"task.reward_model={rm.dir}", "method.name=lora",
                               "train.max_steps=2", "train.batch_size=2", "eval.max_new_tokens=4",
                               f"output_dir={tmp_path / 'rl'}"])
    assert isinstance(run.summary["eval"]["reward"], float) and run.summary["steps"] == 2


BAD_REWARDS = """
import math

def raises(prompts, completions):
    return [len(c.split()[0]) for c in completions]  # IndexError on an empty completion

def too_few(prompts, completions):
    return [1.0]

def nan(prompts, completions):
    return [c.count("o") / len(c) if c else math.nan for c in completions]

def words(prompts, completions):
    return ["good" for c in completions]

def one_number(prompts, completions):
    return 0.5

not_a_function = 3

def fails_later(prompts, completions, calls=[]):
    calls.append(1)  # the check before the run, then the base evaluation: fine; the first training step: not
    if len(calls) > 2:
        raise RuntimeError("the scoring service is down")
    return [0.0 for c in completions]
"""


@pytest.mark.parametrize("extra, message", [
    ([], "needs exactly one reward"),
    (["task.reward_function=nowhere_module:f"], "could not be loaded"),
    (["task.reward_function=justaname"], "expected 'module:function'"),
    (["task.reward_function=REWARDS:raises"], "raised IndexError: list index out of range when tried before the run"),
    (["task.reward_function=REWARDS:too_few"], "returned 1 value(s) for 4 completions when tried before the run"),
    (["task.reward_function=REWARDS:nan"], "returned nan (float) for completion 1 of 4 when tried before the run"),
    (["task.reward_function=REWARDS:words"], "returned 'good' (str) for completion 1 of 4"),
    (["task.reward_function=REWARDS:one_number"], "returned 0.5 (float), not a list of numbers"),
    (["task.reward_function=REWARDS:not_a_function"], "'not_a_function' is 3, not a function"),
    (["task.reward_function=BROKEN:f"], "could not be loaded (SyntaxError"),
])
def test_grpo_reward_errors_are_clear(tmp_path, tiny_chat_llama, extra, message):
    import tunelab
    from tunelab import TunelabError

    (tmp_path / "rewards.py").write_text(BAD_REWARDS)
    (tmp_path / "broken.py").write_text("def f(prompts, completions):\n    return [1.0 for c in completions\n")
    extra = [x.replace("REWARDS", str(tmp_path / "rewards.py")).replace("BROKEN", str(tmp_path / "broken.py"))
             for x in extra]
    with pytest.raises(TunelabError) as e:
        tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={_prompt_file(tmp_path)}", "task.type=grpo",
                             "eval.max_new_tokens=2", f"output_dir={tmp_path / 'rl'}", *extra])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "rl").exists()


def test_a_reward_that_fails_during_the_run_is_one_paragraph(tmp_path, tiny_chat_llama, cli_run):
    (tmp_path / "rewards.py").write_text(BAD_REWARDS)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(f"model: {{path: '{tiny_chat_llama}'}}\ndata: {{train: '{_prompt_file(tmp_path)}'}}\n"
                      f"task: {{type: grpo, reward_function: '{tmp_path / 'rewards.py'}:fails_later'}}\n")
    r = cli_run("train", recipe, "train.max_steps=2", "eval.max_new_tokens=2", f"output_dir={tmp_path / 'rl'}")
    assert r.code == 2 and "Traceback" not in r.err, r.err[-3000:]
    msg = r.err.strip()
    assert msg.startswith("error: The reward task.reward_function=") and "\n" not in msg
    assert "raised RuntimeError: the scoring service is down while scoring sampled completions" in msg


@pytest.mark.parametrize("returned, message", [
    ([1.0, float("inf")], "returned inf (float) for completion 2 of 2"),
    ([1.0, None], "returned None (NoneType) for completion 2 of 2"),
    ([1.0, 2.0, 3.0], "returned 3 value(s) for 2 completions"),
    ({"a": 1.0, "b": 2.0}, "returned {'a': 1.0, 'b': 2.0} (dict), not a list of numbers"),
])
def test_score_checks_what_a_reward_returns(returned, message):
    from tunelab import TunelabError

    with pytest.raises(TunelabError) as e:
        grpo.score(lambda p, c: returned, ["p1", "p2\nends here"], ["", "x"], "task.reward_function='r:f'", "now")
    assert message in str(e.value) and "\n" not in str(e.value)
    # numbers of any kind are fine: ints, bools, numpy and torch scalars
    import numpy as np

    assert grpo.score(lambda p, c: [1, np.float32(0.5), torch.tensor(2.0), True][: len(c)] + [0] * (len(c) - 4),
                      ["p"] * 4, ["a", "b", "c", "d"], "r", "now") == [1.0, 0.5, 2.0, 1.0]


def test_grpo_reads_the_split_a_saved_dataset_dict_names(tmp_path, tiny_chat_llama):
    """data.train_split reaches grpo's prompt reader: a DatasetDict saved to disk is read at that split, and a bad
    row is named as the dataset's row, not a file line."""
    datasets = pytest.importorskip("datasets")
    import tunelab

    (tmp_path / "rewards.py").write_text("def n(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    good = datasets.Dataset.from_list([{"prompt": f"say word {i}"} for i in range(8)])
    bad = datasets.Dataset.from_list([{"prompt": "fine"}, {"prompt": ""}])
    datasets.DatasetDict({"prompts": good, "broken": bad}).save_to_disk(str(tmp_path / "ds"))
    common = [f"model.path={tiny_chat_llama}", f"data.train={tmp_path / 'ds'}", "task.type=grpo",
              f"task.reward_function={tmp_path / 'rewards.py'}:n", "task.group_size=2", "train.batch_size=2",
              "train.max_steps=1", "eval.max_new_tokens=2", "data.val_fraction=0.25"]
    run = tunelab.train(None, [*common, "data.train_split=prompts", f"output_dir={tmp_path / 'rl'}"])
    assert run.summary["steps"] == 1
    with pytest.raises(tunelab.TunelabError, match=r"split 'broken' \(data\.train\) row 1: no usable 'prompt'"):
        tunelab.train(None, [*common, "data.train_split=broken", f"output_dir={tmp_path / 'rl2'}"])
