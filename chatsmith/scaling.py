"""Predict before you train: a scaling-law ladder, a law fit, a prediction written before the target trains, its check.

    chatsmith scale run --preset cpu --run cpu      # ladder -> fit -> prediction.json -> train the target -> verify
    chatsmith scale run --preset cpu --run cpu --until fit   # stop after writing prediction.json
    chatsmith scale predict --run cpu --params 5e6  # the fitted law at an untrained size, with its 90 % interval

The parent run (`--run`) must hold a tokenizer and shards (`chatsmith speedrun`, or `tokenizer train` + `data
prepare`); everything goes to `<run>/scale/`: one run directory per rung under `<run>/scale/runs/<rung>/` (config,
checkpoints, metrics; train.pretrain writes there and reads the parent's tokenizer and shards, which every rung
shares), `ladder.json`, `fit.json`, `prediction.json`, `scaling.json` and `scaling.png`.

1. ladder: models from one shape rule, the --depth dial (width = depth x aspect, heads = width / head_dim), so
   non-embedding parameters N (the blocks: neither the token embedding nor the untied head) grow about as depth^3:
   the cpu preset's depths 3, 4, 5, 6 step N by 2.37x, 1.95x, 1.73x (the smoke preset's 1-4 only exercise the
   machinery); D = tokens_per_param x N training tokens (documents cut into row-sized pieces, so no rung repeats
   data); every rung at least `min_steps` optimizer steps of at least `min_batch` sequences, larger rungs larger
   batches (forward passes of up to device_batch sequences, then gradient accumulation); the project's LR rule
   (optim.py's 1/sqrt(width) scaling of the AdamW rates, Muon's rate as is); `seeds` seeds per rung; fp32 (pinned:
   the same recipe on every machine). Every rung is scored on the same held-out windows (device_batch x seq_len,
   eval_tokens): val loss (nats/token), bpb, their standard error over those batches; and the seed spread. A
   finished rung is skipped; an interrupted one resumes from its checkpoint (train.pretrain with --resume).
2. fit: L(N) = E + A N^-alpha by a Huber loss (delta 1e-3) on log L, L-BFGS-B from a grid of starting points
   (Hoffmann et al. 2022), N without and with embeddings; the compute form L(C), C = training FLOPs; the Chinchilla
   form L(N, D) = E + A/N^a + B/D^b only when the ladder's D/N varies (one fixed line does not identify it). The 90 %
   interval: each bootstrap replicate leaves one rung out (in turn, and also none) *and* resamples the seeds within
   each rung, refits, predicts, and adds a resampled seed deviation (the target is one seed, too). Seed bootstrap
   alone was far too narrow in a pilot. prediction.json (value, interval, fit, law, timestamp, git SHA) is written
   and fsynced before the target's training starts, and never rewritten.
3. verify: the target (the cpu preset's depth 8: 2.37x the largest rung in N) with the same recipe; relative error,
   error on the reducible part, inside-interval, the extrapolation factors in N and C, and the same errors for two
   baselines (a pure power law without E; "same as the largest rung").

Notable choices: rung runs live inside the scale run, not beside it under $CHATSMITH_HOME/runs (they are one
experiment, deleted or copied together). Losses are nats per token (one tokenizer for all rungs); bpb is reported
beside them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config
from .common import UserError, atomic_write_json, log, read_json, run_dir
from .config import opt

HUBER_DELTA = 1e-3

# preset -> ladder defaults (a ScaleConfig field left at 0 or empty takes these)
LADDERS = {
    # smoke: the machinery only (CI): so few tokens per parameter that most rungs are held at min_steps of min_batch
    "smoke": {"depths": (1, 2, 3, 4), "target_depth": 5, "seeds": 2, "tokens_per_param": 0.02, "min_steps": 12,
              "aspect": 16, "head_dim": 16, "seq_len": 64, "min_batch": 2, "device_batch": 2, "eval_tokens": 1024,
              "precision": "auto"},
    "cpu": {"depths": (3, 4, 5, 6), "target_depth": 8, "seeds": 2, "tokens_per_param": 1.0, "min_steps": 1000,
            "aspect": 16, "head_dim": 16, "seq_len": 64, "min_batch": 1, "device_batch": 16, "eval_tokens": 32768,
            "precision": "fp32"},
}


@dataclass(frozen=True)
class ScaleConfig:
    depths: tuple[int, ...] = opt((), "ladder depths (the --depth dial); empty: the preset's", min=1, max=1024)
    target_depth: int = opt(0, "depth of the predicted and verified target; 0: the preset's", min=0, max=1024)
    seeds: int = opt(0, "seeds per rung; 0: the preset's", min=0, max=1000)
    tokens_per_param: float = opt(0.0, "training tokens per non-embedding parameter; 0: the preset's", min=0.0,
                                  max=1e6)
    min_steps: int = opt(0, "fewest optimizer steps of any rung; 0: the preset's", min=0, max=10**9)
    aspect: int = opt(0, "width per layer of depth; 0: the preset's", min=0, max=2**16)
    head_dim: int = opt(0, "attention head width; 0: the preset's", min=0, max=4096)
    seq_len: int = opt(0, "context length; 0: the preset's", min=0, max=2**20)
    min_batch: int = opt(0, "fewest sequences per step (the smallest rungs'); 0: the preset's", min=0, max=2**16)
    device_batch: int = opt(0, "most sequences per forward pass, also the eval batch; 0: the preset's", min=0,
                            max=2**16)
    eval_tokens: int = opt(0, "held-out tokens every rung is scored on; 0: the preset's", min=0, max=2**40)
    bootstrap: int = opt(200, "bootstrap replicates of the interval", min=10, max=100_000)
    level: float = opt(0.9, "interval coverage", min=0.5, max=0.999)
    until: str = opt("verify", "last step to run", choices=("ladder", "fit", "verify"))
    threads: int = opt(0, "torch threads for training; 0 leaves torch's default", min=0, max=4096)
    precision: str = opt("", "training and eval precision; empty: the preset's", choices=("", "auto", "bf16", "fp32"))


@dataclass(frozen=True)
class ScaleStage:
    run: config.RunConfig = config.RunConfig()
    scale: ScaleConfig = ScaleConfig()


@dataclass(frozen=True)
class PredictConfig:
    params: float = opt(0.0, "non-embedding parameters of the model to predict (required)", min=0.0, max=1e15)


@dataclass(frozen=True)
class PredictStage:
    run: config.RunConfig = config.RunConfig()
    predict: PredictConfig = PredictConfig()


# ---------------------------------------------------------------------------------------------------------------------
# laws and fits (numpy + scipy only: tested on synthetic data)


def law(logn: np.ndarray, p: np.ndarray) -> np.ndarray:
    """E + A N^-alpha with p = (log E, log A, alpha), from log N; log E = -inf gives the pure power law."""
    return np.exp(np.logaddexp(p[0], p[1] - p[2] * logn))


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _best_fit(objective, starts: list, bounds: list):
    """The lowest of the L-BFGS-B minima of `objective` (value and gradient) from each start."""
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    best = None
    with threadpool_limits(1, user_api="blas"):  # 3-vectors: BLAS threads only add their synchronisation
        for q0 in starts:
            res = minimize(objective, q0, jac=True, method="L-BFGS-B", bounds=bounds)
            best = res if best is None or res.fun < best.fun else best
            if best.fun < 1e-14:
                break
    return best


def fit_law(n: np.ndarray, loss: np.ndarray, inits: list | None = None, with_e: bool = True) -> dict:
    """Fit L(N) = E + A N^-alpha (or A N^-alpha without E) by a Huber loss on log L, L-BFGS-B from each start of a
    grid (or `inits`), keeping the best; returns {"E", "A", "alpha", "p", "objective"}."""
    logn, logl = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
    c = float(logn.mean())  # fitted as log A' = log A - alpha c on centred log N: far better conditioned
    logn = logn - c

    def objective(q):  # value and analytic gradient (numerical gradients cost 4x the calls)
        e, a, alpha = q if with_e else (-np.inf, *q)
        log_pred = np.logaddexp(e, a - alpha * logn)
        r = log_pred - logl
        psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # the Huber loss's derivative
        w_e = np.exp(e - log_pred)  # d log_pred / d log E
        grad = [(psi * (1 - w_e)).sum(), -(psi * (1 - w_e) * logn).sum()]
        if with_e:
            grad = [(psi * w_e).sum(), *grad]
        return float(_huber(r).sum()), np.array(grad)

    if inits is None:
        grid = [(e, a, al) for e in (-1.0, 0.5, 1.5) for a in (0.0, 3.0, 8.0) for al in (0.1, 0.4, 1.0)]
        inits = grid if with_e else [(a, al) for a in (0.0, 3.0, 8.0) for al in (0.05, 0.3, 1.0)]
    bounds = [(-12.0, 5.0), (-60.0, 60.0), (0.0, 3.0)] if with_e else [(-60.0, 60.0), (0.0, 3.0)]
    starts = [np.asarray(q, float)[-len(bounds):] for q in inits]
    best = _best_fit(objective, [np.r_[q[:-2], q[-2] - q[-1] * c, q[-1]] for q in starts], bounds)
    p = best.x.copy() if with_e else np.array([-np.inf, *best.x])
    p[1] += p[2] * c
    return {"E": float(np.exp(p[0])), "A": float(np.exp(p[1])), "alpha": float(p[2]), "p": [float(v) for v in p],
            "objective": float(best.fun)}


def fit_chinchilla(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict:
    """L(N, D) = E + A/N^a + B/D^b by the same Huber-on-log-L fit from a grid (Hoffmann et al. 2022, approach 3)."""
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    cn, cd = float(logn.mean()), float(logd.mean())  # centred, as in fit_law
    logn, logd = logn - cn, logd - cd

    def objective(q):
        e, a, al, b, be = q
        terms = np.stack([np.full_like(logn, e), a - al * logn, b - be * logd])  # (3, points)
        pred = np.logaddexp.reduce(terms, axis=0)
        r = pred - logl
        psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA)
        w = np.exp(terms - pred)  # each term's share of the prediction
        grad = [(psi * w[0]).sum(), (psi * w[1]).sum(), -(psi * w[1] * logn).sum(), (psi * w[2]).sum(),
                -(psi * w[2] * logd).sum()]
        return float(_huber(r).sum()), np.array(grad)

    starts = [(e, a, al, b, al) for e in (-1.0, 0.5, 1.5) for a in (0.0, 3.0) for b in (0.0, 3.0) for al in (0.2, 0.5)]
    best = _best_fit(objective, starts, [(-12, 5), (-60, 60), (0, 3), (-60, 60), (0, 3)])
    e, a, al, b, be = best.x
    a, b = a + al * cn, b + be * cd
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(al), "B": float(np.exp(b)),
            "beta": float(be), "objective": float(best.fun)}


def interval(n_rungs: np.ndarray, seed_losses: list[np.ndarray], at: float, n_boot: int = 200, level: float = 0.9,
             rng: np.random.Generator | None = None) -> dict:
    """The fit at `at` and its `level` interval from a bootstrap over seeds and leave-one-rung-out (see the module
    docstring). `seed_losses[i]` holds rung i's loss for each seed. Returns the point, the interval and the replicate
    parameter sets (so `predict` can answer at any N), and the pooled seed deviations added to each replicate."""
    rng = rng or np.random.default_rng(0)
    n_rungs = np.asarray(n_rungs, float)
    means = np.array([np.mean(s) for s in seed_losses])
    full = fit_law(n_rungs, means)
    deviations = np.concatenate([np.asarray(s) - np.mean(s) for s in seed_losses])
    k = max(len(s) for s in seed_losses)
    deviations = deviations * math.sqrt(k / max(1, k - 1))  # deviations from a k-seed mean shrink by (k-1)/k
    n_drop = len(n_rungs) + 1 if len(n_rungs) >= 4 else 1  # with 3 rungs a 3-parameter law cannot lose one
    params, preds = [], []
    for b in range(n_boot):
        drop = b % n_drop
        keep = [i for i in range(len(n_rungs)) if i != drop]  # drop == len(n_rungs): none left out
        ys = [float(np.mean(rng.choice(seed_losses[i], size=len(seed_losses[i])))) for i in keep]
        fit = fit_law(n_rungs[keep], np.array(ys), inits=[full["p"], (full["p"][0] - 1.0, *full["p"][1:])])
        params.append(fit["p"])
        preds.append(float(law(np.log(at), np.array(fit["p"]))) + float(rng.choice(deviations)))
    lo, hi = np.quantile(preds, [(1 - level) / 2, (1 + level) / 2])
    return {"value": float(law(np.log(at), np.array(full["p"]))), "low": float(lo), "high": float(hi),
            "level": level, "fit": full, "replicates": params, "deviations": deviations.tolist()}


def predict_at(fit: dict, n: float) -> dict:
    """Point and interval of a saved fit (fit.json's) at non-embedding size `n`, with how far it extrapolates."""
    p = np.array(fit["law_n"]["p"])
    value = float(law(np.log(n), p))
    rng = np.random.default_rng(0)
    reps = [float(law(np.log(n), np.array(q))) + float(rng.choice(fit["deviations"])) for q in fit["replicates"]]
    lo, hi = np.quantile(reps, [(1 - fit["level"]) / 2, (1 + fit["level"]) / 2])
    n_min, n_max = min(fit["n"]), max(fit["n"])
    factor = n / n_max if n > n_max else (n / n_min if n < n_min else 1.0)
    return {"params": n, "value": value, "low": float(lo), "high": float(hi), "level": fit["level"],
            "extrapolation": factor, "fitted_range": [n_min, n_max]}


# ---------------------------------------------------------------------------------------------------------------------
# the ladder


def resolved(cfg: ScaleStage) -> ScaleConfig:
    """The scale section with every 0 or empty field filled from the preset's ladder."""
    base = LADDERS.get(cfg.run.preset)
    if base is None:
        raise UserError(f"chatsmith scale has no ladder for preset {cfg.run.preset!r}; use {' or '.join(LADDERS)}")
    sc = cfg.scale
    fill = {k: v for k, v in base.items() if not getattr(sc, k)}
    sc = dataclasses.replace(sc, **fill)
    if sc.target_depth <= max(sc.depths):
        raise UserError(f"--target-depth {sc.target_depth} must be deeper than the ladder's largest depth "
                        f"{max(sc.depths)}")
    if len(sc.depths) < 3:
        raise UserError("the ladder needs at least 3 depths to fit E, A and alpha")
    if sc.min_batch > sc.device_batch:
        raise UserError(f"--min-batch {sc.min_batch} must not exceed --device-batch {sc.device_batch}")
    return sc


def shape(depth: int, sc: ScaleConfig, vocab: int) -> dict:
    """Parameter and FLOP counts of a rung, from the model itself (built on the meta device)."""
    import torch

    from .model import GPT, ModelConfig

    mcfg = ModelConfig(depth=depth, aspect=sc.aspect, head_dim=sc.head_dim, seq_len=sc.seq_len).resolve(vocab)
    with torch.device("meta"):
        model = GPT(mcfg)
    head = model.head_weight().numel() if model.lm_head is not None else 0  # an untied head is an embedding, too
    return {"depth": depth, "width": mcfg.n_embd, "n": model.num_params(non_embedding=True) - head,
            "n_total": model.num_params(), "flops_per_token": model.flops_per_token()}


def plan(depth: int, sc: ScaleConfig, vocab: int) -> dict:
    """Steps and batch of one rung: D = tokens_per_param x N tokens in >= min_steps steps of >= min_batch sequences,
    in forward passes of up to device_batch sequences (a step of more is a whole number of them, accumulated)."""
    s = shape(depth, sc, vocab)
    want = sc.tokens_per_param * s["n"]
    rows = max(sc.min_batch, int(want // (sc.min_steps * sc.seq_len)))  # sequences per step
    if rows > sc.device_batch:
        rows -= rows % sc.device_batch
    steps = max(sc.min_steps, round(want / (rows * sc.seq_len)))
    tokens = steps * rows * sc.seq_len
    return {**s, "steps": steps, "batch_tokens": rows * sc.seq_len, "forward_batch": min(rows, sc.device_batch),
            "tokens": tokens, "compute": s["flops_per_token"] * tokens}


def rung_config(name: str, depth: int, seed: int, p: dict, sc: ScaleConfig, preset: str):
    """The PretrainStage of one rung: the preset's recipe with the rung's shape, steps and batch."""
    return config.make(config.PretrainStage, {
        "run": {"preset": preset, "run": name, "seed": seed},
        "model": {"depth": depth, "aspect": sc.aspect, "head_dim": sc.head_dim, "seq_len": sc.seq_len, "n_embd": 0},
        "train": {"steps": p["steps"], "device_batch": p["forward_batch"], "batch_tokens": p["batch_tokens"],
                  "eval_every": 0, "ckpt_every": max(1, p["steps"] // 5), "sample_every": p["steps"],
                  "resume": True, "threads": sc.threads, "keep_last": 1, "precision": sc.precision or "auto",
                  "keep_tails": True},  # short rows: dropping tails would leave a tenth of the tokens (repeated)
    })


def train_rung(scale_dir: Path, parent: Path, name: str, depth: int, seed: int, p: dict, sc: ScaleConfig,
               preset: str) -> dict:
    """Train (or resume, or skip) one rung and score it; returns its record (also `<rung>/rung.json`)."""
    from . import train

    rung = scale_dir / "runs" / name
    done = rung / "rung.json"
    if done.exists():
        return read_json(done)
    cfg = rung_config(name, depth, seed, p, sc, preset)
    started = time.time()
    train.pretrain(cfg, out=rung, data=parent)
    windows = val_windows(rung, parent, sc)
    rec = {**p, "name": name, "seed": seed, "val_loss": windows["loss"], "val_bpb": windows["bpb"], "eval_se":
           windows["se"], "eval_windows": windows["count"], "started_at": started, "finished_at": time.time()}
    atomic_write_json(done, rec)
    return rec


def val_windows(rung: Path, parent: Path, sc: ScaleConfig) -> dict:
    """The val loss (nats per token) and bpb of the rung's last checkpoint on the parent run's held-out windows, the
    same for every rung (device_batch x seq_len, eval_tokens), and its standard error over those batches (each scored
    by train.evaluate)."""
    from . import train
    from .checkpoint import LoadConfig, list_checkpoints, load_model
    from .data.shards import iter_val_batches

    last = list_checkpoints(rung / "checkpoints")[-1]
    loaded = load_model(LoadConfig(run=parent.name, checkpoint=str(last), precision=sc.precision or "auto",
                                   threads=sc.threads), stage="base")
    device = next(loaded.model.parameters()).device.type
    token_bytes = loaded.tokenizer.token_bytes()
    rows = []  # (loss, targets, bytes) per batch: the loss over all windows weighs each batch by its targets
    for x, y in iter_val_batches(parent / "shards" / "val", sc.device_batch, sc.seq_len, sc.eval_tokens):
        b = token_bytes[y.clamp(min=0)] * (y >= 0)
        rows.append((train.evaluate(loaded.model, [(x, y)], token_bytes, device, loaded.autocast_dtype)["loss"],
                     int((b > 0).sum()), int(b.sum())))
    losses, targets, nbytes = (np.array(c, float) for c in zip(*rows))
    se = float(np.std(losses, ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else float("nan")
    nats = float((losses * targets).sum())
    return {"loss": nats / float(targets.sum()), "bpb": nats / (math.log(2) * float(nbytes.sum())), "se": se,
            "count": len(rows)}


def ladder(cfg: ScaleStage, sc: ScaleConfig, scale_dir: Path, parent: Path, vocab: int) -> list[dict]:
    """Every rung x seed, skipping finished ones; writes ladder.json (per rung: the seeds' losses, mean, spread)."""
    from .common import progress

    jobs = [(d, cfg.run.seed + s) for d in sc.depths for s in range(sc.seeds)]
    recs = []
    with progress(total=len(jobs), desc="scale ladder", unit="rung") as bar:
        for depth, seed in jobs:
            p = plan(depth, sc, vocab)
            recs.append(train_rung(scale_dir, parent, f"d{depth}-s{seed}", depth, seed, p, sc, cfg.run.preset))
            bar.update(1)
    rungs = []
    for depth in sc.depths:
        seeds = [r for r in recs if r["depth"] == depth]
        losses = [r["val_loss"] for r in seeds]
        rungs.append({k: seeds[0][k] for k in ("depth", "width", "n", "n_total", "steps", "batch_tokens", "tokens",
                                               "compute")}
                     | {"losses": losses, "mean": float(np.mean(losses)), "seed_sd": float(np.std(losses, ddof=1)),
                        "eval_se": float(np.mean([r["eval_se"] for r in seeds])),
                        "bpb": [r["val_bpb"] for r in seeds]})
    atomic_write_json(scale_dir / "ladder.json", {"rungs": rungs, "runs": recs})
    return rungs


def fit_ladder(rungs: list[dict], target: dict, sc: ScaleConfig) -> dict:
    """Every law form on the ladder, the interval at the target, and the two baselines."""
    n = np.array([r["n"] for r in rungs], float)
    means = np.array([r["mean"] for r in rungs])
    iv = interval(n, [np.array(r["losses"]) for r in rungs], target["n"], sc.bootstrap, sc.level)
    total = fit_law(np.array([r["n_total"] for r in rungs], float), means)
    compute = fit_law(np.array([r["compute"] for r in rungs], float), means)
    power = fit_law(n, means, with_e=False)
    ratios = {round(r["tokens"] / r["n"], 3) for r in rungs}
    chin = None
    if len(ratios) > 1:
        chin = fit_chinchilla(n, np.array([r["tokens"] for r in rungs], float), means)
    return {"law": "L(N) = E + A * N^-alpha, N = non-embedding parameters; Huber (delta 1e-3) on log L",
            "law_n": iv["fit"], "law_n_total": total, "law_compute": compute, "power_law": power,
            "chinchilla": chin if chin else "not fitted: every rung has the same tokens per parameter",
            "n": n.tolist(), "level": sc.level, "replicates": iv["replicates"], "deviations": iv["deviations"],
            "target": target, "prediction": {"value": iv["value"], "low": iv["low"], "high": iv["high"]},
            "baselines": {"power_law": float(law(np.log(target["n"]), np.array(power["p"]))),
                          "largest_rung": float(means[np.argmax(n)])}}


# ---------------------------------------------------------------------------------------------------------------------
# the stage


def git_sha() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_prediction(scale_dir: Path, fit: dict) -> dict:
    """prediction.json, once: a prediction already written is kept (it must predate the target's training)."""
    path = scale_dir / "prediction.json"
    if path.exists():
        return read_json(path)
    target_ckpts = scale_dir / "runs" / fit["target"]["name"] / "checkpoints"
    if target_ckpts.exists() and any(target_ckpts.iterdir()):
        raise UserError(f"the target {fit['target']['name']} has checkpoints but no prediction.json: a prediction "
                        f"made now would not be made before its training; delete {scale_dir} and rerun")
    now = time.time()
    pred = {**fit["prediction"], "level": fit["level"], "law": fit["law"], "fit": fit["law_n"],
            "target": fit["target"], "baselines": fit["baselines"], "timestamp": now,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "git_sha": git_sha()}
    atomic_write_json(path, pred)
    return pred


def verify(pred: dict, rec: dict, rungs: list[dict]) -> dict:
    """The outcome against the prediction and the baselines."""
    observed = rec["val_loss"]
    e_hat = pred["fit"]["E"]

    def errors(value: float) -> dict:
        return {"value": value, "relative_error": abs(value - observed) / observed,
                "reducible_error": (value - observed) / (observed - e_hat) if observed > e_hat else None}

    largest = max(rungs, key=lambda r: r["n"])
    return {"observed": observed, "observed_bpb": rec["val_bpb"], "eval_se": rec["eval_se"],
            "prediction": {**errors(pred["value"]), "low": pred["low"], "high": pred["high"],
                           "inside": pred["low"] <= observed <= pred["high"]},
            "baselines": {k: errors(v) for k, v in pred["baselines"].items()},
            "extrapolation": {"params": rec["n"] / largest["n"], "compute": rec["compute"] / largest["compute"]},
            "prediction_time": pred["timestamp"], "target_started_at": rec["started_at"]}


def plot(path: Path, rungs: list[dict], fit: dict, outcome: dict | None) -> None:
    from .plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rungs:
        ax.scatter([r["n"]] * len(r["losses"]), r["losses"], color="tab:blue", s=14, alpha=0.6)
    ax.scatter([r["n"] for r in rungs], [r["mean"] for r in rungs], color="tab:blue", s=40,
               label="ladder (seeds, mean)")
    t = fit["target"]["n"]
    grid = np.geomspace(min(fit["n"]) / 1.2, t * 1.2, 100)
    ax.plot(grid, law(np.log(grid), np.array(fit["law_n"]["p"])), color="tab:blue",
            label=f"E + A N^-α: E={fit['law_n']['E']:.3f}, α={fit['law_n']['alpha']:.3f}")
    ax.plot(grid, law(np.log(grid), np.array(fit["power_law"]["p"])), "--", color="gray", label="A N^-α (no E)")
    p = fit["prediction"]
    ax.errorbar([t], [p["value"]], yerr=[[p["value"] - p["low"]], [p["high"] - p["value"]]], fmt="s", color="tab:red",
                capsize=4, label=f"prediction, {fit['level']:.0%} interval")
    if outcome is not None:
        ax.scatter([t], [outcome["observed"]], marker="*", s=160, color="black", zorder=5,
                   label=f"observed (rel. error {outcome['prediction']['relative_error']:.1%})")
    ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="val loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg: ScaleStage) -> dict:
    """ladder -> fit -> prediction.json -> target -> verify (each step skipped when its result is on disk)."""
    parent = run_dir(cfg.run.run)
    for need, hint in ((parent / "tokenizer" / "tokenizer.json", "tokenizer train"),
                       (parent / "shards" / "train" / "index.json", "data prepare")):
        if not need.exists():
            raise UserError(f"run {cfg.run.run!r} has no {need.parent.name} yet; run `chatsmith {hint} --run "
                            f"{cfg.run.run}` first (or `chatsmith speedrun`)")
    from .tokenizer import Tokenizer

    sc = resolved(cfg)
    vocab = Tokenizer.load(parent / "tokenizer").vocab_size
    scale_dir = parent / "scale"
    scale_dir.mkdir(exist_ok=True)
    config.save(cfg, scale_dir / "config.json", "scale")
    plans = [plan(d, sc, vocab) for d in (*sc.depths, sc.target_depth)]
    work = sum(p["compute"] for p in plans[:-1]) * sc.seeds + plans[-1]["compute"]
    sizes = ", ".join(f"{p['n'] / 1e6:.3g}M" for p in plans[:-1])
    log(f"scale: rungs N = {sizes} (non-embedding), target "
        f"{plans[-1]['n'] / 1e6:.3g}M; steps {', '.join(str(p['steps']) for p in plans)}; {sc.seeds} seeds; "
        f"{work / 1e12:.1f} TFLOPs of training in all")
    rungs = ladder(cfg, sc, scale_dir, parent, vocab)
    if sc.until == "ladder":
        return {"rungs": rungs}
    target = {**plans[-1], "name": f"target-d{sc.target_depth}-s{cfg.run.seed}"}
    fit = fit_ladder(rungs, target, sc)
    atomic_write_json(scale_dir / "fit.json", fit)
    pred = write_prediction(scale_dir, fit)
    log(f"scale: predicted val loss {pred['value']:.4f} [{pred['low']:.4f}, {pred['high']:.4f}] at N = "
        f"{target['n']:,} ({target['n'] / max(fit['n']):.2f}x the largest rung); prediction.json written")
    outcome = None
    if sc.until == "verify":
        rec = train_rung(scale_dir, parent, target["name"], sc.target_depth, cfg.run.seed, plans[-1], sc,
                         cfg.run.preset)
        outcome = verify(pred, rec, rungs)
        log(f"scale: observed {outcome['observed']:.4f}; relative error {outcome['prediction']['relative_error']:.2%}"
            f" (power law {outcome['baselines']['power_law']['relative_error']:.2%}, largest rung "
            f"{outcome['baselines']['largest_rung']['relative_error']:.2%}); inside the interval: "
            f"{outcome['prediction']['inside']}")
    plot(scale_dir / "scaling.png", rungs, fit, outcome)
    result = {"schema": 1, "ladder": rungs, "fit": {k: fit[k] for k in ("law", "law_n", "law_n_total", "law_compute",
                                                                         "power_law", "chinchilla", "level")},
              "prediction": pred, "verify": outcome, "plot": "scaling.png"}
    atomic_write_json(scale_dir / "scaling.json", result)
    return result


def predict_main(cfg: PredictStage) -> dict:
    """The fitted law at `--params N`, with its interval and how far outside the fitted range N lies."""
    if cfg.predict.params < 1:
        raise UserError("pass the size to predict for as --params N (non-embedding parameters, at least 1)")
    path = run_dir(cfg.run.run, create=False) / "scale" / "fit.json"
    if not path.exists():
        raise UserError(f"run {cfg.run.run!r} has no scaling fit yet; run `chatsmith scale run --run {cfg.run.run} "
                        f"--until fit` first")
    out = predict_at(read_json(path), cfg.predict.params)
    lo, hi = out["fitted_range"]
    where = (f"{out['extrapolation']:.2f}x beyond the largest fitted size {hi:,.0f}" if out["extrapolation"] > 1 else
             f"{1 / out['extrapolation']:.2f}x below the smallest fitted size {lo:,.0f}" if out["extrapolation"] < 1
             else f"inside the fitted range {lo:,.0f}-{hi:,.0f}")
    print(f"N = {cfg.predict.params:,.0f}: val loss {out['value']:.4f}, {out['level']:.0%} interval "
          f"[{out['low']:.4f}, {out['high']:.4f}]; {where}")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the report card's section (report.py calls this; it lives here, beside the files it reads)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""])


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2%}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def report_lines(run: Path, plots: Path) -> list[str]:
    """The "Scaling law" section of the report card, from `<run>/scale/` (ladder.json, fit.json, prediction.json,
    scaling.json), and its plot in `plots/scaling.png`; nothing when the run has no scaling directory."""
    scale_dir = run / "scale"
    if not scale_dir.is_dir():
        return []
    lines = ["## Scaling law", ""]
    ladder_rec = read_json(scale_dir / "ladder.json") if (scale_dir / "ladder.json").exists() else None
    if ladder_rec is None:
        return lines + ["The ladder has not finished yet (`chatsmith scale run` writes `scale/ladder.json`).", ""]
    rungs = ladder_rec["rungs"]
    lines += ["Ladder: val loss in nats per token on the same held-out windows for every rung; N = non-embedding "
              "parameters; eval SE = standard error over the held-out batches; seed SD = spread over seeds.", ""]
    lines += _md_table(["depth", "width", "N", "N with embeddings", "tokens", "steps", "loss per seed", "mean",
                        "seed SD", "eval SE"],
                       [[r["depth"], r["width"], f"{r['n']:,}", f"{r['n_total']:,}", f"{r['tokens']:,}", r["steps"],
                         ", ".join(f"{x:.4f}" for x in r["losses"]), f"{r['mean']:.4f}", f"{r['seed_sd']:.4f}",
                         f"{r['eval_se']:.4f}"] for r in rungs])
    if not (scale_dir / "fit.json").exists():
        return lines + ["No fit yet (`chatsmith scale run --until fit` writes `scale/fit.json`).", ""]
    fit = read_json(scale_dir / "fit.json")
    forms = [("L(N) = E + A·N^-α, N without embeddings", fit["law_n"]),
             ("L(N) = E + A·N^-α, N with embeddings", fit["law_n_total"]),
             ("L(C) = E + A·C^-α, C = training FLOPs", fit["law_compute"]),
             ("L(N) = A·N^-α (no E: a baseline)", fit["power_law"])]
    lines += [f"Fits: Huber (δ = {HUBER_DELTA:g}) on log L, L-BFGS-B from a grid of starts.", ""]
    lines += _md_table(["law", "E", "A", "α"], [[name, f"{f['E']:.4f}", f"{f['A']:.4g}", f"{f['alpha']:.4f}"]
                                               for name, f in forms])
    chin = fit["chinchilla"]
    if isinstance(chin, dict):
        lines += [f"Chinchilla form L(N, D) = E + A/N^α + B/D^β: E = {chin['E']:.4f}, A = {chin['A']:.4g}, "
                  f"α = {chin['alpha']:.4f}, B = {chin['B']:.4g}, β = {chin['beta']:.4f}.", ""]
    else:
        lines += [f"Chinchilla form: {chin}.", ""]
    pred = read_json(scale_dir / "prediction.json") if (scale_dir / "prediction.json").exists() else None
    if pred is None:
        return lines + ["No prediction written yet.", ""]
    target = pred["target"]
    lines += [f"Prediction for the target `{target['name']}` (depth {target['depth']}, N = {target['n']:,}, "
              f"{target['tokens']:,} tokens), written {_utc(pred['timestamp'])} (git {pred.get('git_sha') or '?'}) "
              f"before its training: val loss {pred['value']:.4f}, {pred['level']:.0%} interval "
              f"[{pred['low']:.4f}, {pred['high']:.4f}] (bootstrap over seeds and leave-one-rung-out).", ""]
    outcome = None
    if (scale_dir / "scaling.json").exists():
        outcome = read_json(scale_dir / "scaling.json").get("verify")
    if outcome is None:
        largest = max(rungs, key=lambda r: r["n"])
        lines += [f"Not verified yet: the target is {target['n'] / largest['n']:.2f}x the largest rung in N and "
                  f"{target['compute'] / largest['compute']:.2f}x in training compute.", ""]
    else:
        p, ext = outcome["prediction"], outcome["extrapolation"]
        lag = outcome["target_started_at"] - outcome["prediction_time"]
        lines += [f"Observed: val loss {outcome['observed']:.4f} (eval SE {outcome['eval_se']:.4f}), its training "
                  f"started {_utc(outcome['target_started_at'])}, {lag:,.0f} s after the prediction was written; "
                  f"inside the interval: {'yes' if p['inside'] else 'no'}. Extrapolation: "
                  f"{ext['params']:.2f}x the largest rung in N, {ext['compute']:.2f}x in training compute.", ""]
        names = {"power_law": "pure power law A·N^-α (no E)", "largest_rung": "same as the largest rung"}
        rows = [["E + A·N^-α (the prediction)", f"{p['value']:.4f}", _pct(p["relative_error"]),
                 _pct(p["reducible_error"])]]
        rows += [[names.get(k, k), f"{b['value']:.4f}", _pct(b["relative_error"]), _pct(b["reducible_error"])]
                 for k, b in outcome["baselines"].items()]
        lines += ["Relative error = abs(L̂ − L) / L; reducible error = (L̂ − L) / (L − Ê), Ê the fitted E.", ""]
        lines += _md_table(["predictor", "predicted loss", "relative error", "reducible error"], rows)
    try:
        plots.mkdir(parents=True, exist_ok=True)
        plot(plots / "scaling.png", rungs, fit, outcome)
        lines += [f"![ladder, fit, prediction with its interval and the outcome]({plots.name}/scaling.png)", ""]
    except ImportError:
        lines += ["No scaling plot: matplotlib is not installed.", ""]
    return lines
