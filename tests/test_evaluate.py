"""Evaluation: the batched scorer against brute force, the harness's acc / acc_norm, Wilson intervals, bits per byte
per language, a random model at chance, and `chatsmith eval` end to end on a tiny run (result files and schema)."""

import dataclasses
import json
import math
import random

import pytest
import torch
from conftest import randomize_weights

from chatsmith import checkpoint, config, evaluate, tasks
from chatsmith.common import UserError, run_dir
from chatsmith.model import GPT, ModelConfig
from chatsmith.tasks import MCItem, scoring
from chatsmith.tokenizer import Tokenizer

EN = "Question: which of these is a planet? Answer: Mars is a planet and the sun is a star. " * 3
ZH = "我们今天学习语言模型，它会预测下一个词语。成语的意思是比喻做事情要认真。" * 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([EN, ZH, EN + ZH] * 20, 400, show_progress=False)


def random_model(vocab: int, seq_len: int = 64, seed: int = 0) -> GPT:
    cfg = ModelConfig(depth=2, n_embd=64, head_dim=16, n_head=4, n_kv_head=2, seq_len=seq_len).resolve(vocab)
    model = GPT.build(cfg)
    return randomize_weights(model, seed, matrix_scale=0.5)


@pytest.fixture(scope="module")
def model(tok) -> GPT:
    return random_model(tok.vocab_size)


def brute_force_ll(model: GPT, ctx: list[int], cont: list[int]) -> float:
    """One full forward per continuation token, log-softmax at the last position: the definition itself. A request
    longer than the context window is scored in its last seq_len + 1 tokens (the harness's left truncation)."""
    ctx = [*ctx, *cont][-(model.config.seq_len + 1):][:-len(cont)]
    total = 0.0
    for i, target in enumerate(cont):
        ids = [*ctx, *cont[:i]]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[target])
    return total


# ---------------------------------------------------------------------------------------------------------------------
# the scorer


def test_batched_loglikelihoods_equal_brute_force(model, tok):
    rng = random.Random(0)
    requests = []
    for _ in range(13):  # lengths vary so that rows are padded and split over several batches
        ctx = [tok.bos_id, *[rng.randrange(16, tok.vocab_size) for _ in range(rng.randint(0, 30))]]
        cont = [rng.randrange(16, tok.vocab_size) for _ in range(rng.randint(1, 8))]
        requests.append((ctx, cont))
    long_ctx = [tok.bos_id, *[rng.randrange(16, tok.vocab_size) for _ in range(90)]]  # past seq_len 64: cut left
    requests.append((long_ctx, [5, 77, 300]))
    shared = [tok.bos_id, *tok.encode("Question: which of these is a planet? Answer:")]
    requests += [(shared, [tok.encode(f" {x}")[0]]) for x in "ABC"]  # one-token continuations share a forward
    requests.append((long_ctx, [9]))
    batched = scoring.loglikelihoods(model, requests, batch_tokens=96)
    for (ctx, cont), got in zip(requests, batched):
        assert got == pytest.approx(brute_force_ll(model, ctx, cont), abs=2e-4)
    alone = [scoring.loglikelihoods(model, [r], batch_tokens=10_000)[0] for r in requests[:4]]
    assert alone == pytest.approx(batched[:4], abs=2e-4)  # the batch a row sits in does not change its score


def test_next_token_logits_equal_full_forward(model, tok):
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ("Mars is", "成语", "Question: which of these is a planet?")]
    letters = [tok.encode(x)[0] for x in "ABCD"]
    got = scoring.next_token_logits(model, prompts, letters, batch_tokens=20)
    for p, row in zip(prompts, got):
        with torch.no_grad():
            ref = model(torch.tensor([p]))[0, -1][letters]
        assert row == pytest.approx(ref.tolist(), abs=1e-4)


def test_encode_pair_moves_trailing_space_like_the_harness(tok):
    ctx, cont = scoring.encode_pair(tok, "Answer: ", "Mars")
    assert ctx == [tok.bos_id, *tok.encode("Answer:")]
    assert tok.decode(cont) == " Mars"
    whole = tok.encode("Question: x\nAnswer: Mars")
    ctx, cont = scoring.encode_pair(tok, "Question: x\nAnswer:", " Mars")
    assert ctx[1:] + cont == whole


