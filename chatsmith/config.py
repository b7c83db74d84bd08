"""Configuration: one frozen dataclass per section, stages composed of sections, presets as plain functions.

Every field of every section becomes a `--kebab-case` flag whose help is the field's `help` metadata, so the
dataclasses are the single source of truth for defaults, `--help` and the `config.json` saved with every run.
Precedence: dataclass default < preset < command-line flag.

    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--depth", "2"])
    cfg.model.depth  # 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import UserError, atomic_write_json
from .model import ModelConfig
from .presets_gpu import GPU_PRESETS


def opt(default, help: str, alias: str = "", *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, length: int | None = None, positional: bool = False):
    """A dataclass field with a default, the help text its command-line flag shows, an optional second flag (a short
    one like -p, or another long name), and the values it accepts: `min`/`max` bound a number (inclusive), `choices`
    lists the allowed values, `length` the number of values of a tuple. `make` checks every field against them
    (and every float for NaN and infinity), so a bad value ends in one sentence that names the flag, never in a
    traceback deep inside a stage. `positional` also
    accepts the value as an optional bare word (`chatsmith report cpu` = `chatsmith report --run cpu`)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: configs are frozen")
    return field(default=default, metadata={"help": help, "alias": alias, "min": min, "max": max,
                                            "choices": choices, "length": length, "positional": positional})


# ---------------------------------------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class RunConfig:
    run: str = opt("", "run name under $CHATSMITH_HOME/runs; default: the preset name (under torchrun write "
                       "--run-name: torchrun's own --run-path makes --run ambiguous to it)", alias="--run-name")
    preset: str = opt("cpu", "preset: smoke (tests, seconds), cpu (the CPU speedrun, minutes), gpu-d12 (one "
                             "80 GB GPU) or gpu-d20 (one 8-GPU node)")
    seed: int = opt(1337, "random seed for everything (also the order of the training data)", min=0, max=2**32 - 1)


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = opt(
        ("pkg:sharegpt", "pkg:people-daily", "pkg:idioms", "pkg:chatterbot"),
        "document sources: local:PATH, hf:NAME[:CONFIG]:SPLIT, pkg:sharegpt|people-daily|idioms|chatterbot",
    )
    val_fraction: float = opt(0.01, "fraction of documents held out for validation (by document hash)", min=0.0,
                               max=0.9)
    max_docs: int = opt(0, "stop after this many documents per source; 0 means all", min=0, max=10**12)
    train_fraction: float = opt(1.0, "share of the training documents kept, chosen by a hash of the text (the same "
                                     "ones on every machine, every source in proportion); validation keeps all",
                                min=1e-6, max=1.0)
    text_field: str = opt("text", "field holding the text in jsonl and parquet sources")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = opt(32768, "BPE vocabulary size including special tokens", min=272, max=2**24)
    train_chars: int = opt(200_000_000, "characters of training documents the BPE is trained on", min=1,
                          max=10**12)


@dataclass(frozen=True)
class ShardConfig:
    shard_docs: int = opt(2048, "documents per token shard", min=1, max=10**9)
    workers: int = opt(0, "tokenizer processes for data prepare; 0 means one per CPU core", min=0, max=4096)


