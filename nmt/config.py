"""Dataclass schemas for every config group, with the cross-field checks.

The schemas are registered with Hydra's ConfigStore and merged under the YAML files, so the composed
config is closed: an unknown key or a wrong type fails while composing. Checks that need a value
(ranges, choices, combinations) live in `__post_init__` and run when the CLI turns the composed
config into these dataclasses, before any work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, List, Optional

from nmt.errors import ConfigError

VECTOR_FORMATS = ("auto", "word2vec_text", "glove", "word2vec_binary")
INIT_SCHEMES = ("normal", "uniform", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
DATASETS = ("multi30k", "tatoeba", "files")
SPLITS = ("train", "val", "test")
PRECISIONS = ("fp32", "bf16", "fp16")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        if value in ("True", "False"):  # `key=true` on the command line: YAML reads a boolean, the field makes it a str
            raise ConfigError(f"{key}={value.lower()} is read as a yes/no, but {key} takes one of: "
                              f"{', '.join(choices)}.")
        raise ConfigError(f"{key}={value!r} is not a valid choice; use one of: {', '.join(choices)}.")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0, got {value}.")


def check_non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{key} must be 0 or more, got {value}.")


def check_probability(key: str, value: float, upper_inclusive: bool = False) -> None:
    if not (0.0 <= value < 1.0 or (upper_inclusive and value == 1.0)):
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"{key} must lie in {bound}, got {value}.")


def parse_duration(key: str, text: Optional[str]) -> Optional[float]:
    """'90' or '90s' -> 90.0; '15m', '1.5h', '01:30:00' (H:M:S) are accepted too; None stays None."""
    if text is None or str(text).strip().lower() in ("", "none", "null"):
        return None
    text = str(text).strip().lower()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text)
    if match:
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    elif re.fullmatch(r"\d+(:\d{1,2}){1,2}", text):
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + int(part)
    else:
        raise ConfigError(
            f"{key}={text!r} is not a duration; write seconds (3600), a unit (90s, 45m, 1.5h) or H:MM:SS."
        )
    check_positive(key, seconds)
    return seconds


@dataclass
class SplitFiles:
    """One split of the user's own data: two line-aligned files, or one TSV (source<TAB>target)."""

    src: Optional[str] = None
    tgt: Optional[str] = None
    tsv: Optional[str] = None

    @property
    def given(self) -> bool:
        """Whether the split has its files: the TSV, or both line-aligned files."""
        return bool(self.tsv or (self.src and self.tgt))


@dataclass
class VocabConfig:
    type: str = "unigram"  # unigram | bpe
    size: int = 8000
    joint: bool = True
    character_coverage: float = 1.0
    max_sentences: int = 2_000_000  # SentencePiece samples at most this many training sentences

    def __post_init__(self) -> None:
        check_choice("data.vocab.type", self.type, ("unigram", "bpe"))
        if self.size < 16:
            raise ConfigError(f"data.vocab.size must be at least 16, got {self.size}.")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ConfigError(f"data.vocab.character_coverage must lie in [0.9, 1], got {self.character_coverage}.")
        check_positive("data.vocab.max_sentences", self.max_sentences)