def test_acc_and_acc_norm_follow_the_harness():
    # lm_eval/api/task.py (v0.4.12): pred = argmax(lls); pred_norm = argmax(lls / [len(choice) for choice in choices])
    choices = ["no", "a very long answer"]  # 2 and 18 characters (the " " delimiter is not counted)
    lls = [-4.0, -9.0]  # acc picks 0; normalised: -2.0 vs -0.5 -> picks 1
    assert scoring.mc_correct(lls, choices, gold=1) == (False, True)
    assert scoring.mc_correct(lls, choices, gold=0) == (True, False)
    # three choices, worked out: lls / len = [-6/3, -6/2, -7/7] = [-2, -3, -1] -> 2; raw argmax of [-6, -6, -7] -> 0
    assert scoring.mc_correct([-6.0, -6.0, -7.0], ["abc", "de", "fghijkl"], gold=2) == (False, True)
    # ties go to the first index, as numpy.argmax does
    assert scoring.mc_correct([-1.0, -1.0], ["x", "y"], gold=0) == (True, True)
    assert scoring.argmax([0.5, 2.0, 2.0, -1.0]) == 1


def test_mc_pipeline_scores_the_harness_requests(model, tok):
    """score_mc_base sends (query, " " + choice) pairs and applies mc_correct to their log-likelihoods."""
    item = MCItem(query="Question: which is a planet?\nAnswer:", choices=("Mars", "the sun is a star"), gold=0)
    cfg = evaluate.EvalConfig()
    loaded = checkpoint.LoadedModel(model, tok, None, None, False, None)
    task = tasks.Task(name="t", kind="mc", stages=("base",), loader=lambda s: [item])
    got = evaluate.score_mc_base(task, [item], loaded, cfg)
    lls = [brute_force_ll(model, *scoring.encode_pair(tok, item.query, " " + c)) for c in item.choices]
    assert (got["acc"][0], got["acc_norm"][0]) == scoring.mc_correct(lls, item.choices, item.gold)


def test_fewshot_context_is_the_harness_layout():
    shot = MCItem(query="Question: 1+1?\nAnswer:", choices=("2", "3"), gold=0)
    item = MCItem(query="Question: 2+2?\nAnswer:", choices=("4", "5"), gold=0, description="Maths.\n\n")
    assert scoring.fewshot_context(item, [shot, shot]) == (
        "Maths.\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:")


def test_wilson_interval_solves_its_quadratic():
    # the Wilson bounds are the p with (phat - p)^2 = z^2 p (1 - p) / n: solved here as a quadratic in p
    for k, n in ((0, 10), (8, 10), (50, 100), (199, 200), (1, 1)):
        z, phat = scoring.Z95, k / n
        a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
        disc = math.sqrt(b * b - 4 * a * c)
        assert scoring.wilson(k, n) == pytest.approx(((-b - disc) / (2 * a), (-b + disc) / (2 * a)), abs=1e-12)
    assert scoring.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert scoring.wilson(0, 0) == (0.0, 1.0)
    assert scoring.centered(0.25, 0.25) == 0 and scoring.centered(1.0, 0.25) == 1
    assert scoring.centered(0.625, 0.5) == pytest.approx(0.25)


def test_letter_prompt_lists_choices_with_letters():
    item = MCItem(query="q", choices=("A", "B"), chat_choices=("red", "blue"), gold=1, question="Which colour?")
    assert scoring.letter_prompt(item) == ("Multiple choice question: Which colour?\n- red=A\n- blue=B\n"
                                           "Answer with the letter of the right choice only.")
    zh = MCItem(query="q", choices=("甲", "乙"), gold=0, question="哪个？", lang="zh")
    assert scoring.letter_prompt(zh).startswith("选择题：哪个？\n- 甲=A\n- 乙=B\n")


# ---------------------------------------------------------------------------------------------------------------------
# a random model sits at chance


@pytest.mark.parametrize("name", ["arc_easy", "mmlu"])
def test_random_model_scores_within_chance(name, tok):
    pytest.importorskip("pyarrow")
    try:
        task = tasks.get(name)
        items = tasks.subset(task.load("pkg"), 120, 0, name)
    except UserError as e:
        pytest.skip(str(e))
    big = random_model(tok.vocab_size, seq_len=512, seed=1)
    loaded = checkpoint.LoadedModel(big, tok, None, None, False, None)
    outcome = evaluate.score_mc_base(task, items, loaded, evaluate.EvalConfig(batch_tokens=4096))
    result = evaluate.summarise(task, "base", items, outcome)
    lo, hi = result["ci95"]
    assert result["n"] == 120
    assert lo <= result["chance"] <= hi, result


# ---------------------------------------------------------------------------------------------------------------------
# bits per byte and `chatsmith eval` end to end


