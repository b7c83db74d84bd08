"""scaling.py: the law fit against known laws, the interval's coverage on synthetic ladders, prediction.json written
before the target trains (a stand-in trainer records the order), `scale predict`, and the smoke ladder end to end."""

import json
import time

import numpy as np
import pytest

from chatsmith import __main__ as cli
from chatsmith import config, scaling


def truth(n):
    return scaling.law(np.log(n), np.array([np.log(1.8), np.log(40.0), 0.3]))


def test_fit_recovers_known_law():
    n = np.geomspace(1e5, 1.6e6, 5)
    fit = scaling.fit_law(n, truth(n))
    assert fit["E"] == pytest.approx(1.8, rel=1e-3)
    assert fit["A"] == pytest.approx(40.0, rel=1e-2)
    assert fit["alpha"] == pytest.approx(0.3, rel=1e-3)
    noisy = truth(n) * np.exp(np.random.default_rng(0).normal(0, 5e-4, n.size))  # 0.05 % noise
    fit = scaling.fit_law(n, noisy)
    assert fit["E"] == pytest.approx(1.8, abs=0.1)
    assert fit["alpha"] == pytest.approx(0.3, abs=0.06)
    assert float(scaling.law(np.log(4e6), np.array(fit["p"]))) == pytest.approx(float(truth(4e6)), rel=3e-3)
    power = scaling.fit_law(n, 5.0 * n ** -0.2, with_e=False)  # the baseline: a pure power law
    assert power["A"] == pytest.approx(5.0, rel=1e-3) and power["alpha"] == pytest.approx(0.2, rel=1e-3)


def test_chinchilla_form_recovers_known_law():
    n = np.repeat(np.geomspace(1e5, 1.6e6, 5), 3)
    d = n * np.tile([2.0, 8.0, 32.0], 5)
    loss = 1.7 + 400.0 / n ** 0.34 + 900.0 / d ** 0.28
    fit = scaling.fit_chinchilla(n, d, loss)
    pred = fit["E"] + fit["A"] / 4e6 ** fit["alpha"] + fit["B"] / 8e6 ** fit["beta"]
    assert pred == pytest.approx(1.7 + 400.0 / 4e6 ** 0.34 + 900.0 / 8e6 ** 0.28, rel=2e-3)
    assert fit["alpha"] == pytest.approx(0.34, abs=0.05) and fit["beta"] == pytest.approx(0.28, abs=0.05)


def test_interval_covers_truth_at_about_nominal_rate():
    n = np.geomspace(1e5, 1.6e6, 5)
    target = 4e6
    rng = np.random.default_rng(0)
    sd = 0.004  # seed noise, also in the one-seed target
    hits, widths = 0, []
    trials = 30
    for t in range(trials):
        seeds = [truth(x) + rng.normal(0, sd, 2) for x in n]
        observed = float(truth(target)) + rng.normal(0, sd)
        iv = scaling.interval(n, seeds, target, n_boot=40, level=0.9, rng=np.random.default_rng(t))
        hits += iv["low"] <= observed <= iv["high"]
        widths.append(iv["high"] - iv["low"])
    assert 0.73 <= hits / trials <= 0.97, hits
    assert np.median(widths) < 20 * sd  # informative, not a trivially wide interval


# ---------------------------------------------------------------------------------------------------------------------
# the stage, with a stand-in trainer


@pytest.fixture
def fake_parent(chatsmith_home, monkeypatch):
    """Run 'p' with tokenizer and shard index files, a 512-token vocabulary, and a trainer that writes the loss of a
    known law instead of training (recording when each run starts)."""
    from chatsmith import train
    from chatsmith.tokenizer import Tokenizer

    parent = chatsmith_home / "runs" / "p"
    for path in (parent / "tokenizer" / "tokenizer.json", parent / "shards" / "train" / "index.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    monkeypatch.setattr(Tokenizer, "load", staticmethod(lambda path: type("T", (), {"vocab_size": 512})()))
    calls = []

    def fake_pretrain(cfg, out, data):
        pred = parent / "scale" / "prediction.json"
        calls.append({"run": cfg.run.run, "at": time.time(), "prediction_exists": pred.exists(), "dir": str(out),
                      "data": data})
        out.mkdir(parents=True, exist_ok=True)
        mcfg = cfg.model
        n = scaling.shape(mcfg.depth, scaling.ScaleConfig(aspect=mcfg.aspect, head_dim=mcfg.head_dim,
                                                         seq_len=mcfg.seq_len), 512)["n"]
        loss = float(truth(n)) + 0.003 * (cfg.run.seed % 2 - 0.5)
        (out / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 1, "val_loss": loss,
                                                       "val_bpb": loss / 2}) + "\n")
        return {}

    monkeypatch.setattr(train, "pretrain", fake_pretrain)
    monkeypatch.setattr(scaling, "val_windows", lambda rung, data, sc: {
        "loss": train.read_metrics(rung, "val")[-1]["val_loss"], "bpb": train.read_metrics(rung, "val")[-1]["val_bpb"],
        "se": 0.001, "count": 4})
    return parent, calls