@dataclass
class DataConfig:
    dataset: str = "multi30k"  # multi30k | tatoeba | files
    src_lang: str = "de"
    tgt_lang: str = "en"
    # multi30k: which file stem is the test split (test_2016_flickr, test_2017_flickr, ...)
    test_set: str = "test_2016_flickr"
    # tatoeba: the PyTorch tutorial's filter (< 10 words, English starting "i am", "he is", ...)
    tutorial_filter: bool = False
    # tatoeba and other single-file sets: the share of pairs held out for val and test
    heldout_fraction: float = 0.01
    # files: the user's own data
    train: SplitFiles = field(default_factory=SplitFiles)
    val: SplitFiles = field(default_factory=SplitFiles)
    test: SplitFiles = field(default_factory=SplitFiles)
    # reading
    on_decode_error: str = "error"  # error | replace
    on_bad_line: str = "error"  # error | skip (a TSV line without exactly one tab)
    # training-pair filter, in SentencePiece pieces (val and test are never filtered)
    min_len: int = 1
    max_len: int = 100
    max_len_ratio: float = 3.0
    # slices for quick runs: the first N pairs of a split (0 = all)
    train_limit: int = 0
    val_limit: int = 0
    vocab: VocabConfig = field(default_factory=VocabConfig)
    # batching: padded target tokens per batch, and how many batches' worth of examples are
    # sorted together by length (larger = less padding, less randomness)
    batch_tokens: int = 4096
    sort_pool: int = 100
    # processes that encode the training split into the cache; 0 = one for small corpora, else
    # one per CPU (up to 8). The result does not depend on it.
    encode_workers: int = 0
    # subword regularization while training (nmt.data.sampling): each epoch segments the training
    # text anew. Unigram: sample among the subword_nbest best segmentations (-1: all), smoothed by
    # subword_alpha; BPE: subword_alpha is the BPE-dropout rate. 0 = off, the one best segmentation.
    subword_alpha: float = 0.0
    subword_nbest: int = -1

    def __post_init__(self) -> None:
        check_choice("data.dataset", self.dataset, DATASETS)
        check_choice("data.on_decode_error", self.on_decode_error, ("error", "replace"))
        check_choice("data.on_bad_line", self.on_bad_line, ("error", "skip"))
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"data.src_lang and data.tgt_lang are both {self.src_lang!r}; pick two languages.")
        check_probability("data.heldout_fraction", self.heldout_fraction)
        check_positive("data.min_len", self.min_len)
        if self.max_len < self.min_len:
            raise ConfigError(f"data.max_len ({self.max_len}) must be at least data.min_len ({self.min_len}).")
        if self.max_len_ratio < 1:
            raise ConfigError(f"data.max_len_ratio must be at least 1, got {self.max_len_ratio}.")
        check_non_negative("data.train_limit", self.train_limit)
        check_non_negative("data.val_limit", self.val_limit)
        check_positive("data.batch_tokens", self.batch_tokens)
        check_positive("data.sort_pool", self.sort_pool)
        check_probability("data.subword_alpha", self.subword_alpha, upper_inclusive=True)
        if self.subword_nbest != -1 and self.subword_nbest < 2:
            raise ConfigError(f"data.subword_nbest must be -1 (sample among all segmentations) or at least 2, "
                              f"got {self.subword_nbest}.")
        check_non_negative("data.encode_workers", self.encode_workers)
        if self.dataset == "files":
            lacking = [split for split in ("train", "val") if not getattr(self, split).given]
            if lacking:
                what = {"train": "training data", "val": "dev data"}
                needs = "; and ".join(f"{what[s]}: data.{s}.src and data.{s}.tgt (two line-aligned files), or "
                                      f"data.{s}.tsv (one source<TAB>target file)" for s in lacking)
                raise ConfigError(f"data.dataset=files needs {needs}. data.test is optional (the test set that "
                                  f"nmt-evaluate scores).")
            for split in ("train", "val"):
                files: SplitFiles = getattr(self, split)
                if files.tsv and (files.src or files.tgt):
                    raise ConfigError(f"Set either data.{split}.tsv or data.{split}.src/tgt, not both.")


@dataclass
class EmbeddingConfig:
    init: str = "normal"
    init_scale: float = 0.1  # std for normal, bound for uniform; ignored by xavier/kaiming
    max_norm: Optional[float] = None
    scale: bool = False  # multiply by sqrt(embedding_dim)
    freeze: str = "none"  # none | src | tgt | both
    unfreeze_after: int = 0  # steps; the frozen side(s) join the optimizer after this many updates (0 = never)
    sparse: bool = False  # sparse gradients for the embedding tables, updated by SparseAdam's lazy rule
    src_vectors: Optional[str] = None  # pretrained vectors: word2vec text or binary, GloVe, fastText .vec
    tgt_vectors: Optional[str] = None
    vectors_format: str = "auto"  # auto | word2vec_text (fastText .vec too) | glove | word2vec_binary
    vectors_lowercase: bool = False  # a piece may also take the vector of its word lowercased
    vectors_subword_mean: bool = False  # pieces left without a vector: mean of the training words using them

    def __post_init__(self) -> None:
        check_choice("model.embeddings.init", self.init, INIT_SCHEMES)
        check_positive("model.embeddings.init_scale", self.init_scale)
        if self.max_norm is not None:
            check_positive("model.embeddings.max_norm", self.max_norm)
        check_choice("model.embeddings.freeze", self.freeze, ("none", "src", "tgt", "both"))
        if self.freeze != "none" and self.max_norm is not None:
            raise ConfigError(
                "model.embeddings.max_norm rescales embedding rows in place during lookup, so frozen embeddings "
                "would still change: unset model.embeddings.max_norm or set model.embeddings.freeze=none."
            )
        check_non_negative("model.embeddings.unfreeze_after", self.unfreeze_after)
        if self.unfreeze_after and self.freeze == "none":
            raise ConfigError(
                f"model.embeddings.unfreeze_after={self.unfreeze_after} unfreezes frozen embeddings, but "
                f"model.embeddings.freeze=none: set freeze to src, tgt or both, or unfreeze_after=0."
            )
        check_choice("model.embeddings.vectors_format", self.vectors_format, VECTOR_FORMATS)
        if (self.vectors_lowercase or self.vectors_subword_mean) and not (self.src_vectors or self.tgt_vectors):
            raise ConfigError(
                "model.embeddings.vectors_lowercase and vectors_subword_mean change how pretrained vectors are "
                "matched, but no vectors are loaded: set model.embeddings.src_vectors or tgt_vectors."
            )