def write_corpus(path, n=120, seed=0):
    rng = random.Random(seed)
    words_en, chars_zh = EN.split(), list(ZH)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            if i % 3 == 0:
                text = "".join(rng.choice(chars_zh) for _ in range(rng.randint(20, 90)))
            else:
                text = " ".join(rng.choice(words_en) for _ in range(rng.randint(10, 60)))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


@pytest.fixture
def tiny_run(tmp_path, tok):
    """Run 'tiny': a tokenizer, val shards (English and Chinese documents), a base and a chat checkpoint."""
    from chatsmith.data import shards

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus)
    run = run_dir("tiny")
    tok.save(run / "tokenizer")
    shards.main(config.parse(config.DataStage, ["--preset", "smoke", "--run", "tiny", "--sources", f"local:{corpus}",
                                                "--val-fraction", "0.3", "--workers", "1"]))
    model = random_model(tok.vocab_size)
    meta = {"config": {"model": dataclasses.asdict(model.config)}}
    checkpoint.save(run / "checkpoints", 7, model.state_dict(), meta=meta)
    checkpoint.save(run / "chat" / "checkpoints", 3, model.state_dict(), meta=meta)
    return run, model


def test_bits_per_byte_per_language_against_direct_sums(tiny_run, tok):
    from chatsmith.data.shards import ShardReader

    run, model = tiny_run
    loaded = checkpoint.LoadedModel(model, tok, None, run, False, None)
    got = evaluate.bits_per_byte(loaded, run / "shards" / "val", batch_tokens=100)
    reader = ShardReader(run / "shards" / "val")
    sums = {"en": [0.0, 0], "zh": [0.0, 0]}
    for i in range(len(reader)):
        ids = reader.doc(i).tolist()
        lang = "zh" if evaluate.han_fraction(tok.decode(ids[1:])) >= evaluate.ZH_HAN_FRACTION else "en"
        for row in evaluate.document_rows(ids, model.config.seq_len):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([row[:-1]]))[0].double(), -1)
            for t, target in enumerate(row[1:]):
                n_bytes = len(tok.id_bytes(target)) if target >= 16 else 0
                if n_bytes:
                    sums[lang][0] -= float(logp[t, target])
                    sums[lang][1] += n_bytes
    assert sums["en"][1] and sums["zh"][1]
    for lang in ("en", "zh"):
        assert got[lang] == pytest.approx(sums[lang][0] / math.log(2) / sums[lang][1], rel=1e-5)
    total = (sums["en"][0] + sums["zh"][0]) / math.log(2) / (sums["en"][1] + sums["zh"][1])
    assert got["all"] == pytest.approx(total, rel=1e-5)


def test_document_rows_cover_every_target_once():
    ids = list(range(23))
    rows = evaluate.document_rows(ids, 5)
    assert all(len(r) <= 6 for r in rows)
    assert [t for r in rows for t in r[1:]] == ids[1:]
    assert evaluate.document_rows([0], 5) == []


def write_local_tasks(tmp_path):
    mc = tmp_path / "planets.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Which is a planet?", "choices": ["Mars", "the sun"], "answer": 0},
        {"question": "Which is a star?", "choices": ["Mars", "the sun"], "answer": "the sun"},
        {"question": "Which is red?", "choices": ["Mars", "the sea", "snow"], "answer": 0},
    ]) + "\n", encoding="utf-8")
    qa = tmp_path / "sums.jsonl"
    qa.write_text("\n".join(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)})
                            for a, b in ((1, 2), (3, 4))) + "\n", encoding="utf-8")
    return mc, qa


def stage(*argv):
    return config.parse(evaluate.EvalStage, ["--precision", "fp32", "--threads", "1", *argv])