def test_prediction_is_written_before_the_target_trains(fake_parent, capsys):
    parent, calls = fake_parent
    cfg = config.make(scaling.ScaleStage, {"run": {"preset": "smoke", "run": "p"}, "scale": {"bootstrap": 40}})
    result = scaling.main(cfg)
    names = [c["run"] for c in calls]
    assert names[-1].startswith("target-") and len(names) == 4 * 2 + 1  # 4 rungs x 2 seeds, then the target
    assert [c["dir"] for c in calls] == [str(parent / "scale" / "runs" / name) for name in names]
    assert all(c["data"] == parent for c in calls)  # every rung reads the parent run's tokenizer and shards
    assert not any(c["prediction_exists"] for c in calls[:-1]) and calls[-1]["prediction_exists"]
    pred = json.loads((parent / "scale" / "prediction.json").read_text())
    assert pred["timestamp"] <= calls[-1]["at"]
    assert {"value", "low", "high", "fit", "law", "timestamp", "git_sha", "target"} <= set(pred)
    saved = json.loads((parent / "scale" / "scaling.json").read_text())
    assert saved["verify"]["prediction_time"] < saved["verify"]["target_started_at"]
    assert saved["verify"]["observed"] == pytest.approx(float(truth(pred["target"]["n"])) + 0.0015, rel=1e-6)
    assert saved["verify"]["prediction"]["relative_error"] < 0.01  # the stand-in follows the law exactly
    assert saved["verify"]["extrapolation"]["params"] > 1.5
    assert (parent / "scale" / "scaling.png").stat().st_size > 0
    # rerun: every rung and the target are done, nothing trains, the prediction is kept as it was
    calls.clear()
    scaling.main(cfg)
    assert calls == []
    assert json.loads((parent / "scale" / "prediction.json").read_text())["timestamp"] == pred["timestamp"]
    assert result["verify"]["prediction"]["inside"] is not None

    capsys.readouterr()
    assert cli.main(["scale", "predict", "--run", "p", "--params", str(4 * pred["target"]["n"])]) == 0
    out = capsys.readouterr().out
    assert "beyond the largest fitted size" in out and "interval" in out
    fitted = json.loads((parent / "scale" / "fit.json").read_text())
    inside = scaling.predict_at(fitted, fitted["n"][1])
    assert inside["extrapolation"] == 1.0 and inside["low"] <= inside["value"] <= inside["high"]