@dataclass
class ModelConfig:
    embedding_dim: int = 256
    hidden_size: int = 512
    attention_size: Optional[int] = None  # defaults to hidden_size
    encoder_layers: int = 1
    decoder_layers: int = 1
    dropout: float = 0.2  # on embeddings, encoder outputs and the output layer
    rnn_dropout: float = 0.0  # between stacked GRU layers
    # while training, each source token and each target input token is dropped whole (its embedding
    # zeroed, the rest scaled by 1/(1-p)) with this probability: word dropout (Gal & Ghahramani 2016)
    word_dropout: float = 0.0
    # Tying. The output layer reads a pre-output of size E by default, so its (V, E) matrix fits the target
    # embedding. tie_embeddings shares that matrix with the target embedding; tie_src_tgt shares the
    # source embedding with the target one (a joint vocabulary); both together are three-way tying.
    tie_embeddings: bool = False
    tie_src_tgt: bool = False
    # the width of the deep-output layer that feeds the vocabulary projection; None = embedding_dim
    # (which tie_embeddings needs). 512 gives the output layer of Joey NMT's recurrent decoder.
    output_size: Optional[int] = None
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def __post_init__(self) -> None:
        check_positive("model.embedding_dim", self.embedding_dim)
        check_positive("model.hidden_size", self.hidden_size)
        if self.attention_size is not None:
            check_positive("model.attention_size", self.attention_size)
        check_positive("model.encoder_layers", self.encoder_layers)
        check_positive("model.decoder_layers", self.decoder_layers)
        check_probability("model.dropout", self.dropout)
        check_probability("model.rnn_dropout", self.rnn_dropout)
        check_probability("model.word_dropout", self.word_dropout)
        if self.output_size is not None:
            check_positive("model.output_size", self.output_size)
            if self.tie_embeddings and self.output_size != self.embedding_dim:
                raise ConfigError(
                    f"model.tie_embeddings=true shares the target embedding (dimension {self.embedding_dim}) with "
                    f"the output projection, which reads model.output_size={self.output_size} values: set "
                    f"model.output_size={self.embedding_dim} (or leave it unset), or model.tie_embeddings=false."
                )
        emb = self.embeddings
        if self.tie_src_tgt and emb.freeze in ("src", "tgt"):
            raise ConfigError(
                f"model.tie_src_tgt=true makes the source and target embeddings one matrix, so "
                f"model.embeddings.freeze={emb.freeze} cannot freeze one side only: use none or both."
            )
        if self.tie_src_tgt and emb.src_vectors and emb.tgt_vectors and emb.src_vectors != emb.tgt_vectors:
            raise ConfigError(
                f"model.tie_src_tgt=true shares one embedding matrix between source and target, but "
                f"model.embeddings.src_vectors={emb.src_vectors} and tgt_vectors={emb.tgt_vectors} differ: "
                f"give one file (src_vectors) or the same file for both."
            )
        if emb.sparse and self.tie_embeddings:
            raise ConfigError(
                "model.embeddings.sparse=true needs embedding tables with row-sparse gradients, but "
                "model.tie_embeddings=true makes the target table the output layer too, whose gradient is "
                "dense: set one of them to false."
            )