@dataclass(frozen=True)
class OptimConfig:
    matrix_lr: float = opt(0.02, "Muon learning rate for hidden weight matrices", min=0.0, max=10.0)
    embed_lr: float = opt(0.2, "AdamW learning rate for the token embedding (scaled by 1/sqrt(width/768))",
                           min=0.0, max=10.0)
    head_lr: float = opt(0.004, "AdamW learning rate for the output head (scaled by 1/sqrt(width/768))",
                          min=0.0, max=10.0)
    scalar_lr: float = opt(0.04, "AdamW learning rate for norm weights (scaled by 1/sqrt(width/768))",
                            min=0.0, max=10.0)
    weight_decay: float = opt(0.0, "decoupled weight decay on hidden matrices", min=0.0, max=1.0)
    adam_betas: tuple[float, ...] = opt((0.8, 0.95), "AdamW betas: two numbers", min=0.0, max=0.9999999,
                                          length=2)
    adam_eps: float = opt(1e-10, "AdamW epsilon", min=0.0, max=1.0)
    warmup_frac: float = opt(0.0, "fraction of steps spent warming the learning rate up", min=0.0, max=1.0)
    warmdown_frac: float = opt(0.2, "fraction of steps at the end spent decaying the learning rate to zero",
                               min=0.0, max=1.0)
    final_lr_frac: float = opt(0.0, "learning rate at the very end, as a fraction of the peak", min=0.0,
                               max=1.0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(1000, "optimizer steps", min=1, max=10**9)
    device_batch: int = opt(8, "sequences per forward pass", min=1, max=2**16)
    batch_tokens: int = opt(0, "tokens per optimizer step over all processes (gradient accumulation makes up the "
                               "rest); 0 means one forward pass per process", min=0, max=2**40)
    eval_every: int = opt(100, "steps between validation bits-per-byte evaluations; 0 turns them off", min=0,
                            max=10**9)
    eval_tokens: int = opt(65536, "validation tokens per evaluation", min=1, max=2**40)
    ckpt_every: int = opt(200, "steps between checkpoints (one is always written at the end)", min=1,
                            max=10**9)
    keep_last: int = opt(3, "valid checkpoints to keep (corrupt ones do not count); 0 keeps all", min=0,
                          max=10**6)
    sample_every: int = opt(0, "steps between sample generations; 0 means at every checkpoint and at the end",
                              min=0, max=10**9)
    device: str = opt("auto", "auto, cpu, cuda or mps")
    precision: str = opt("auto", "auto (measured: bf16 where a short matmul probe finds it faster than "
                                  "fp32, cached per machine; bf16 on CUDA >= sm80), bf16 or fp32",
                         choices=("auto", "bf16", "fp32"))
    compile: bool = opt(False, "torch.compile the model (pays off on long GPU runs; costs minutes on CPU)")
    parallel: str = opt("ddp", "under torchrun: ddp (every rank holds the whole model and optimizer) or fsdp (FSDP2: "
                               "parameters, gradients and optimizer state sharded over the ranks, for models that "
                               "do not fit with ddp)", choices=("ddp", "fsdp"))
    threads: int = opt(0, "torch intra-op threads on CPU; 0 leaves torch's default", min=0, max=4096)
    resume: bool = opt(False, "continue the run from its latest valid checkpoint")
    allow_schedule_change: bool = opt(False, "with --resume: continue although --steps, the batch, --seed or the "
                                             "optimizer flags differ from the checkpoint's (the learning-rate "
                                             "schedule or the data order then differ from the uninterrupted run's)")
    keep_tails: bool = opt(False, "pretraining: split documents longer than the context into context-sized pieces "
                                  "instead of dropping their tails (the counts are in data_stats.json either way)")


@dataclass(frozen=True)
class SFTDataConfig:
    mixture: tuple[str, ...] = opt(
        ("identity:0.3", "arithmetic:1", "idioms:0.5", "sharegpt:1", "chatterbot:1"),
        "conversation sources as name:weight (identity, arithmetic, idioms, sharegpt, chatterbot); a source brings "
        "max_convs * weight / (largest weight) conversations",
    )
    max_convs: int = opt(1000, "train conversations of the heaviest source (the others in proportion to their weight)",
                         min=1, max=10**9)
    val_convs: int = opt(50, "val conversations of the heaviest source (the others in proportion to their weight)",
                         min=1, max=10**9)
    max_chars: int = opt(2000, "cut conversations to this many characters at a message boundary; 0 keeps them whole",
                         min=0, max=10**12)


@dataclass(frozen=True)
class ChatCheckConfig:
    check_prompts: int = opt(200, "held-out prompts answered after SFT to check replies end with <|im_end|>; 0: skip",
                             min=0, max=10**6)
    check_zh_prompts: int = opt(100, "how many of them are Chinese (to check Chinese prompts get Chinese replies)",
                                min=0, max=10**6)
    check_max_tokens: int = opt(384, "reply length limit for those checks (a reply cut by it counts as not ended)",
                                min=1, max=2**20)
    check_identity: int = opt(100, "identity phrasings asked (chatsmith/checks.py: none is in the SFT data; English "
                                   "and Chinese alternate); 0: skip", min=0, max=100)
    check_arithmetic: int = opt(200, "held-out 2-3-digit +, -, x problems asked (half English, half Chinese); 0: skip",
                                min=0, max=10**5)
    check_slots: int = opt(16, "replies the checks decode together (engine slots)", min=1, max=1024)


@dataclass(frozen=True)
class SpeedrunConfig:
    minutes: float = opt(0.0, "rescale the step budgets of pretraining, SFT and RL by minutes / --budget-minutes "
                              "(the fixed stages, tokenizer, data and evaluation, do not scale); 0 keeps the preset's",
                         min=0.0, max=10**6)
    budget_minutes: float = opt(15.0, "the wall minutes the preset's step budgets are sized for (the cpu preset: 15 "
                                      "on a 2-core CPU)", min=0.01, max=10**6)
    rl: bool = opt(True, "run the RL stage (GRPO with the calculator, on the RL --task) after SFT")
    eval_limit: int = opt(200, "items per task when the speedrun evaluates its models (`chatsmith eval` runs whole "
                               "sets on request); 0 skips the evaluation", min=0, max=10**9)
    eval_full: tuple[str, ...] = opt(("arc_easy",), "tasks evaluated on more items than --eval-limit (for an "
                                                   "interval narrow enough to tell the model from chance)")
    eval_full_limit: int = opt(0, "items of each --eval-full task (a seeded subset); 0 = the whole set", min=0,
                               max=10**9)
    chat_tasks: tuple[str, ...] = opt(("arc_easy", "mmlu", "idioms", "arithmetic"),
                                      "tasks the chat models (SFT and RL) are evaluated on")
    eval_max_tokens: int = opt(256, "reply length limit of the generative tasks in that evaluation", min=1,
                               max=10**6)


# ---------------------------------------------------------------------------------------------------------------------
# stages: each is a dataclass of sections


@dataclass(frozen=True)
class TokenizerStage:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()


@dataclass(frozen=True)
class DataStage:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    shards: ShardConfig = ShardConfig()


@dataclass(frozen=True)
class PretrainStage:
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()


# SFT continues from weights whose schedule ended at zero: a quarter of the pretraining rates, decayed to zero
SFT_OPTIM = OptimConfig(matrix_lr=0.005, embed_lr=0.05, head_lr=0.001, scalar_lr=0.01, warmdown_frac=1.0)
SFT_TRAIN = TrainConfig(steps=200, eval_every=50, ckpt_every=100, eval_tokens=32768)


@dataclass(frozen=True)
class SFTStage:
    run: RunConfig = RunConfig()
    sft: SFTDataConfig = SFTDataConfig()
    checks: ChatCheckConfig = ChatCheckConfig()
    sft_optim: OptimConfig = SFT_OPTIM
    sft_train: TrainConfig = SFT_TRAIN


# RL (chatsmith/rl.py): GRPO on the chat model; its sections live here so the speedrun can hold them
RL_TASKS = ("arithmetic", "chain_sum", "calc", "gsm_symbolic", "gsm8k", "checks", "calc_checks", "identity",
            "assistant", "seven")


@dataclass(frozen=True)
class RLConfig:
    task: str = opt("arithmetic", "reward environment: " + ", ".join(RL_TASKS) + " (see the module docstring of "
                                  "chatsmith/rl.py)", choices=RL_TASKS)
    reward: str = opt("", "a custom reward module:function(conversation, answer) -> float that replaces the task's "
                          "scorer (the conversation: the question and the reply's messages; answer: the reference)")
    format_weight: float = opt(0.0, "reward added when every tool call of a reply is well formed (and one was made)",
                               min=0.0, max=10.0)
    prompts: int = opt(8, "questions per step", min=1, max=4096)
    group: int = opt(8, "replies sampled per question (GRPO's group; TRL's num_generations)", min=2, max=256)
    max_tokens: int = opt(64, "most tokens per reply round", min=1, max=65536)
    temperature: float = opt(1.0, "sampling temperature of the rollouts", min=0.05, max=10.0)
    top_k: int = opt(0, "sample the rollouts from the k most likely tokens; 0 = off", min=0, max=2**24)
    tools: bool = opt(True, "let rollouts call the calculator (its output is masked out of the loss)")
    max_tool_calls: int = opt(2, "most tool calls in one reply", min=0, max=16)
    iterations: int = opt(1, "optimisation passes over each batch of rollouts (the clip matters from the second)",
                          min=1, max=64)
    clip_eps: float = opt(0.2, "PPO clip range: the ratio is clipped to [1 - eps, 1 + eps]", min=0.0, max=1.0)
    kl_beta: float = opt(0.0, "weight of the KL penalty to the frozen starting model (k3 estimator); 0 = off",
                         min=0.0, max=100.0)
    advantage: str = opt("group", "group: (r - mean) / std within the group (GRPO); mean: r - mean (Dr. GRPO)",
                         choices=("group", "mean"))
    slots: int = opt(16, "sequences the rollout engine decodes together (1: each alone, bit-reproducible)",
                     min=1, max=1024)
    eval_prompts: int = opt(100, "held-out questions answered greedily at the start and the end (accuracy in "
                                 "metrics); 0 = skip", min=0, max=100000)


RL_OPTIM = OptimConfig(matrix_lr=0.002, embed_lr=0.02, head_lr=0.0004, scalar_lr=0.004, warmup_frac=0.0,
                       warmdown_frac=1.0)
RL_TRAIN = TrainConfig(steps=30, device_batch=8, eval_every=0, ckpt_every=10, keep_last=2)


@dataclass(frozen=True)
class RLStage:
    run: RunConfig = RunConfig()
    rl: RLConfig = RLConfig()
    rl_optim: OptimConfig = RL_OPTIM
    rl_train: TrainConfig = RL_TRAIN
    checks: ChatCheckConfig = ChatCheckConfig()  # the assistant checks at the end (chatsmith/checks.py)


@dataclass(frozen=True)
class SpeedrunStage:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    shards: ShardConfig = ShardConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sft: SFTDataConfig = SFTDataConfig()
    checks: ChatCheckConfig = ChatCheckConfig()
    sft_optim: OptimConfig = SFT_OPTIM
    sft_train: TrainConfig = SFT_TRAIN
    rl: RLConfig = RLConfig()
    rl_optim: OptimConfig = RL_OPTIM
    rl_train: TrainConfig = RL_TRAIN
    speedrun: SpeedrunConfig = SpeedrunConfig()


# ---------------------------------------------------------------------------------------------------------------------
# presets: plain functions returning {section: {field: value}} overrides


def preset_smoke() -> dict[str, dict[str, Any]]:
    """Tiny corpus, tiny vocabulary, tiny model: for tests."""
    return {
        "data": {"max_docs": 300},
        "tokenizer": {"vocab_size": 1024, "train_chars": 2_000_000},
        "shards": {"shard_docs": 256},
        "model": {"depth": 2, "aspect": 32, "head_dim": 32, "seq_len": 128},
        "train": {"steps": 20, "device_batch": 4, "eval_every": 10, "eval_tokens": 4096, "ckpt_every": 10},
        "sft": {"max_convs": 60, "val_convs": 10},
        "checks": {"check_prompts": 8, "check_zh_prompts": 4, "check_max_tokens": 16, "check_identity": 8,
                   "check_arithmetic": 8},
        "sft_train": {"steps": 10, "device_batch": 4, "eval_every": 5, "eval_tokens": 2048, "ckpt_every": 5},
        "rl": {"prompts": 2, "group": 2, "max_tokens": 16, "eval_prompts": 4},
        "rl_train": {"steps": 2, "ckpt_every": 1},
        "speedrun": {"eval_limit": 4, "eval_max_tokens": 16, "eval_full": (), "budget_minutes": 1.0},
    }


def preset_cpu() -> dict[str, dict[str, Any]]:
    """The CPU speedrun: sized for 15 minutes on a 2-core CPU (README's measured table has the times and the
    tuning table the alternatives measured).

    Vocabulary 8192, not the default 32768: at width 256 the output head is most of the model's FLOPs (8192 x 256 =
    2.1M head weights beside 3.4M in the blocks; 32768 would make it 8.4M, and a step ~1.9x as long): the model is
    then the bench-ref shape, which `chatsmith bench train` measures."""
    return {
        "data": {"train_fraction": 0.3},
        "tokenizer": {"vocab_size": 8192, "train_chars": 10_000_000},
        "model": {"depth": 4, "aspect": 64, "head_dim": 64, "seq_len": 512},
        "train": {"steps": 280, "device_batch": 8, "eval_every": 140, "eval_tokens": 65536, "ckpt_every": 70},
        "sft": {"mixture": ("identity:1", "arithmetic:4", "idioms:0.5", "sharegpt:1", "chatterbot:1"),
                "max_convs": 3000, "max_chars": 1000},
        "sft_optim": {"matrix_lr": 0.01, "embed_lr": 0.1, "head_lr": 0.002, "scalar_lr": 0.02},
        "sft_train": {"steps": 280, "device_batch": 8, "eval_every": 140, "eval_tokens": 32768, "ckpt_every": 70},
        "rl": {"task": "assistant", "prompts": 16, "group": 8, "eval_prompts": 50, "slots": 64},
        "rl_train": {"steps": 12, "ckpt_every": 4},
        "speedrun": {"eval_limit": 100, "eval_full": (),
                     "chat_tasks": ("calc", "arithmetic", "mmlu", "idioms")},
    }


PRESETS = types.MappingProxyType({"smoke": preset_smoke, "cpu": preset_cpu, **GPU_PRESETS})  # GPU: presets_gpu.py


# ---------------------------------------------------------------------------------------------------------------------
# flags <-> dataclasses


def _sections(stage_cls) -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else type(f.default) for f in dataclasses.fields(stage_cls)}


