"""`chatsmith report [RUN]`: the run's report card, `<run>/report.md`, with PNG plots in `<run>/plots/`.

    chatsmith report              # the newest run
    chatsmith report cpu          # the run named cpu (same as --run cpu)

It tells the run's story from the files the stages left in the run directory; nothing is retrained or re-evaluated:
machine and versions (`speedrun.json`, the checkpoints' `meta.json`), the resolved config (`config.json`), wall time
per stage (`speedrun.json`), the tokenizer beside GPT-2, cl100k and o200k (measured once by tokenizer_eval.py and
kept in `tokenizer_eval.json`), pretraining and SFT (`metrics.jsonl`, `chat/metrics.jsonl`, `chat/chat_checks.json`),
the evaluation tables (`eval/<stage>_stepNNNNNN.json`) beside published reference rows, the assistant checks of the SFT
and RL models (`chat/` and `rl/chat_checks.json`, chatsmith/checks.py), and samples in English and Chinese. A section
whose data is missing says so in one line. `chatsmith speedrun` ends by writing it.

Choices: the plots are drawn by plots.py (matplotlib, Agg: PNG files only, no display needed); every reference number
is copied from the source named in its row, in the metric and shot count named there; the report's own numbers are
printed as the files hold them (4 decimals), so a reader can grep them back.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checks
from .common import UserError, atomic_write_json, atomic_write_text, cpu_flags, latest_run, log, run_dir
from .config import opt
from .plots import plot_eval, plot_loss, plot_lr, plot_throughput

# CPU features that decide how fast training runs here (bf16/int8 matmul units, vector width)
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8", "sve", "asimd")

# Published rows, copied from the source each names. task -> (metric, value); compare only where the metric and the
# setting (shots, prompt format) match ours; the "setting" column says which they are.
REFERENCES: dict[str, tuple[dict[str, Any], ...]] = {
    "base": (
        {"model": "Pythia-70M (v1.1, step 143000)", "setting": "0-shot, lm-evaluation-harness (2023)",
         "scores": {"arc_easy": ("acc_norm", 0.3502), "arc_challenge": ("acc_norm", 0.2210),
                    "piqa": ("acc_norm", 0.5914)},
         "source": "EleutherAI/pythia, evals/pythia-v1/pythia-70m/zero-shot/70m_step143000.json"},
        {"model": "GPT-2 124M (OpenAI)", "setting": "0-shot, lm-evaluation-harness",
         "scores": {"hellaswag": ("acc_norm", 0.3114)},
         "source": "karpathy/llm.c, dev/data/hellaswag.py docstring (\"eleuther harness reports acc 28.92%, "
                   "acc_norm 31.14%\")"},
    ),
    "chat": (
        {"model": "nanochat d20 (SFT, 561M)", "setting": "chat format, answer letter / generation",
         "scores": {"arc_easy": ("acc", 0.3876), "arc_challenge": ("acc", 0.2807), "mmlu": ("acc", 0.3151),
                    "gsm8k": ("exact", 0.0455), "humaneval": ("pass@1", 0.0854)},
         "source": "karpathy/nanochat README.md, speedrun report card (Oct 2025), SFT column"},
    ),
}


@dataclass(frozen=True)
class ReportConfig:
    run: str = opt("", "run under $CHATSMITH_HOME/runs; default: the newest run", positional=True)
    tokenizer_eval: bool = opt(True, "measure the tokenizer table when the run has none saved (reads held-out text)")


@dataclass(frozen=True)
class ReportStage:
    report: ReportConfig = ReportConfig()


# ---------------------------------------------------------------------------------------------------------------------
# reading the run directory


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, speed-relevant CPU flags, GPUs, and the platform of this machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = round(int(line.split()[1]) / 2**20, 1)  # kB -> GiB
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    flags = cpu_flags()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "gpus": gpus,
            "cpu_flags": [f for f in SPEED_FLAGS if f in flags], "platform": platform.platform()}


def _read(path: Path) -> Any:
    """JSON at `path`, or None when it is missing or unreadable (a report never fails on one bad file)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _latest_meta(root: Path) -> dict | None:
    """meta.json of the newest step_N checkpoint under `root` (no checksum pass: the report only reads it)."""
    for path in sorted(root.glob("step_*/meta.json"), reverse=True):
        meta = _read(path)
        if isinstance(meta, dict):
            return {**meta, "checkpoint": path.parent.name}
    return None