def _row(lines: list[str], first: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first`."""
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


def test_report_section_shows_the_json_numbers(fake_parent):
    from chatsmith import report

    parent, _ = fake_parent
    assert scaling.report_lines(parent, parent / "plots") == []  # no scale/ directory: no section
    cfg = config.make(scaling.ScaleStage, {"run": {"preset": "smoke", "run": "p"}, "scale": {"bootstrap": 40}})
    scaling.main(cfg)
    text = report.write(parent, measure_tokenizer=False).read_text()
    assert "## Scaling law" in text and "(plots/scaling.png)" in text
    assert (parent / "plots" / "scaling.png").stat().st_size > 0
    lines = text.splitlines()
    saved = json.loads((parent / "scale" / "scaling.json").read_text())
    fit = json.loads((parent / "scale" / "fit.json").read_text())
    pred = json.loads((parent / "scale" / "prediction.json").read_text())
    for r in saved["ladder"]:
        cells = _row(lines, str(r["depth"]))
        assert cells[2] == f"{r['n']:,}" and cells[4] == f"{r['tokens']:,}"
        assert cells[6] == ", ".join(f"{x:.4f}" for x in r["losses"])
        assert cells[7] == f"{np.mean(r['losses']):.4f}" and cells[8] == f"{np.std(r['losses'], ddof=1):.4f}"
    law = _row(lines, "L(N) = E + A·N^-α, N without embeddings")
    assert law[1:] == [f"{fit['law_n']['E']:.4f}", f"{fit['law_n']['A']:.4g}", f"{fit['law_n']['alpha']:.4f}"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(pred["timestamp"]))
    assert (f"written {stamp}" in text and f"val loss {pred['value']:.4f}, 90% interval [{pred['low']:.4f}, "
            f"{pred['high']:.4f}]" in text)
    v = saved["verify"]
    observed = v["observed"]
    assert f"Observed: val loss {observed:.4f}" in text
    assert f"inside the interval: {'yes' if pred['low'] <= observed <= pred['high'] else 'no'}" in text
    largest = max(saved["ladder"], key=lambda r: r["n"])
    target = pred["target"]
    assert (f"{target['n'] / largest['n']:.2f}x the largest rung in N, "
            f"{target['compute'] / largest['compute']:.2f}x in training compute" in text)
    # each predictor's error recomputed here from its value and the observed loss
    for name, value in (("E + A·N^-α (the prediction)", pred["value"]),
                        ("pure power law A·N^-α (no E)", pred["baselines"]["power_law"]),
                        ("same as the largest rung", largest["mean"])):
        cells = _row(lines, name)
        assert cells[1] == f"{value:.4f}"
        assert cells[2] == f"{abs(value - observed) / observed:.2%}"
        assert cells[3] == f"{(value - observed) / (observed - pred['fit']['E']):.2%}"


def test_pretrain_into_a_rung_directory_matches_pretrain_in_the_run(tmp_path, chatsmith_home):
    """train.pretrain(cfg, out, data): a rung trains into its own directory from the parent's tokenizer and shards,
    leaves the parent as it was, and gives the very losses `chatsmith pretrain` gives in the parent itself."""
    from chatsmith import tokenizer, train
    from chatsmith.data import shards
    from chatsmith.data.shards import iter_val_batches

    corpus = tmp_path / "corpus.jsonl"
    words = "the model reads text and learns to predict the next token from many small examples".split()
    rng = np.random.default_rng(0)
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(200)))
    common = ["--preset", "smoke", "--run", "p", "--sources", f"local:{corpus}"]
    tokenizer.train_main(config.parse(config.TokenizerStage, [*common, "--vocab-size", "300"]))
    shards.main(config.parse(config.DataStage, common))
    parent = chatsmith_home / "runs" / "p"
    cfg = config.parse(config.PretrainStage, ["--preset", "smoke", "--run", "p", "--depth", "1", "--steps", "6",
                                              "--ckpt-every", "3", "--eval-every", "6", "--eval-tokens", "2048",
                                              "--threads", "1", "--precision", "fp32"])

    def tree(root):
        return {str(q.relative_to(root)): q.stat().st_mtime_ns for q in root.rglob("*")}

    before = tree(parent)
    rung = parent / "scale" / "runs" / "d1-s0"
    train.pretrain(cfg, out=rung, data=parent)
    assert {k: v for k, v in tree(parent).items() if not k.startswith("scale")} == before  # the parent untouched
    for part in ("config.json", "metrics.jsonl", "data_stats.json", "checkpoints/step_000006/manifest.json"):
        assert (rung / part).is_file(), part
    train.main(cfg)  # the same config in the parent run itself
    for kind in ("train", "val"):
        assert train.read_metrics(rung, kind) and ([{k: r[k] for k in r if k not in ("dt", "tok_s", "mfu")}
                                                    for r in train.read_metrics(rung, kind)]
                                                   == [{k: r[k] for k in r if k not in ("dt", "tok_s", "mfu")}
                                                       for r in train.read_metrics(parent, kind)])
    # the rung's last checkpoint on the parent's held-out windows: here one window, the whole val split, so its
    # loss is the training's final val loss (up to bf16, which precision "auto" may choose)
    windows = scaling.val_windows(rung, parent, scaling.ScaleConfig(device_batch=4, seq_len=128, eval_tokens=2048,
                                                                    precision="fp32"))
    assert windows["count"] == 1
    assert windows["loss"] == pytest.approx(train.read_metrics(rung, "val")[-1]["val_loss"], rel=1e-5)
    assert windows["bpb"] == pytest.approx(train.read_metrics(rung, "val")[-1]["val_bpb"], rel=1e-5)
    windows = scaling.val_windows(rung, parent, scaling.ScaleConfig(device_batch=1, seq_len=128, eval_tokens=1024))
    expected = len(list(iter_val_batches(parent / "shards" / "val", 1, 128, 1024)))
    assert windows["count"] == expected >= 2 and windows["se"] > 0


@pytest.mark.parametrize("preset", ["smoke", "cpu"])
def test_ladder_plans_follow_the_rules(preset):
    """Each preset's rungs and target: N about doubling per rung, the target 2-4x the largest rung (cpu), one
    tokens-per-parameter line where min_steps does not bind, >= min_steps steps of whole forward passes, counted here
    from the plans' own numbers."""
    sc = scaling.resolved(config.make(scaling.ScaleStage, {"run": {"preset": preset, "run": "x"}}))
    plans = [scaling.plan(d, sc, 8192) for d in (*sc.depths, sc.target_depth)]
    for p in plans:
        rows = p["batch_tokens"] // sc.seq_len
        assert p["steps"] >= sc.min_steps and rows >= sc.min_batch and p["tokens"] == p["steps"] * p["batch_tokens"]
        assert p["forward_batch"] <= sc.device_batch and rows % p["forward_batch"] == 0
        if p["steps"] > sc.min_steps + 1:  # the line binds, not the floor: D = tokens_per_param x N
            assert p["tokens"] == pytest.approx(sc.tokens_per_param * p["n"], rel=0.02)
    if preset == "cpu":
        assert all(p["tokens"] == pytest.approx(sc.tokens_per_param * p["n"], rel=0.02) for p in plans)
        ratios = [b["n"] / a["n"] for a, b in zip(plans, plans[1:-1])]
        assert len(plans) - 1 in (4, 5) and all(1.6 <= r <= 2.5 for r in ratios), ratios
        assert 2 <= plans[-1]["n"] / plans[-2]["n"] <= 4 and sc.seeds >= 2 and sc.min_steps >= 1000


def test_predict_without_a_fit_is_one_sentence(chatsmith_home, capsys):
    assert cli.main(["scale", "predict", "--run", "nothing", "--params", "1e6"]) == 2
    assert "no scaling fit yet" in capsys.readouterr().err


def test_target_with_checkpoints_but_no_prediction_is_refused(tmp_path):
    from chatsmith.common import UserError

    ck = tmp_path / "runs" / "t" / "checkpoints" / "step_000001"
    ck.mkdir(parents=True)
    with pytest.raises(UserError, match="before its training"):
        scaling.write_prediction(tmp_path, {"target": {"name": "t"}})


def test_smoke_ladder_end_to_end(tmp_path, chatsmith_home):
    """The real thing on a tiny corpus: tokenizer, shards, the smoke ladder, the target, scaling.json (in the default
    suite, so CI runs the smoke protocol)."""
    from chatsmith import tokenizer
    from chatsmith.data import shards

    corpus = tmp_path / "corpus.jsonl"
    words = "the model reads text and learns to predict the next token from many small examples".split()
    rng = np.random.default_rng(0)
    with open(corpus, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n")
    common = ["--preset", "smoke", "--run", "s", "--sources", f"local:{corpus}"]
    tokenizer.train_main(config.parse(config.TokenizerStage, [*common, "--vocab-size", "300"]))
    shards.main(config.parse(config.DataStage, common))
    assert cli.main(["scale", "run", "--preset", "smoke", "--run", "s", "--bootstrap", "40", "--threads", "1"]) == 0
    saved = json.loads((chatsmith_home / "runs" / "s" / "scale" / "scaling.json").read_text())
    assert len(saved["ladder"]) == 4 and all(len(r["losses"]) == 2 for r in saved["ladder"])
    assert all(r["steps"] >= 12 and r["eval_se"] > 0 for r in saved["ladder"])
    assert saved["prediction"]["timestamp"] < saved["verify"]["target_started_at"]
    print(json.dumps(saved["verify"], indent=1))