@dataclass
class OptimConfig:
    # adam: weight decay added to the gradient (L2); adamw: weight decay applied to the weights apart from
    # the gradient's scaling (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"); optim=adamw
    name: str = "adam"
    lr: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    # parameters kept out of weight decay: bias (every bias vector), embedding (the embedding tables, and the
    # output projection when it is tied to them); e.g. optim.no_decay=[bias,embedding]
    no_decay: List[str] = field(default_factory=list)
    clip_grad_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.1
    scheduler: str = "plateau"  # plateau | inverse_sqrt | linear | cosine | none
    # plateau: multiply lr by `factor` after `patience` validations without improvement
    factor: float = 0.5
    patience: int = 2
    min_lr: float = 1e-6
    # inverse_sqrt: linear warmup, then lr * sqrt(warmup_steps / step)
    # linear, cosine: linear warmup (0 = none), then a fall from lr to min_lr over the training budget,
    # whichever of trainer.max_steps, trainer.max_time and trainer.max_epochs ends training first
    warmup_steps: int = 1000
    # linear, cosine: from this share of the budget on, every epoch is one cycle: the rate starts the epoch at
    # the fall's value and falls linearly to `cycle_floor` times it by the epoch's end (null = no cycles)
    cycle_from: Optional[float] = None
    cycle_floor: float = 0.1

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, ("adam", "adamw"))
        check_positive("optim.lr", self.lr)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, e.g. [0.9,0.999], got {self.betas}.")
        for beta in self.betas:
            check_probability("optim.betas", beta)
        check_non_negative("optim.weight_decay", self.weight_decay)
        for kind in self.no_decay:
            check_choice("optim.no_decay", kind, ("bias", "embedding"))
        check_non_negative("optim.clip_grad_norm", self.clip_grad_norm)
        check_probability("optim.label_smoothing", self.label_smoothing)
        check_choice("optim.scheduler", self.scheduler, ("plateau", "inverse_sqrt", "linear", "cosine", "none"))
        if not 0 < self.factor < 1:
            raise ConfigError(f"optim.factor must lie in (0, 1), got {self.factor}.")
        check_non_negative("optim.patience", self.patience)
        check_non_negative("optim.min_lr", self.min_lr)
        check_non_negative("optim.warmup_steps", self.warmup_steps)
        if self.scheduler == "inverse_sqrt":
            check_positive("optim.warmup_steps", self.warmup_steps)
        if self.cycle_from is not None:
            check_probability("optim.cycle_from", self.cycle_from)
            if self.scheduler not in ("linear", "cosine"):
                raise ConfigError(f"optim.cycle_from cycles the fall of optim.scheduler=linear or cosine, not "
                                  f"optim.scheduler={self.scheduler}: set one of those, or optim.cycle_from=null.")
        if not 0 < self.cycle_floor <= 1:
            raise ConfigError(f"optim.cycle_floor must lie in (0, 1], got {self.cycle_floor}.")
        if self.scheduler in ("linear", "cosine") and self.min_lr >= self.lr:
            raise ConfigError(f"optim.scheduler={self.scheduler} lowers the learning rate from optim.lr to "
                              f"optim.min_lr, but optim.min_lr={self.min_lr:g} is not below optim.lr={self.lr:g}: "
                              f"lower optim.min_lr.")