def _section_defaults(stage_cls) -> dict[str, Any]:
    """The default instance of each section of a stage (a stage may set its own, e.g. SFT's learning rates)."""
    return {f.name: f.default for f in dataclasses.fields(stage_cls)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_names(stage_cls) -> dict[tuple[str, str], str]:
    """{(section, field): --flag} as `build_parser` names them (a field name an earlier section already used gets
    the section as prefix: --model-vocab-size)."""
    names: dict[tuple[str, str], str] = {}
    seen: set[str] = set()
    for section, section_cls in _sections(stage_cls).items():
        for f in dataclasses.fields(section_cls):
            names[(section, f.name)] = _flag(f"{section}_{f.name}" if f.name in seen else f.name)
            seen.add(f.name)
    return names


def _check_value(flag: str, value: Any, meta: Any) -> None:
    """UserError unless `value` is finite and within the field's min/max/choices (each element of a tuple)."""
    values = value if isinstance(value, tuple) else (value,)
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if meta.get("length") is not None and len(values) != meta["length"]:
        raise UserError(f"{flag} takes {meta['length']} values, not {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        if choices is not None and v not in choices:
            raise UserError(f"{flag} must be one of {', '.join(map(str, choices))}, not {v!r}")
        if isinstance(v, str):
            continue
        if v != v or v in (float("inf"), float("-inf")):
            raise UserError(f"{flag} must be a finite number, not {v}")
        if lo is not None and v < lo:
            raise UserError(f"{flag} must be at least {lo}, not {v}")
        if hi is not None and v > hi:
            raise UserError(f"{flag} must be at most {hi}, not {v}")


def check(cfg) -> None:
    """Check every field of a built stage config against its declared range (see `opt`); UserError naming the flag."""
    flags = flag_names(type(cfg))
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            _check_value(flags[(section.name, f.name)], getattr(values, f.name), f.metadata)


def _field_types(section_cls) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a value of the wrong type, an unknown flag) are a UserError: one sentence naming the
    flag, exit code 2 through `__main__`, instead of the usage text and SystemExit."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser(stage_cls, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of every section of `stage_cls` (defaults left unset)."""
    parser = _Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    names = flag_names(stage_cls)
    defaults = _section_defaults(stage_cls)
    for section, section_cls in _sections(stage_cls).items():
        group = parser.add_argument_group(section)
        hints = _field_types(section_cls)
        for f in dataclasses.fields(section_cls):
            flag = names[(section, f.name)]
            kind = hints[f.name]
            help_text = f.metadata.get("help", "") + f" (default: {getattr(defaults[section], f.name)!r})"
            dest = f"{section}.{f.name}"
            flags = [flag, *([f.metadata["alias"]] if f.metadata.get("alias") else [])]
            if kind is bool:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
            elif typing.get_origin(kind) is tuple:
                elem = typing.get_args(kind)[0]
                group.add_argument(*flags, dest=dest, nargs="+", type=elem, help=help_text, metavar="X")
            else:
                group.add_argument(*flags, dest=dest, type=kind, help=help_text, metavar=kind.__name__.upper())
            if f.metadata.get("positional"):  # the same value as a bare word; the flag wins when both are given
                group.add_argument(dest, nargs="?", type=kind, metavar=f.name.upper(), help=f"same as {flag}")
    return parser


def make(stage_cls, overrides: dict[str, dict[str, Any]] | None = None):
    """Build a stage config: defaults < preset (named by overrides['run']['preset']) < overrides."""
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    preset = overrides.get("run", {}).get("preset", RunConfig().preset)
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    merged: dict[str, dict[str, Any]] = {}
    for source in (PRESETS[preset](), overrides):
        for section, values in source.items():
            merged.setdefault(section, {}).update(values)
    sections = _sections(stage_cls)
    defaults = _section_defaults(stage_cls)
    built = {}
    for section, section_cls in sections.items():
        values = merged.get(section, {})
        names = {f.name for f in dataclasses.fields(section_cls)}
        hints = _field_types(section_cls)
        kwargs = {}
        for key, value in values.items():
            if key in names:
                kwargs[key] = tuple(value) if typing.get_origin(hints[key]) is tuple else value
        built[section] = dataclasses.replace(defaults[section], **kwargs)
    run = built.get("run")
    if run is not None and not run.run:
        built["run"] = dataclasses.replace(run, run=run.preset)
    cfg = stage_cls(**built)
    check(cfg)
    return cfg


def parse(stage_cls, argv: list[str] | None, prog: str = "chatsmith", description: str = ""):
    """Parse command-line flags into a stage config."""
    parser = build_parser(stage_cls, prog, description)
    ns = vars(parser.parse_args(argv))
    overrides: dict[str, dict[str, Any]] = {}
    for dest, value in ns.items():
        section, name = dest.split(".", 1)
        overrides.setdefault(section, {})[name] = value
    return make(stage_cls, overrides)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(stage_cls, d: dict[str, Any]):
    """Rebuild a stage config saved with `save` (unknown keys are ignored, missing ones take defaults)."""
    sections = _sections(stage_cls)
    defaults = _section_defaults(stage_cls)
    built = {}
    for section, section_cls in sections.items():
        names = {f.name for f in dataclasses.fields(section_cls)}
        hints = _field_types(section_cls)
        values = {k: v for k, v in d.get(section, {}).items() if k in names}
        for k, v in values.items():
            if typing.get_origin(hints[k]) is tuple:
                values[k] = tuple(v)
        built[section] = dataclasses.replace(defaults[section], **values)
    return stage_cls(**built)


def save(cfg, path: Path, stage: str) -> None:
    """Record the resolved config of `stage` in the run's config.json ({stage: config}, other stages kept)."""
    path = Path(path)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        saved = {}
    saved[stage] = to_dict(cfg)
    atomic_write_json(path, saved)


def dumps(cfg) -> str:
    return json.dumps(to_dict(cfg), indent=2, ensure_ascii=False)
