"""Beyond labels: domain-adaptive, semi-supervised and preference fine-tuning.

Every strategy works with full fine-tuning and any registered method (the ``method:`` section
or a config passed to :func:`deltatune.inject`), from Python, YAML and the command line:

=================  ==========================================  ==========================
strategy           Python                                      command line
=================  ==========================================  ==========================
MLM (encoders)     :func:`with_mlm_head`, :class:`MLMTask`     ``deltatune adapt``
SimCSE (encoders)  :class:`SimCSETask`, :func:`simcse_loss`    ``deltatune adapt``
causal LM on text  :func:`pack_texts`, :func:`causal_lm_task`  ``deltatune adapt``
self-training      :func:`select_pseudo_labels`, :func:`semisup_run`  ``deltatune semisup``
consistency        :class:`ConsistencyTask`                    ``deltatune semisup``
reward model       :class:`RewardTask`, :func:`pairwise_loss`  ``deltatune reward``
DPO                :class:`DPOTask`, :func:`dpo_loss`          ``deltatune dpo``
=================  ==========================================  ==========================

The tasks plug into :func:`deltatune.train.fit`; the ``*_run`` functions are the commands.
"""

from deltatune.strategies.adapt import AdaptConfig, ObjectiveConfig, adapt_run
from deltatune.strategies.causal_text import PackedCollator, causal_lm_task, pack_texts
from deltatune.strategies.corpus import CorpusConfig, load_corpus
from deltatune.strategies.dpo import DPOConfig, DPOTask, dpo_loss, dpo_run, sequence_logprobs
from deltatune.strategies.mlm import MLMTask, mlm_collator, with_mlm_head
from deltatune.strategies.preference import (
    PreferenceDataConfig,
    PreferencePair,
    load_preference_pairs,
    toy_preference_pairs,
)
from deltatune.strategies.reward import RewardConfig, RewardTask, pairwise_loss, reward_run
from deltatune.strategies.semisup import (
    ConsistencyTask,
    SemisupConfig,
    select_pseudo_labels,
    semisup_run,
    split_labelled,
)
from deltatune.strategies.simcse import SimCSETask, simcse_loss

__all__ = [
    "AdaptConfig",
    "ConsistencyTask",
    "CorpusConfig",
    "DPOConfig",
    "DPOTask",
    "MLMTask",
    "ObjectiveConfig",
    "PackedCollator",
    "PreferenceDataConfig",
    "PreferencePair",
    "RewardConfig",
    "RewardTask",
    "SemisupConfig",
    "SimCSETask",
    "adapt_run",
    "causal_lm_task",
    "dpo_loss",
    "dpo_run",
    "load_corpus",
    "load_preference_pairs",
    "mlm_collator",
    "pack_texts",
    "pairwise_loss",
    "reward_run",
    "select_pseudo_labels",
    "semisup_run",
    "sequence_logprobs",
    "simcse_loss",
    "split_labelled",
    "toy_preference_pairs",
    "with_mlm_head",
]