@dataclass
class TrainerConfig:
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_epochs: int = 30
    max_steps: int = 0  # 0 = no limit
    max_time: Optional[str] = None  # seconds, or 90s / 45m / 1.5h / H:MM:SS
    validate_every: int = 0  # steps; 0 = once per epoch
    log_every: int = 50  # steps between training lines in metrics.jsonl, and between checks of the speed (CPU)
    early_stopping_metric: str = "bleu"  # bleu | loss | ppl
    patience: int = 5  # validations without improvement before stopping; 0 = never stop early
    min_delta: float = 0.0
    val_beam_size: int = 1  # greedy dev BLEU by default
    val_max_len_ratio: float = 1.5
    resume: bool = False
    deterministic: bool = True
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    max_nonfinite_steps: int = 5  # stop after this many NaN/Inf updates in a row (each is skipped)
    # also keep the weights of the last N validations (checkpoints/val-STEP.pt, model only), for
    # scripts/average_checkpoints.py; 0 = keep none
    keep_checkpoints: int = 0
    # at the end of training, average the weights of the last N validations (needs keep_checkpoints >= N)
    # into checkpoints/averaged.pt; it is validated like the others and becomes best.pt if it scores
    # better; 0 = no averaging
    average_last: int = 0
    # ... of those, only the validations made once this share (0..1) of the training budget was used
    # (trainer.max_time, max_steps or max_epochs, whichever ends training), so that a slower machine,
    # with fewer epochs in its budget, does not average the early ones; 0 = all N
    average_from: float = 0.0
    # a moving average of the weights, updated after every update (nmt/ema.py): validation, best.pt, val-STEP.pt
    # and last.pt's model hold it; 0.999 averages over about the last 1,000 updates, once past its warm-up; 0 = none
    ema_decay: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast for the forward pass; fp16 adds a gradient scaler)
    compile: bool = False  # torch.compile the step of a decoder of 2+ layers; else, or on failure, eager with a warning
    # glibc's malloc keeps freed memory for reuse instead of unmapping large blocks, whose pages then
    # fault afresh at every step (nmt.runtime.keep_freed_memory); false returns memory as usual
    keep_freed_memory: bool = True
    dist_timeout: str = "2h"  # under torchrun: how long a rank waits for the others (rank 0 prepares the data alone)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ConfigError(f"trainer.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N.")
        check_positive("trainer.max_epochs", self.max_epochs)
        check_non_negative("trainer.max_steps", self.max_steps)
        parse_duration("trainer.max_time", self.max_time)
        check_non_negative("trainer.validate_every", self.validate_every)
        check_positive("trainer.log_every", self.log_every)
        check_choice("trainer.early_stopping_metric", self.early_stopping_metric, ("bleu", "loss", "ppl"))
        check_non_negative("trainer.patience", self.patience)
        check_non_negative("trainer.min_delta", self.min_delta)
        check_positive("trainer.val_beam_size", self.val_beam_size)
        check_positive("trainer.val_max_len_ratio", self.val_max_len_ratio)
        check_non_negative("trainer.num_threads", self.num_threads)
        check_positive("trainer.max_nonfinite_steps", self.max_nonfinite_steps)
        check_non_negative("trainer.keep_checkpoints", self.keep_checkpoints)
        check_non_negative("trainer.average_last", self.average_last)
        if self.average_last > self.keep_checkpoints:
            raise ConfigError(
                f"trainer.average_last={self.average_last} averages the weights of the last {self.average_last} "
                f"validations, but trainer.keep_checkpoints={self.keep_checkpoints} keeps only "
                f"{self.keep_checkpoints}: set trainer.keep_checkpoints={self.average_last} (or more).")
        check_probability("trainer.average_from", self.average_from)
        check_probability("trainer.ema_decay", self.ema_decay)
        check_choice("trainer.precision", self.precision, PRECISIONS)
        parse_duration("trainer.dist_timeout", self.dist_timeout)

    @property
    def max_seconds(self) -> Optional[float]:
        return parse_duration("trainer.max_time", self.max_time)

    @property
    def dist_timeout_seconds(self) -> float:
        return parse_duration("trainer.dist_timeout", self.dist_timeout)


@dataclass
class PathsConfig:
    data_dir: str = "data"
    run_dir: Optional[str] = None  # None = outputs/<experiment>/<timestamp>
    # the encoded-corpus and vocabulary cache; None = $NMT_CACHE_DIR, else $XDG_CACHE_HOME/nmt or ~/.cache/nmt
    cache_dir: Optional[str] = None


@dataclass
class TrainConfig:
    name: str = "multi30k_de_en"  # the experiment's name, used in the default run directory
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        if self.model.tie_embeddings and self.model.embeddings.freeze in ("tgt", "both"):
            raise ConfigError(
                "model.tie_embeddings=true shares the target embedding with the output layer, so it cannot "
                "be frozen: set model.embeddings.freeze to none or src, or model.tie_embeddings=false."
            )
        if self.model.tie_src_tgt and not self.data.vocab.joint:
            raise ConfigError(
                "model.tie_src_tgt=true shares one embedding matrix between source and target, which needs one "
                "vocabulary for both: set data.vocab.joint=true, or model.tie_src_tgt=false."
            )
        if self.model.embeddings.sparse and self.optim.weight_decay:
            raise ConfigError(
                f"model.embeddings.sparse=true updates the embeddings with SparseAdam, which has no weight decay, "
                f"but optim.weight_decay={self.optim.weight_decay}: set optim.weight_decay=0 or "
                f"model.embeddings.sparse=false."
            )


