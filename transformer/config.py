"""Typed configuration: one dataclass per concern, registered in Hydra's ConfigStore.

``configs/train.yaml`` starts from the ``train_schema`` node stored here, so every YAML
file and every command-line override is checked against these types: an unknown key or
a wrong type fails at start-up with the key's name. ``validate`` then checks the
combinations no type can express (d_model divisible by n_heads, ...).
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, replace
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# OmegaConf reads these annotations at run time: keep ``Optional[...]`` and ``list[...]``
# forms it understands (no ``X | None`` in dataclass fields).


@dataclass
class ModelConfig:
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    n_layers: int | None = None  # when set, overrides both stacks (handy in sweeps)
    d_ff: int = 2048
    dropout: float = 0.1  # residual and embedding dropout, section 5.4
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    token_dropout: float = 0.0  # drop whole source and target token embeddings (word dropout)
    norm_first: bool = False  # False: the paper's post-norm
    share_embeddings: str = "none"  # none | decoder | all
    # The parts: entries of the config groups model/attention, model/positional, model/norm
    # and model/ffn, each naming its class ({_target_, _partial_: true, arguments});
    # None: the paper's (train.yaml picks those groups' defaults). transformer/components.py
    attention: dict[str, Any] | None = None
    positional: dict[str, Any] | None = None
    norm: dict[str, Any] | None = None
    ffn: dict[str, Any] | None = None
    max_len: int = 1024
    pad_id: int = 0
    scale_embedding: bool = True  # multiply embeddings by sqrt(d_model), section 3.4
    output_bias: bool = False  # a bias on the logits (imported Marian models have one)


@dataclass
class ExtraCorpusConfig:
    """A further training corpus mixed into the train split (``data.extra_train``): parallel
    files ``root / file_pattern`` of its ``split``, repeated ``weight`` times an epoch, each
    source sentence prefixed with ``tag`` (a token of its own; e.g. ``<BT>`` for
    back-translated data, Caswell et al. 2019) when one is given."""

    root: str = MISSING
    split: str = "train"
    file_pattern: str = "{split}.{lang}"
    weight: int = 1  # copies of the corpus in each epoch (upsampling)
    tag: str | None = None


@dataclass
class DataConfig:
    source: str = "multi30k"  # multi30k | parallel_files | hub
    root: str | None = None  # multi30k / parallel_files directory
    src_lang: str = "en"
    tgt_lang: str = "de"
    train_split: str = "train"
    valid_split: str = "val"
    test_splits: list[str] = field(default_factory=lambda: ["test_2016_flickr",
                                                            "test_2017_flickr"])
    # parallel_files: "{split}" and "{lang}" are filled in; plain or .gz files.
    file_pattern: str = "{split}.{lang}"
    # multi30k / parallel_files: the train split's target side read from this file instead,
    # line i translating line i of the train source: a teacher's translations of it, for
    # sequence-level distillation (experiment=multi30k_en_de_distill; README "Distillation")
    train_tgt_file: str | None = None
    # hub: a Hugging Face dataset with a ``translation`` column.
    hub_name: str | None = None
    hub_config: str | None = None
    streaming: bool = False
    # tokenizer: learned BPE, or your own file (tokenizer.json or SentencePiece .model;
    # transformer/tokenizer_files.py), for both sides or one per side
    tokenizer: str | None = None
    src_tokenizer: str | None = None
    tgt_tokenizer: str | None = None
    vocab_size: int = 8000
    # BPE is learned on at most this many training pairs (a seeded uniform sample of the
    # split when it is larger; null: all): bounded time and memory on corpora of millions.
    tokenizer_sample: int | None = 1_000_000
    joint_vocab: bool = True
    lowercase: bool = False
    # filtering and batching
    max_len: int = 256  # tokens per side, longer training pairs are dropped
    allow_long_eval: bool = False  # keep (truncate) over-long val/test pairs instead of failing
    max_tokens: int = 4096  # padded source or target tokens per batch (fairseq --max-tokens)
    max_sentences: int | None = None
    prefetch: int = 2  # training batches collated ahead in a background thread; 0: none
    # more training corpora, mixed into the train split with weights and tags
    extra_train: list[ExtraCorpusConfig] = field(default_factory=list)
    # Multilingual: one model for several directions, e.g. [en-de, en-fr, en-cs]; each
    # source starts with its target language's tag (<2de>, Johnson et al. 2017), and
    # src_lang/tgt_lang are not used. []: the one direction src_lang -> tgt_lang.
    pairs: list[str] = field(default_factory=list)
    cache_dir: str = ".cache/data"
    download: bool = True  # download Multi30k when root is missing and the machine is online


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    # Parameters weight decay leaves alone: kinds (transformer.optim.NO_DECAY_KINDS) or
    # regular expressions searched in parameter names; [] decays every parameter.
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "embedding"])
    fused: bool | None = None  # None: fused where torch has the kernel (CUDA, CPU)


@dataclass
class SchedConfig:
    name: str = "inverse_sqrt"  # inverse_sqrt (section 5.3) | cosine | constant
    warmup_steps: int = 4000
    min_lr: float = 0.0  # cosine floor


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto: bf16 on GPU, on CPU where fast
    threads: int | None = None  # CPU threads per process; None: chosen (trainer.choose_threads)
    max_steps: int = 100_000
    max_epochs: int | None = None
    val_every_steps: int | None = 1000  # None: validate at each epoch end
    save_every_steps: int = 1000
    keep_last: int = 5
    seed: int = 1
    resume: str = "never"  # auto | never | <path to a checkpoint>
    init_from: str | None = None  # fine-tune a checkpoint: its weights, model and tokenizer
    # resume although the data order changed (batching, seed, data, ranks): the current
    # epoch restarts at its first batch (fairseq's --reset-dataloader)
    reset_dataloader: bool = False
    compile: bool = False
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    patience: int | None = None  # validations without improvement before stopping
    log_every_steps: int = 50
    label_smoothing: float = 0.1
    rdrop_alpha: float = 0.0  # > 0: R-Drop, each batch twice (twice the cost per token)
    best_metric: str = "bleu"  # bleu | loss
    val_max_sentences: int | None = None  # decode only this many val sentences for BLEU
    val_beam: int = 1  # 1: greedy translations for val/bleu
    max_skipped_steps: int = 10  # consecutive non-finite steps before giving up
    overfit_batches: int = 0  # >0: train on only this many batches (debug=overfit)
    dist_timeout_s: int = 1800  # torchrun: a rank waiting longer on the others fails
    # torchrun: ddp (a full replica per rank) | fsdp (parameters, gradients and optimizer
    # state sharded over the ranks, FSDP2; transformer/fsdp.py)
    strategy: str = "ddp"
    # recompute each layer's activations in the backward instead of keeping them: less
    # memory, about a third more compute (Transformer.set_activation_checkpointing)
    activation_checkpointing: bool = False


@dataclass
class LoggerConfig:
    """Where metrics go: each option of configs/logger/ turns its tracker on, so that
    ``logger=[tensorboard,wandb]`` (several options of the group) turns on both."""

    tensorboard: bool = False  # logger=tensorboard, train.yaml's default
    wandb: bool = False  # logger=wandb: Weights & Biases (pip install -e ".[wandb]")
    wandb_project: str = "transformer"
    wandb_entity: str | None = None  # a W&B team or user; None: your default entity
    mlflow: bool = False  # logger=mlflow (pip install -e ".[mlflow]")
    mlflow_tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's
    mlflow_experiment: str = "transformer"
    n_examples: int = 3  # source / reference / hypothesis triples at each validation
    attention_maps: bool = True  # heat maps at each validation (TensorBoard)


@dataclass
class TestConfig:
    """How the finished run is scored: the evaluate.py command the trainer prints last."""

    average_last: int = 0  # >1: average the newest N checkpoints; else checkpoint_best.pt
    beam: int = 5
    lenpen: float = 0.6


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    test: TestConfig = field(default_factory=TestConfig)
    experiment: str | None = None  # name of the experiment delta, for the record


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint file; with average_last, a run directory
    average_last: int = 0  # >1: average the run's newest N numbered checkpoints (paper 6.1)
    ensemble: list[str] = field(default_factory=list)  # more checkpoints, decoded with it
    splits: list[str] = field(default_factory=lambda: ["test_2016_flickr", "test_2017_flickr"])
    mode: str = "splits"  # splits | files | interactive | generate (transformer/generate.py)
    src_file: str | None = None
    ref_file: str | None = None
    # mode=generate: a file of any size, streamed in chunks of chunk_lines and resumable
    output_file: str | None = None
    chunk_lines: int = 10_000  # lines sorted and batched together (outputs depend on it)
    overwrite: bool = False  # start output_file again, whatever it holds
    beam: int = 5
    lenpen: float = 0.6
    max_len_a: float = 1.2
    max_len_b: int = 10
    min_len: int = 1
    # Search options (README "Search options"): beam (greedy at beam=1) | greedy | sample
    search: str = "beam"
    temperature: float = 1.0  # search=sample: < 1 sharpens the distribution, > 1 flattens it
    top_k: int = 0  # search=sample: draw from the k most probable tokens only; 0: all
    top_p: float = 1.0  # search=sample: from the nucleus of probability top_p only; 1: all
    seed: int = 1  # search=sample: the same seed (and line) gives the same sample
    nbest: int = 1  # >1: the nbest best hypotheses of beam search, as JSON lines (.nbest.jsonl)
    token_scores: bool = False  # the JSON lines also give each token's log-probability
    prefix: str | None = None  # every translation starts with this text (e.g. a language tag)
    prefix_file: str | None = None  # mode=files: one prefix a line of src_file
    no_repeat_ngram_size: int = 0  # >0: no n-gram of this size twice in a translation
    # search=beam: stop a sentence once beam hypotheses ended (fairseq's rule; what
    # backend=ctranslate2 always does) instead of once none can win (exact, the default)
    early_stopping: bool = False
    batch_tokens: int = 8192
    # mode=generate: torch (our searches, every option) | ctranslate2 (the model exported to
    # CTranslate2 on the fly: beam or greedy, faster on the CPU; README "Generation")
    backend: str = "torch"
    compute_type: str = "default"  # backend=ctranslate2: CTranslate2's (int8, float32, ...)
    device: str = "auto"
    precision: str = "auto"  # autocast while translating; auto: bf16 on a GPU, fp32 on the CPU
    # A multilingual model (data.pairs): the target language; its tag (<2de>) is put before
    # each source. mode=splits without it scores every direction the model was trained on.
    tgt_lang: str | None = None
    data_root: str | None = None  # overrides the checkpoint's data.root
    output_dir: str | None = None  # None: translations/ in the checkpoint's run directory
    scores_file: str | None = None  # also write the scores of every split here, as JSON
    # Modules whose classes the checkpoint's model parts may be, besides transformer's and
    # torch.nn's: importing one runs its code (docs/extending.md). E.g. [my_pkg]
    trust_modules: list[str] = field(default_factory=list)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


CHOICES = {
    "model.share_embeddings": ("none", "decoder", "all"),
    "data.source": ("multi30k", "parallel_files", "hub"),
    "optim.name": ("adamw", "adam"),
    "sched.name": ("inverse_sqrt", "cosine", "constant"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "bf16", "fp16", "fp32"),
    "trainer.best_metric": ("bleu", "loss"),
    "trainer.strategy": ("ddp", "fsdp"),
}


def lookup(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Ranges of numeric keys; None (unset) is fine where the type allows it. NaN and inf fail.
POSITIVE = ("model.d_model", "model.n_heads", "model.n_encoder_layers", "model.n_decoder_layers",
            "model.n_layers", "model.d_ff", "model.max_len", "data.vocab_size", "data.max_len",
            "data.tokenizer_sample",
            "data.max_tokens", "data.max_sentences", "optim.lr", "trainer.max_epochs",
            "trainer.val_every_steps", "trainer.save_every_steps", "trainer.keep_last",
            "trainer.grad_accum", "trainer.patience", "trainer.log_every_steps",
            "trainer.val_max_sentences", "trainer.val_beam", "trainer.max_skipped_steps",
            "trainer.dist_timeout_s", "trainer.threads")
NON_NEGATIVE = ("optim.eps", "optim.weight_decay", "sched.warmup_steps", "sched.min_lr",
                "trainer.clip_norm", "trainer.rdrop_alpha", "trainer.overfit_batches",
                "logger.n_examples", "data.prefetch",  # 0: collate in the loop's thread
                "trainer.max_steps")  # 0: only save the start (e.g. of a converted model)
FRACTIONS = ("model.dropout", "model.attention_dropout", "model.activation_dropout",
             "model.token_dropout", "trainer.label_smoothing")
RANGES = ((POSITIVE, lambda value: 0 < value < math.inf, "a positive number"),
          (NON_NEGATIVE, lambda value: 0 <= value < math.inf, "a number >= 0"),
          (FRACTIONS, lambda value: 0 <= value < 1, "in [0, 1)"))


def validate(cfg: Any) -> None:
    """Check the values and combinations of a train config; raise ConfigError naming the
    key. Ranges come first: the combinations below divide by some of these values."""
    for key, allowed in CHOICES.items():
        if lookup(cfg, key) not in allowed:
            raise ConfigError(f"{key}={lookup(cfg, key)!r} is not one of {list(allowed)}")
    for keys, holds, requirement in RANGES:
        for key in keys:
            value = lookup(cfg, key)
            if value is not None and not holds(value):
                raise ConfigError(f"{key}={value} must be {requirement}")
    if not 0 <= cfg.trainer.seed < 2**31:  # numpy takes [0, 2**32), and ranks add their rank
        raise ConfigError(f"trainer.seed={cfg.trainer.seed} must be in [0, 2**31)")
    model = cfg.model
    if model.pad_id != 0:
        raise ConfigError(f"model.pad_id={model.pad_id} must be 0: the tokenizers and the "
                          "batches put <pad> at id 0")
    if model.d_model % model.n_heads != 0:
        raise ConfigError(f"model.d_model={model.d_model} is not divisible by "
                          f"model.n_heads={model.n_heads}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} must be two values in [0, 1)")
    for entry in cfg.optim.no_decay:  # a kind's name is a valid expression too
        try:
            re.compile(entry)
        except re.error as error:
            raise ConfigError(f"optim.no_decay: {entry!r} is not a regular expression ({error})"
                              ) from None
    if cfg.model.share_embeddings == "all" and not cfg.data.joint_vocab:
        raise ConfigError("model.share_embeddings=all needs data.joint_vocab=true "
                          "(one vocabulary for both sides)")
    if cfg.data.max_len + 2 > cfg.model.max_len:
        raise ConfigError(f"data.max_len={cfg.data.max_len} (+2 for <s> and </s>) exceeds "
                          f"model.max_len={cfg.model.max_len}")
    check_file_pattern(cfg.data.file_pattern)
    check_pairs(cfg.data)
    check_parts(cfg.model)


PAIR = re.compile(r"([A-Za-z][\w]*)-([A-Za-z][\w]*)")


def check_pairs(data: Any) -> None:
    """data.pairs: distinct ``src-tgt`` directions, with a corpus that has one file per
    language (multi30k, parallel_files) and nothing else mixed in."""
    for index, pair in enumerate(data.pairs):
        if not PAIR.fullmatch(str(pair)):
            raise ConfigError(f"data.pairs[{index}]={pair!r} is not a direction like 'en-de'")
    if len(set(data.pairs)) != len(data.pairs):
        raise ConfigError(f"data.pairs={list(data.pairs)} names a direction twice")
    if data.pairs and data.source == "hub":
        raise ConfigError("data.pairs needs data=multi30k or data=parallel_files (a file per "
                          "split and language); for a hub dataset, train one direction")
    if data.pairs and data.extra_train:
        raise ConfigError("data.pairs with data.extra_train is not supported: mix corpora "
                          "into one direction, or train the directions without extra corpora")
    if data.pairs and data.train_tgt_file:
        raise ConfigError("data.pairs with data.train_tgt_file is not supported: a teacher's "
                          "translations replace the targets of one direction")


def check_parts(model: Any) -> None:
    """Build one of each of the model's parts, with the real sizes: a class that cannot be
    imported, a misspelt or refused argument stops here, naming its key."""
    from omegaconf import OmegaConf

    from transformer.model import build_model

    model = model if isinstance(model, ModelConfig) else OmegaConf.to_object(model)
    build_model(replace(model, n_layers=1), 8, 8)


def check_file_pattern(pattern: str) -> None:
    """data.file_pattern fills in exactly ``{split}`` and ``{lang}``."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as error:  # an unmatched brace
        raise ConfigError(f"data.file_pattern={pattern!r} is not a format string: {error}"
                          ) from None
    if fields != {"split", "lang"}:
        raise ConfigError(f"data.file_pattern={pattern!r} must name {{split}} and {{lang}} "
                          f"and nothing else (it names {sorted(fields)})")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