def eval_results(run: Path) -> dict[str, dict]:
    """The newest evaluation result per model ("base", "chat" after SFT, "rl" after RL), as evaluate.load_results
    reads them: the one with the highest step, the newest of those."""
    from . import evaluate

    best: dict[str, dict] = {}
    for res in evaluate.load_results(run):  # oldest first
        stage = res.get("stage")
        if stage not in evaluate.STAGES or not isinstance(res.get("tasks"), dict):
            continue
        model = res.get("model") or ("base" if stage == "base" else "sft")
        if (stage == "base") != (model == "base"):  # a chat model scored as a base model is not the base model
            continue
        key = "rl" if model == "rl" else stage
        if key not in best or res.get("step", 0) >= best[key].get("step", 0):
            path = evaluate.result_path(run, stage, res.get("step", 0), kind=res.get("model", ""))
            best[key] = {**res, "file": str(path.relative_to(run))}
    return best


def tokenizer_table(run: Path, saved_config: dict, measure: bool) -> dict | None:
    """tokenizer_eval.main's results for this run, kept in `<run>/tokenizer_eval.json` and measured again only when
    the tokenizer or the baseline rank files found changed."""
    tok_file = run / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from . import tokenizer_eval

    found = sorted(str(d / f"{stem}.tiktoken") for d in tokenizer_eval.tiktoken_dirs("")
                   for stem, _, _ in tokenizer_eval.BASELINES.values() if (d / f"{stem}.tiktoken").is_file())
    key = {"tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(), "rank_files": found}
    cache = run / "tokenizer_eval.json"
    saved = _read(cache)
    if isinstance(saved, dict) and {k: saved.get(k) for k in key} == key:
        return saved["results"]
    if not measure:
        return None
    from . import config

    section = saved_config.get("tokenizer") or saved_config.get("speedrun") or {}
    data = config.from_dict(config.TokenizerStage, section).data
    name = run.name
    stage = tokenizer_eval.EvalStage(run=config.RunConfig(run=name, preset=section.get("run", {}).get("preset",
                                                                                                       "cpu")),
                                     data=data)
    log("report: measuring the tokenizer on held-out text (once; kept in tokenizer_eval.json)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # main prints its table; the report shows it instead
            results = tokenizer_eval.main(stage)
    except UserError as e:  # e.g. a source package that is no longer installed
        return {"rows": {}, "notes": [f"not measured: {e}"], "vocab_size": None}
    atomic_write_json(cache, {**key, "results": results})
    return results


def model_numbers(meta: dict | None) -> dict | None:
    """Parameters and training FLOPs per token of the model in a checkpoint's meta.json (built on the meta device:
    no memory, no weights)."""
    if not meta or not isinstance(meta.get("config", {}).get("model"), dict):
        return None
    import dataclasses

    import torch

    from .model import GPT, ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg = ModelConfig(**{k: v for k, v in meta["config"]["model"].items() if k in names}).resolve()
    with torch.device("meta"):
        model = GPT(mcfg)
    return {"params": model.num_params(), "non_embedding": model.num_params(non_embedding=True),
            "flops_per_token": model.flops_per_token(), "config": mcfg}


# ---------------------------------------------------------------------------------------------------------------------
# formatting


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\r", "").replace("\n", " ⏎ ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------------------------------
# sections


def _machine_lines(speedrun: dict | None) -> list[str]:
    info = (speedrun or {}).get("machine")
    where = "recorded by the speedrun"
    if not info:
        info, where = machine_info(), "the machine writing this report: the run recorded none"
    gpus = ", ".join(info.get("gpus") or []) or "none"
    return [f"- CPU: {info.get('cpu')}, {info.get('cores')} cores; memory {info.get('memory_gib')} GiB; GPU: {gpus} "
            f"({where})",
            f"- CPU flags that matter for speed: {', '.join(info.get('cpu_flags') or []) or 'none of those known'}",
            f"- platform: {info.get('platform')}"]


def _timing_lines(speedrun: dict | None) -> list[str]:
    stages = (speedrun or {}).get("stages") or {}
    if not stages:
        return ["No stage times recorded (`speedrun.json` is missing: the run was not made by `chatsmith speedrun`).",
                ""]
    order = ("tokenizer", "data", "pretrain", "sft", "rl", "eval base", "eval base (whole sets)", "eval chat",
             "eval sft", "eval sft (whole sets)", "eval rl", "eval rl (whole sets)", "report")
    def rank(name: str) -> tuple:  # pipeline order; "eval sft (500 items)" right after "eval sft (whole sets)"
        base = name.split(" (")[0] + " (whole sets)" if " (" in name else name
        return (order.index(base) if base in order else len(order), name)

    names = sorted(stages, key=rank)
    rows = [[n, _f(stages[n].get("seconds", 0.0), 1), _duration(stages[n].get("seconds", 0.0))] for n in names]
    total = sum(rec.get("seconds", 0.0) for rec in stages.values())
    rows.append(["**total**", _f(total, 1), _duration(total)])
    lines = _table(["stage", "seconds", "wall"], rows)
    lines.append("Times add up over reruns: an interrupted speedrun that was resumed shows the sum of its attempts.")
    return lines + [""]


def _tokenizer_lines(table: dict | None) -> list[str]:
    if not table:
        return ["No tokenizer table: the run has no tokenizer, or it was not measured (`chatsmith tokenizer eval`).",
                ""]
    cols = ["chatsmith", "gpt2", "cl100k", "o200k"]
    rows = [[group, _f(row.get("bytes", 0) / 1e6, 2), row.get("docs")] + [_f(row.get(c), 3) if row.get(c) is not None
                                                                          else "n/a" for c in cols]
            for group, row in table.get("rows", {}).items()]
    lines = [f"Bytes per token on held-out text (higher is better); chatsmith vocabulary {table.get('vocab_size')}.",
             ""] + _table(["text", "MB", "docs", *cols], rows)
    lines += [f"- note: {n}" for n in table.get("notes", [])]
    return lines + [""]


def _pretrain_lines(run: Path, saved: dict, speedrun: dict | None, results: dict[str, dict]) -> list[str]:
    from .train import read_metrics

    train, val = read_metrics(run, "train"), read_metrics(run, "val")
    meta = _latest_meta(run / "checkpoints")
    if not train and not meta:
        return ["No pretraining yet (no `metrics.jsonl` train records, no checkpoint).", ""]
    nums = model_numbers(meta)
    tokens = train[-1]["tokens"] if train else (meta or {}).get("tokens")
    lines = []
    if nums:
        m = nums["config"]
        lines.append(f"- model: depth {m.depth}, width {m.n_embd}, {m.n_head} heads x {m.head_dim}, context "
                     f"{m.seq_len}, vocabulary {m.vocab_size}: {nums['params']:,} parameters "
                     f"({nums['non_embedding']:,} without the input embedding)")
    lines.append(f"- trained: {train[-1]['step'] if train else '–'} steps, {_f(tokens)} tokens"
                 + (f", {nums['flops_per_token'] * tokens:.3e} FLOPs (6 x matmul weights + attention, per token)"
                    if nums and tokens else ""))
    if val:
        lines.append(f"- final val bits per byte (step {val[-1]['step']}): {_f(val[-1]['val_bpb'])}")
    bpb = (results.get("base") or {}).get("bpb") or {}
    if bpb:
        lines.append(f"- val bits per byte by language (eval, step {results['base'].get('step')}): all "
                     f"{_f(bpb.get('all'))}, English {_f(bpb.get('en'))}, Chinese {_f(bpb.get('zh'))}")
    else:
        lines.append("- val bits per byte by language: not measured yet (`chatsmith eval --stage base`)")
    if train:
        mfu = _median([r["mfu"] for r in train if r.get("mfu") is not None])
        tok_s = _median([r["tok_s"] for r in train])
        step_s = sum(r.get("dt", 0.0) for r in train)
        lines.append(f"- throughput: median {tok_s:,.0f} tokens/s; MFU median {mfu:.1%} of the matmul peak measured "
                     f"at the start of training in the same precision; {step_s:.1f} s in optimizer steps"
                     if mfu is not None else f"- throughput: median {tok_s:,.0f} tokens/s")
    lines.append(f"- precision: {_precision(saved, speedrun, 'pretrain')}")
    if meta:
        lines.append(f"- checkpoint: {meta['checkpoint']} (written {meta.get('time', '?')})")
    return lines + [""]


def _precision(saved: dict, speedrun: dict | None, stage: str) -> str:
    recorded = ((speedrun or {}).get("precision") or {}).get(stage)
    if recorded:
        return f"{recorded} (recorded by the speedrun)"
    section = "train" if stage == "pretrain" else "sft_train"
    asked = (saved.get(stage) or saved.get("speedrun") or {}).get(section, {}).get("precision", "auto")
    if asked != "auto":
        return asked
    from .common import autocast_dtype

    dtype = autocast_dtype("cpu", "auto")
    return f"auto ({'bf16 autocast' if dtype is not None else 'fp32'} on this machine's CPU; the run recorded none)"


def _sft_lines(run: Path, saved: dict, speedrun: dict | None) -> list[str]:
    from .train import read_metrics

    chat = run / "chat"
    train, val = read_metrics(chat, "train"), read_metrics(chat, "val")
    if not train:
        return ["No chat fine-tuning yet (no `chat/metrics.jsonl` train records).", ""]
    lines = [f"- trained: {train[-1]['step']} steps, {train[-1]['tokens']:,} tokens; precision "
             f"{_precision(saved, speedrun, 'sft')}"]
    if val:
        lines.append(f"- final val loss (step {val[-1]['step']}, assistant tokens): {_f(val[-1]['val_loss'])} nats "
                     f"per token, {_f(val[-1]['val_bpb'])} bits per byte")
    checks = _read(chat / "chat_checks.json")
    if isinstance(checks, dict):
        lines.append(f"- chat checks on held-out prompts: {checks.get('ended_with_im_end')} of {checks.get('prompts')} "
                     f"replies end with <|im_end|> ({_f(checks.get('ended_frac'), 3)}); "
                     f"{checks.get('zh_replies_mostly_han')} of {checks.get('zh_prompts')} Chinese prompts got a "
                     f"mostly Chinese reply ({_f(checks.get('zh_frac'), 3)})")
    elif (run / "rl" / "chat_checks.json").exists():
        lines.append("- assistant checks: run on the final (RL) model, see Assistant checks")
    else:
        lines.append("- chat checks: none recorded (`chat/chat_checks.json` is missing)")
    return lines + [""]


def _rl_lines(run: Path, saved: dict) -> list[str]:
    """The RL run: task, steps, mean reward, and its held-out greedy accuracy before and after, with intervals."""
    from .tasks.scoring import wilson
    from .train import read_metrics

    train, evals = read_metrics(run / "rl", "train"), read_metrics(run / "rl", "eval")
    if not train:
        return ["No RL yet (`rl/metrics.jsonl` has no train records; `chatsmith rl`).", ""]
    task = (saved.get("rl", {}).get("rl") or saved.get("speedrun", {}).get("rl") or {}).get("task", "?")
    rewards = [r["reward"] for r in train]
    lines = [f"- task `{task}`, {train[-1]['step']} steps; mean reward {_f(rewards[0], 3)} at step 1, "
             f"{_f(rewards[-1], 3)} at the last"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        (lo0, hi0), (lo1, hi1) = wilson(first["correct"], first["n"]), wilson(last["correct"], last["n"])
        apart = lo1 > hi0 or hi1 < lo0
        lines.append(f"- held-out questions answered greedily: {first['correct']}/{first['n']} before (95 % "
                     f"{lo0:.3f}-{hi0:.3f}), {last['correct']}/{last['n']} after step {last['step']} (95 % "
                     f"{lo1:.3f}-{hi1:.3f}): {'the intervals do not overlap' if apart else 'the intervals overlap'}")
    return lines + [""]


def _tuning_lines(saved: dict) -> list[str]:
    """The cpu preset's tuning table (chatsmith/tuning_cpu.md, measured when the preset was chosen) for its runs."""
    presets = {(stage.get("run") or {}).get("preset") for stage in saved.values() if isinstance(stage, dict)}
    if "cpu" not in presets:
        return []
    text = (Path(__file__).parent / "tuning_cpu.md").read_text(encoding="utf-8")
    return ["## How the cpu preset was tuned", "", text.strip(), ""]


def _eval_lines(results: dict[str, dict]) -> list[str]:
    if not results:
        return ["No evaluation results yet (`eval/*.json`); run `chatsmith eval --stage base` and `--stage chat`.", ""]
    from .evaluate import markdown_table  # the one writer of an eval table (the model card uses it too)

    lines = []
    for stage in ("base", "chat"):
        res = results.get(stage)
        if not res:
            lines += [f"No {stage} model evaluation yet (`chatsmith eval --stage {stage}`).", ""]
            continue
        tasks = res["tasks"]
        above = [t for t, r in tasks.items() if r["ci95"][0] > r["chance"]]
        mean = res.get("core") if stage == "base" else res.get("chatcore")
        lines += [f"### {stage} model (`{res['file']}`)", "", markdown_table(res),
                  f"Above chance (the 95 % interval's lower end above chance): {', '.join(above) or 'none'}; "
                  f"{'CORE' if stage == 'base' else 'ChatCORE'}-like mean of centred scores {_f(mean)}.", ""]
        lines += _reference_lines(stage, tasks)
    rl, chat = results.get("rl"), results.get("chat") or {}
    if rl:  # the RL model beside the SFT model it started from, on the tasks both were evaluated on
        lines += [f"### chat model after RL (`{rl['file']}`)", "", markdown_table(rl)]
        for name, r in rl["tasks"].items():
            before = chat.get("tasks", {}).get(name)
            if before:
                apart = r["ci95"][0] > before["ci95"][1] or r["ci95"][1] < before["ci95"][0]
                lines.append(f"- {name}: {_f(before['score'], 3)} after SFT → {_f(r['score'], 3)} after RL "
                             f"({'intervals apart' if apart else 'intervals overlap: no significant change'})")
        lines.append("")
    return lines


def _reference_lines(stage: str, tasks: dict[str, dict]) -> list[str]:
    names = list(tasks)
    refs = REFERENCES.get(stage, ())
    header = ["model", "setting", *names, "source"]
    rows = [["random chance", "–", *[_f(tasks[t]["chance"]) for t in names], "the task's choices"],
            ["this run", "see above", *[_f(tasks[t]["score"]) for t in names], "above"]]
    for ref in refs:
        cells = []
        for t in names:
            metric, value = ref["scores"].get(t, (None, None))
            if value is None:
                cells.append("–")
            else:
                cells.append(_f(value) if metric == tasks[t]["metric"] else f"{_f(value)} ({metric})")
        rows.append([ref["model"], ref["setting"], *cells, ref["source"]])
    note = ("Reference rows (published; a metric in brackets differs from ours, and a row's prompt format may "
            "differ: read its setting):")
    return [note, ""] + _table(header, rows)


def _sample_lines(run: Path) -> list[str]:
    from .train import read_metrics

    lines = []
    for title, recs in (("base model (continuations)", read_metrics(run, "sample")),
                        ("chat model (replies)", read_metrics(run / "chat", "sample"))):
        if not recs:
            lines += [f"No {title.split(' (')[0]} samples recorded.", ""]
            continue
        last = [r for r in recs if r["step"] == recs[-1]["step"]]
        lines += [f"{title}, step {last[0]['step']}:", ""]
        lines += _table(["prompt", "generated"], [[r["prompt"], r["text"]] for r in last])
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# the report


def write(run: Path, measure_tokenizer: bool = True) -> Path:
    """Write `<run>/report.md` and `<run>/plots/*.png` from the run directory; returns the report's path."""
    from . import __version__, scaling
    from .train import read_metrics

    saved = _read(run / "config.json") or {}
    speedrun = _read(run / "speedrun.json")
    results = eval_results(run)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    train, val = read_metrics(run, "train"), read_metrics(run, "val")
    sft_train, sft_val = read_metrics(run / "chat", "train"), read_metrics(run / "chat", "val")
    made = {
        "loss": plot_loss(train, val, sft_train, sft_val, plots / "loss.png"),
        "lr": plot_lr(train, sft_train, plots / "lr.png"),
        "throughput": plot_throughput(train, sft_train, plots / "throughput.png"),
        "eval": plot_eval(results, plots / "eval.png"),
    }
    meta = _latest_meta(run / "chat" / "checkpoints") or _latest_meta(run / "checkpoints") or {}
    versions = meta.get("versions") or {}
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    lines = [f"# chatsmith report card: run `{run.name}`", "",
             f"Written {now} by chatsmith {__version__} from `{run}`.", "",
             "## Machine and versions", ""]
    lines += _machine_lines(speedrun)
    if versions:
        lines.append("- versions (from the newest checkpoint): " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        lines.append(f"- git SHA: {meta.get('git') or 'unknown'}")
    else:
        lines.append(f"- versions: python {platform.python_version()}, chatsmith {__version__} (this process; the "
                     f"run has no checkpoint)")
    lines += ["", "## Wall time per stage", ""] + _timing_lines(speedrun)
    lines += ["## Tokenizer", ""] + _tokenizer_lines(tokenizer_table(run, saved, measure_tokenizer))
    lines += ["## Pretraining", ""] + _pretrain_lines(run, saved, speedrun, results)
    lines += ["## Chat fine-tuning (SFT)", ""] + _sft_lines(run, saved, speedrun)
    lines += ["## RL", ""] + _rl_lines(run, saved)
    lines += ["## Evaluation", ""] + _eval_lines(results)
    lines += ["## Assistant checks", ""] + checks.report_lines(run)
    lines += scaling.report_lines(run, plots)  # the scaling-law section, only when the run has a scale/ directory
    lines += _tuning_lines(saved)
    lines += ["## Samples", ""] + _sample_lines(run)
    lines += ["## Plots", ""]
    captions = {"loss": "train loss and val bits per byte against tokens", "lr": "learning rate against step",
                "throughput": "training tokens/s against step", "eval": "eval scores with 95 % intervals beside chance"}
    for name, ok in made.items():
        lines.append(f"![{captions[name]}](plots/{name}.png)" if ok else f"No {name} plot: no data for it yet.")
        lines.append("")
    lines += ["## Resolved config", ""]
    if saved:
        lines += ["<details><summary>config.json</summary>", "", "```json",
                  json.dumps(saved, indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    else:
        lines += ["No `config.json` in the run directory.", ""]
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(cfg: ReportStage) -> int:
    """Write the report card of `--run` (default: the newest run) and print its path."""
    if cfg.report.run:
        run = run_dir(cfg.report.run, create=False)
        if not run.is_dir():
            raise UserError(f"run {cfg.report.run!r} does not exist under {run.parent}; pass an existing run name")
    else:
        run = latest_run()
        if run is None:
            raise UserError("there is no run yet; run `chatsmith speedrun` first")
    path = write(run, cfg.report.tokenizer_eval)
    log(f"report: {path}")
    print(path)
    return 0