@dataclass
class DecodeConfig:
    """Search settings shared by validation, evaluation and translation."""

    PREFIX: ClassVar[str] = ""  # the config key these fields sit under, for messages

    beam_size: int = 5
    alpha: float = 1.0  # GNMT length penalty ((5 + len) / 6) ** alpha; 0 = raw log-probability
    max_len_ratio: float = 1.5  # outputs stop at ratio * source length + 5 pieces
    n_best: int = 1
    # sentences per decoding batch: on a 2-core CPU, 128 took 8% less time than 64 to decode test2016 at
    # beam 5 and 13% less greedy, with the same translations (docs/speed.md)
    batch_size: int = 128
    # bf16: the search's matrix products in bfloat16 (autocast); 1.3x to 1.8x faster beam search on a
    # CPU with bf16 matrix units, at the same test2016 BLEU for our Multi30k run (docs/speed.md)
    precision: str = "fp32"  # fp32 | bf16

    def __post_init__(self) -> None:
        key = self.PREFIX
        check_choice(f"{key}precision", self.precision, ("fp32", "bf16"))
        check_positive(f"{key}beam_size", self.beam_size)
        check_non_negative(f"{key}alpha", self.alpha)
        check_positive(f"{key}max_len_ratio", self.max_len_ratio)
        check_positive(f"{key}n_best", self.n_best)
        if self.n_best > self.beam_size:
            raise ConfigError(f"{key}n_best ({self.n_best}) cannot exceed {key}beam_size ({self.beam_size}).")
        check_positive(f"{key}batch_size", self.batch_size)


@dataclass
class EvalOptions(DecodeConfig):
    PREFIX: ClassVar[str] = "eval."

    checkpoint: str = "best"  # best | last | step0 | averaged | val-STEP, or a path to a .pt file
    # more checkpoints of the run (same choices) that decode together with `checkpoint`, their
    # next-token probabilities averaged at every step: an ensemble, e.g. [val-00003278,val-00003420]
    ensemble: List[str] = field(default_factory=list)
    # test | val, or for a Multi30k run another of its test sets: test_2016_flickr, test_2017_flickr,
    # test_2017_mscoco, test_2018_flickr (downloaded on first use); ignored when src/ref are given
    split: str = "test"
    src: Optional[str] = None  # your own source file ...
    ref: Optional[str] = None  # ... and its reference translations

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in ("test", "val") and not self.split.startswith("test_"):
            raise ConfigError(f"eval.split={self.split!r} is not a split: use test or val, another Multi30k test "
                              f"set such as test_2017_flickr, or eval.src and eval.ref for your own files.")
        if (self.src is None) != (self.ref is None):
            raise ConfigError("eval.src and eval.ref go together: give both files, or neither to score a split.")


@dataclass
class EvaluateConfig:
    run: str = "???"  # the run directory made by nmt-train
    device: str = "auto"
    data_dir: Optional[str] = None  # where the run's data set lives; default: the run's paths.data_dir
    eval: EvalOptions = field(default_factory=EvalOptions)


@dataclass
class TranslateOptions(DecodeConfig):
    PREFIX: ClassVar[str] = "translate."

    checkpoint: str = "best"
    ensemble: List[str] = field(default_factory=list)  # as eval.ensemble
    input: Optional[str] = None  # a file; default: stdin (a prompt when stdin is a terminal)
    output: Optional[str] = None  # a file; default: stdout
    attention_dir: Optional[str] = None  # write one attention heatmap PNG per sentence here
    max_src_len: int = 250  # longer inputs are cut to this many pieces, with a warning

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("translate.max_src_len", self.max_src_len)


@dataclass
class TranslateConfig:
    run: str = "???"
    device: str = "auto"
    translate: TranslateOptions = field(default_factory=TranslateOptions)


@dataclass
class InspectConfig:
    """nmt-embeddings: look into the embedding tables of a trained run."""

    run: str = "???"
    checkpoint: str = "best"  # best | last | step0, or a path to a .pt file
    side: str = "src"  # src | tgt
    query: Optional[str] = None  # a word or phrase (its pieces' vectors averaged), or a piece such as ▁Hund
    analogy: Optional[str] = None  # vector arithmetic, e.g. 'König - Mann + Frau'
    k: int = 10  # neighbours to print
    export: Optional[str] = None  # write the side's vectors to this file, word2vec text format
    plot: Optional[str] = None  # draw a 2-D PCA map of the most frequent pieces to this PNG
    plot_pieces: int = 100  # how many of the most frequent training pieces the map shows
    data_dir: Optional[str] = None  # where the run's data set lives (plot counts pieces); default: the run's

    def __post_init__(self) -> None:
        check_choice("side", self.side, ("src", "tgt"))
        check_positive("k", self.k)
        if self.plot_pieces < 2:
            raise ConfigError(f"plot_pieces must be at least 2, got {self.plot_pieces}.")
        if not any((self.query, self.analogy, self.export, self.plot)):
            raise ConfigError(
                "Nothing to do: add query=WORD, analogy='a - b + c', export=FILE (word2vec text) or plot=FILE.png."
            )
