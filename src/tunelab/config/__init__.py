"""Typed, validated configuration: YAML recipe + dotted `key=value` overrides.

Every field carries a one-line description (shown by `tunelab config explain`). Unknown keys are errors with a
"did you mean" suggestion; out-of-range values are errors naming the key. Relative paths are taken relative to the
current working directory, like every other command-line tool.

- sections.py: the model, data, train, eval and multitask sections;
- tasks.py: the task section, one model per task, discriminated on `task.type`; each declares its facts (which
  data and train keys apply to it);
- methods.py: the method section, one model per method, discriminated on `method.name`; each declares the facts
  about its method that the rules need (virtual tokens, switchable, unfreezes);
- schema.py: the whole recipe (`Config`), one task or a list of them (`TaskSpec`);
- rules.py: the rules between sections, which read those facts (and the names each holds for, for messages);
- loader.py: YAML and overrides in, `to_yaml` out; validation.py: validation and its messages (did-you-mean);
- explainer.py: `tunelab config explain`.
"""

from .explainer import explain
from .loader import load, parse_overrides, to_yaml
from .methods import (
                      METHOD_CONFIGS,
                      METHOD_NAMES,
                      AdapterConfig,
                      BitFitConfig,
                      DoraConfig,
                      FreezeConfig,
                      FullConfig,
                      IA3Config,
                      LoraConfig,
                      MethodConfig,
                      PrefixConfig,
                      PromptConfig,
                      PTuningConfig,
                      QLoraConfig,
)
from .rules import (
                      AUGMENT_TASKS,
                      LABEL_SMOOTHING_TASKS,
                      NAMED_ADAPTER_METHODS,
                      PACKING_TASKS,
                      PADDING_FREE_TASKS,
                      PAIR_TASKS,
                      STREAMING_TASKS,
                      UNFREEZING_METHODS,
                      VIRTUAL_TOKEN_METHODS,
                      single,
)
from .schema import Config, TaskSpec
from .sections import DataConfig, EvalConfig, ModelConfig, MultitaskConfig, Section, TrainConfig
from .tasks import (
                      TASK_CONFIGS,
                      TASK_TYPES,
                      CausalLMConfig,
                      ClassificationConfig,
                      DpoConfig,
                      EmbeddingConfig,
                      GrpoConfig,
                      MlmConfig,
                      MultilabelConfig,
                      QAConfig,
                      RegressionConfig,
                      RewardConfig,
                      SftConfig,
                      TaskConfig,
                      TaskSection,
                      TokenClassificationConfig,
)
from .validation import validate

__all__ = [
    "explain", "load", "parse_overrides", "to_yaml", "validate", "single",
    "Config", "TaskSpec", "Section", "ModelConfig", "DataConfig", "TrainConfig", "EvalConfig", "MultitaskConfig",
    "TaskConfig", "TaskSection", "TASK_CONFIGS", "TASK_TYPES", "ClassificationConfig", "RegressionConfig",
    "MultilabelConfig", "EmbeddingConfig", "MlmConfig", "SftConfig", "CausalLMConfig", "TokenClassificationConfig",
    "QAConfig", "RewardConfig", "DpoConfig", "GrpoConfig",
    "MethodConfig", "METHOD_CONFIGS", "METHOD_NAMES", "FullConfig", "FreezeConfig", "LoraConfig", "DoraConfig",
    "QLoraConfig", "BitFitConfig", "IA3Config", "AdapterConfig", "PromptConfig", "PTuningConfig", "PrefixConfig",
    "VIRTUAL_TOKEN_METHODS", "NAMED_ADAPTER_METHODS", "UNFREEZING_METHODS", "PADDING_FREE_TASKS", "PACKING_TASKS",
    "PAIR_TASKS", "STREAMING_TASKS", "AUGMENT_TASKS", "LABEL_SMOOTHING_TASKS",
]