def test_eval_main_writes_schema_and_tables(tiny_run, tmp_path):
    run, _ = tiny_run
    mc, qa = write_local_tasks(tmp_path)
    base = evaluate.main(stage("--run", "tiny", "--stage", "base", "--tasks", f"local:{mc}", f"local:{qa}",
                               "--limit", "0", "--max-tokens", "4"))
    chat = evaluate.main(stage("--run", "tiny", "--stage", "chat", "--tasks", f"local:{mc}", f"local:{qa}",
                               "--no-bpb", "--max-tokens", "4", "--batch-size", "2"))
    path = run / "eval" / "base_step000007.json"
    assert path.is_file() and (run / "eval" / "chat_step000003.md").is_file()
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(base))
    assert set(saved) == {"stage", "model", "step", "run", "checkpoint", "created", "seconds", "limit", "fewshot",
                          "bpb", "tasks", "core", "chatcore"}
    assert (saved["stage"], saved["step"], saved["run"], saved["limit"]) == ("base", 7, "tiny", 0)
    assert (saved["model"], chat["model"]) == ("base", "sft")
    assert set(saved["bpb"]) == {"all", "en", "zh"} and saved["bpb"]["zh"] is not None
    planets = saved["tasks"]["local:planets"]
    assert set(planets) == {"n", "metric", "acc", "acc_norm", "score", "ci95", "chance", "centered"}
    assert planets["n"] == 3 and planets["metric"] == "acc_norm" and planets["score"] == planets["acc_norm"]
    assert planets["chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)
    assert planets["ci95"] == pytest.approx(list(scoring.wilson(round(planets["score"] * 3), 3)))
    assert planets["centered"] == pytest.approx(scoring.centered(planets["score"], planets["chance"]))
    assert saved["tasks"]["local:sums"]["metric"] == "exact" and saved["tasks"]["local:sums"]["chance"] == 0
    assert saved["core"] == pytest.approx(planets["centered"]) and saved["chatcore"] is None
    assert chat["stage"] == "chat" and chat["bpb"] is None and chat["core"] is None
    assert chat["tasks"]["local:planets"]["metric"] == "acc" and chat["tasks"]["local:planets"]["acc_norm"] is None
    assert chat["chatcore"] == pytest.approx(sum(r["centered"] for r in chat["tasks"].values()) / 2)
    assert [r["stage"] for r in evaluate.load_results(run)] == ["base", "chat"]
    table = evaluate.markdown_table(saved)
    assert "| local:planets | 3 | acc_norm |" in table and "val bits per byte" in table
    assert (run / "eval" / "base_step000007.md").read_text(encoding="utf-8") == table


def test_eval_user_errors(tiny_run, tmp_path):
    with pytest.raises(UserError, match="chat models"):
        evaluate.main(stage("--run", "tiny", "--stage", "base", "--tasks", "gsm8k"))
    with pytest.raises(UserError, match="unknown task"):
        evaluate.main(stage("--run", "tiny", "--tasks", "nope"))
    with pytest.raises(UserError, match="does not exist"):
        evaluate.main(stage("--run", "tiny", "--tasks", f"local:{tmp_path / 'missing.jsonl'}"))
    with pytest.raises(UserError, match="--stage must be one of"):
        stage("--stage", "rl")


def test_generation_judges_every_item_and_passes_errors_on(model, tok):
    loaded = checkpoint.LoadedModel(model, tok, None, None, True, None)
    items = [tasks.GenItem(prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(5)]
    seen = dict(evaluate.judge_replies(loaded, items, "chat", 3, False, 2, lambda item, reply: item.answer == "3"))
    assert seen == {0: False, 1: False, 2: True, 3: False, 4: False}

    def broken(item, reply):
        raise ValueError("checker broke")

    with pytest.raises(ValueError, match="checker broke"):  # raised here, not lost in a worker thread (or a hang)
        list(evaluate.judge_replies(loaded, items, "base", 3, False, 2, broken))


def test_a_later_eval_of_some_tasks_keeps_the_others_and_rl_results_have_their_own_file(tmp_path):
    from chatsmith.common import atomic_write_json

    run = tmp_path / "run"
    sft_ck, rl_ck = run / "chat" / "checkpoints" / "step_000040", run / "rl" / "checkpoints" / "step_000040"
    assert evaluate.model_kind(sft_ck, True) == "sft" and evaluate.model_kind(rl_ck, True) == "rl"
    assert evaluate.model_kind(run / "checkpoints" / "step_000040", False) == "base"
    sft_path, rl_path = (evaluate.result_path(run, "chat", 40, kind=k) for k in ("sft", "rl"))
    assert sft_path.name == "chat_step000040.json" and rl_path.name == "rl_step000040.json"
    as_base = [evaluate.result_path(run, "base", 40, kind=k).name for k in ("base", "sft", "rl")]
    assert as_base == ["base_step000040.json", "chat_base_step000040.json", "rl_base_step000040.json"]
    old = {"checkpoint": str(sft_ck), "bpb": {"all": 1.9}, "tasks": {"mmlu": {"score": 0.3}, "gsm8k": {"score": 0}}}
    atomic_write_json(sft_path, old)
    assert evaluate._earlier(sft_path, str(sft_ck)) == old  # its tasks and bpb are kept by a later eval
    assert evaluate._earlier(sft_path, str(rl_ck)) == {}  # another checkpoint's result is not
    assert evaluate._earlier(rl_path, str(rl_ck)) == {}
