"""lm-evaluation-harness integration (sleepzoo.harness, docs/lm-eval.md): loglikelihood, rolling loglikelihood
and generation through the sleep stream against the engine's forward and model.generate, the harness run
offline over YAML tasks of the test's own (in process and through the command line), and bad model_args."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[eval]'")

import sleepzoo  # noqa: E402
from sleepzoo import SleepzooError  # noqa: E402
from sleepzoo.harness import SleepzooLM, TaskVocabulary, first_stop  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ["[UNK]", "[PAD]", "<|endoftext|>", "the", "cat", "dog", "sat", "on", "mat", "red", "blue", "is", "a",
         "yes", "no", ".", "?", ":", "Q", "A"] + [str(i) for i in range(10)]
# A tiny Jet-Nemotron: attention, Jet (fast weights), sliding-window attention; loops over blocks 1..3.
JET = {
    "architectures": ["JetNemotronForCausalLM"], "model_type": "jet_nemotron", "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "layer_types": ["attn", "jet", "swa", "jet"], "vocab_size": 34, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
    "efficient_attention_config": {
        "jet": {"conv_size": 4, "dconv_generator_reduction": 4, "expand_v": 2.0, "head_dim": 8, "num_heads": 2,
                "norm_eps": "1e-5", "mode": "chunk", "dconv_implementation": "triton"},
        "swa": {"window_size": 5}},
    "sleepzoo": {"loop_start": 1, "loop_end": 4},
}
SLEEP = {"window": 5, "loops": 3}  # every request spans several windows: the model sleeps and evicts


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A pretrained folder as a user has it: config.json, model.safetensors (random weights), tokenizer.json."""
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("tiny-jet")
    torch.manual_seed(0)
    model = sleepzoo.from_config(JET)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # every weight non-trivial (zero o_proj would hide the loop)
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    (out / "config.json").write_text(json.dumps(JET))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(out / "model.safetensors"))
    write_tokenizer(out / "tokenizer.json")
    return out


def reference(folder: Path) -> torch.nn.Module:
    return sleepzoo.from_pretrained(folder, dtype="float64").eval()


def encode(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def direct_logprobs(model, ids: list[int], **sleep) -> torch.Tensor:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, from one forward of the engine over the whole sequence."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logits = model(x, return_logits=True, **sleep).logits[0].double()  # (T, vocab)
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], logits.argmax(-1)


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


PAIRS = [("the cat sat on the mat . Q : is the cat red ? A :", " yes"),
         ("the cat sat on the mat . Q : is the cat red ? A :", " no ."),
         ("a dog", " is a blue dog on a red mat ."),
         ("Q", " 1 2 3 4 5 6 7 8 9 0 1 2")]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_is_the_continuation_log_softmax_sum_of_the_engine_forward(folder, batch_size):
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", batch_size=batch_size, **SLEEP)
    got = lm.loglikelihood(requests(*PAIRS), disable_tqdm=True)
    model = reference(folder)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, got):
        c, k = encode(ctx), encode(cont)
        lp, argmax = direct_logprobs(model, c + k, **SLEEP)
        assert ll == pytest.approx(float(lp[-len(k):].sum()), rel=1e-10, abs=1e-10)
        assert greedy == bool((argmax[-len(k):] == torch.tensor(k)).all())
    # the settings reach the stream: no sleep (loops 1) scores the long request differently
    awake = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", window=5, loops=1)
    (ll1, _), = awake.loglikelihood(requests(PAIRS[3]), disable_tqdm=True)
    lp1, _ = direct_logprobs(model, encode(PAIRS[3][0] + PAIRS[3][1]), window=5, loops=1)
    assert ll1 == pytest.approx(float(lp1[-12:].sum()), rel=1e-10)
    assert abs(ll1 - got[3][0]) > 1e-3


def test_windows_fed_in_pieces_score_the_same(folder, monkeypatch):
    """Long windows are fed SCORE_PIECE tokens at a time (bounded (batch, piece, vocab) scores): same values."""
    import sleepzoo.harness as harness

    monkeypatch.setattr(harness, "SCORE_PIECE", 2)
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", batch_size=2, **SLEEP)
    model = reference(folder)
    for (ctx, cont), (ll, _) in zip(PAIRS, lm.loglikelihood(requests(*PAIRS), disable_tqdm=True)):
        k = encode(cont)
        lp, _ = direct_logprobs(model, encode(ctx) + k, **SLEEP)
        assert ll == pytest.approx(float(lp[-len(k):].sum()), rel=1e-10, abs=1e-10)
    ctx = "the cat sat on the mat . Q : is the cat red ? A :"
    full = greedy_text(model, folder, ctx, 5)
    stop = first_stop(full, ["<|endoftext|>"])
    assert lm.generate_one(ctx, {"max_gen_toks": 5}) == (full if stop is None else full[:stop])


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation(folder):
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", **SLEEP)
    ctx = encode("the cat sat on the mat .")
    out = reference(folder).generate(torch.tensor([ctx]), 4, **SLEEP)[0, len(ctx):].tolist()
    cont = " " + " ".join(WORDS[i] for i in out)
    if any(WORDS[i] in ("[UNK]", "[PAD]") for i in out):
        pytest.skip("the random model's greedy continuation holds a special token")
    (_, greedy), (_, other) = lm.loglikelihood(requests(("the cat sat on the mat .", cont),
                                                        ("the cat sat on the mat .", " " + WORDS[(out[0] + 1) % 20])),
                                               disable_tqdm=True)
    assert greedy is True and other is False


def test_max_length_keeps_the_last_tokens(folder):
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", max_length=7, **SLEEP)
    ctx, cont = PAIRS[0]
    (ll, _), = lm.loglikelihood(requests((ctx, cont)), disable_tqdm=True)
    tokens = (encode(ctx) + encode(cont))[-8:]
    lp, _ = direct_logprobs(reference(folder), tokens, **SLEEP)
    assert ll == pytest.approx(float(lp[-1]), rel=1e-10)


def test_rolling_loglikelihood_is_the_whole_document_through_the_stream(folder):
    docs = ["the cat sat on the mat . the dog sat on a red mat . Q : is the mat blue ? A : no .", "cat"]
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", batch_size=2, **SLEEP)
    got = lm.loglikelihood_rolling(requests((docs[0],), (docs[1],)), disable_tqdm=True)
    model = reference(folder)
    eot = WORDS.index("<|endoftext|>")
    assert lm.eot_token_id == eot
    for doc, ll in zip(docs, got):
        lp, _ = direct_logprobs(model, [eot] + encode(doc), **SLEEP)
        assert ll == pytest.approx(float(lp.sum()), rel=1e-10)
    # an empty context is the end-of-text token, as for a rolling document
    (ll, _), = lm.loglikelihood(requests(("", docs[0])), disable_tqdm=True)
    assert ll == pytest.approx(got[0], rel=1e-10)


def greedy_text(model, folder: Path, ctx: str, n: int) -> str:
    """model.generate's greedy tokens, decoded by the `tokenizers` library itself."""
    from tokenizers import Tokenizer

    ids = encode(ctx)
    out = model.generate(torch.tensor([ids]), n, **SLEEP)[0, len(ids):].tolist()
    return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(out)


def test_generate_until_is_model_generate_cut_at_the_stop_string(folder):
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", **SLEEP)
    model = reference(folder)
    ctx = "the cat sat on the mat . Q : is the cat red ? A :"
    full = greedy_text(model, folder, ctx, 12)  # 12 tokens: the prompt (17) and the answer cross window boundaries
    words = full.split()
    stops = [words[3], "<|endoftext|>"]
    cut = first_stop(full, stops)
    assert cut is not None and 0 < cut < len(full)
    assert lm.generate_until(requests((ctx, {"until": [words[3]], "max_gen_toks": 12, "do_sample": False})),
                             disable_tqdm=True) == [full[:cut]]
    no_stop = first_stop(full, ["<|endoftext|>"])
    want = full if no_stop is None else full[:no_stop]
    assert lm.generate_one(ctx, {"until": ["zzz"], "max_gen_toks": 12, "temperature": 0.0}) == want
    # sampling: model.generate's sampler with the same seed draws the same tokens
    ids = encode(ctx)
    g = torch.Generator().manual_seed(5)
    sampled = model.generate(torch.tensor([ids]), 6, do_sample=True, temperature=0.7, top_k=5, generator=g, **SLEEP)
    want = lm.tok_decode(sampled[0, len(ids):].tolist())
    want = want if first_stop(want, ["<|endoftext|>"]) is None else want[:first_stop(want, ["<|endoftext|>"])]
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", seed=5, **SLEEP)
    assert lm.generate_one(ctx, {"max_gen_toks": 6, "do_sample": True, "temperature": 0.7, "top_k": 5}) == want


def test_a_run_directory_with_its_task_vocabulary(tmp_path):
    from sleepzoo.checkpoint import save_weights

    recipe = sleepzoo.load_recipe(REPO / "recipes" / "rule110-tiny.yaml", overrides=["sleep.loops=2"])
    torch.manual_seed(1)
    model = sleepzoo.build_model(recipe)
    task = sleepzoo.build_task(recipe)
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    save_weights(model, run / "final" / "model.safetensors", metadata={"step": "3"})
    lm = SleepzooLM(run=str(run), device="cpu", dtype="float64", batch_size=2)
    assert isinstance(lm.tok, TaskVocabulary) and lm.tok.vocab == task.vocab
    bits = " ".join("01"[(i * 7) % 3 % 2] for i in range(40))
    (ll, _), = lm.loglikelihood(requests((bits, " 1 0")), disable_tqdm=True)
    ids = [task.vocab.index(t) for t in (bits + " 1 0").split()]
    lp, _ = direct_logprobs(model.double().eval(), ids)  # the run's own sleep settings: window 24, loops 2
    assert ll == pytest.approx(float(lp[-2:].sum()), rel=1e-10)
    with pytest.raises(SleepzooError, match="not tokens of the run's task vocabulary"):
        lm.loglikelihood(requests(("0 1 cat", " 1")), disable_tqdm=True)


@pytest.mark.parametrize("args, words", [
    ({"loops": 0}, ["loops=0", ">= 1"]),
    ({"dtype": "float8"}, ["dtype='float8'", "float32"]),
    ({"batch_size": "auto"}, ["batch_size='auto'", "integer"]),
    ({"color": "red"}, ["unknown color", "allowed: run, pretrained"]),
    ({"eviction": "evict_all"}, ["evict_all"]),
    ({"run": "x"}, ["exactly one of run=RUN_DIR or pretrained=FOLDER"]),
    ({"tokenizer": "nowhere/tokenizer.json"}, ["nowhere/tokenizer.json", "does not exist"]),
    ({"device": "tpu:9"}, ["device='tpu:9'"]),
])
def test_bad_model_args_are_one_clear_error(folder, args, words):
    with pytest.raises(SleepzooError) as info:
        SleepzooLM(pretrained=str(folder), **args)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_model_args_win_over_the_harness_options(folder, capsys):
    """The command line always passes --batch_size and --device (cuda:0 by default): model_args' values hold."""
    lm = SleepzooLM.create_from_arg_string(f"pretrained={folder},batch_size=3,device=cpu",
                                           {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert lm.batch_size == 3 and lm.device == torch.device("cpu")
    lm = SleepzooLM.create_from_arg_string(f"pretrained={folder}", {"batch_size": "4", "device": "cpu"})
    assert lm.batch_size == 4 and lm.device == torch.device("cpu")
    if not torch.cuda.is_available():  # the harness's default device on a machine without one: cpu, said once
        lm = SleepzooLM.create_from_arg_string(f"pretrained={folder}", {"device": "cuda:0"})
        assert lm.device == torch.device("cpu") and "CUDA is not available" in capsys.readouterr().err


def test_bad_generation_kwargs_are_one_clear_error(folder):
    lm = SleepzooLM(pretrained=str(folder), device="cpu", **SLEEP)
    with pytest.raises(SleepzooError, match="repetition_penalty not supported.*until, max_gen_toks"):
        lm.generate_one("the cat", {"until": ["."], "repetition_penalty": 1.1})
    with pytest.raises(SleepzooError, match="max_gen_toks=0 is invalid"):
        lm.generate_one("the cat", {"max_gen_toks": 0})


# ------------------------------------------------------------------------------- the harness itself, offline
MC = [{"question": "Q : is the cat red ? A :", "choices": ["yes", "no", "blue"], "answer": 1},
      {"question": "the dog sat on the", "choices": ["mat", "cat"], "answer": 0},
      {"question": "a red", "choices": ["dog", "mat", "cat", "is"], "answer": 2},
      {"question": "the cat is", "choices": ["red", "blue"], "answer": 1}]
LL = [{"context": "the cat sat on the", "continuation": "mat"}, {"context": "Q : 1 2 3", "continuation": "4 5"}]
GEN = [{"question": "the cat sat on the mat . the cat", "answer": "sat on the mat"},
       {"question": "Q : 1 2", "answer": "3"}]
ROLL = [{"text": "the cat sat on the mat . the dog is red ."}, {"text": "Q : 1 2 3 4 5 6 7 8 9"}]


def write_tasks(root: Path) -> None:
    for name, rows in (("mc", MC), ("ll", LL), ("gen", GEN), ("roll", ROLL)):
        (root / f"{name}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def task(name: str, body: str) -> None:
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / name[3:]}.json\n"
            f"test_split: test\n{body}")
    task("sz_mc", "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                  "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    task("sz_ll", "output_type: loglikelihood\ndoc_to_text: '{{context}} '\ndoc_to_target: '{{continuation}}'\n"
                  "metric_list:\n  - metric: acc\n  - metric: perplexity\n")
    task("sz_gen", "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
                   "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n")
    task("sz_roll", "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                    "metric_list:\n  - metric: word_perplexity\n")


def mc_accuracy(lm: SleepzooLM) -> float:
    """Multiple choice by hand: the harness puts the target delimiter " " between question and choice."""
    acc = []
    for doc in MC:
        lls = [ll for ll, _ in lm.loglikelihood(requests(*[(doc["question"], " " + c) for c in doc["choices"]]),
                                                disable_tqdm=True)]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
    return sum(acc) / len(acc)


def by_hand(lm: SleepzooLM) -> dict[str, float]:
    """The four tasks' metrics computed from the model's own answers, as the harness defines them."""
    # loglikelihood: (doc_to_text, doc_to_target) with no delimiter; the harness moves the text's trailing space
    ll = lm.loglikelihood(requests(*[(d["context"] + " ", d["continuation"]) for d in LL]), disable_tqdm=True)
    gen = [lm.generate_one(d["question"], {"until": ["."], "max_gen_toks": 6, "do_sample": False}) for d in GEN]
    roll = lm.loglikelihood_rolling(requests(*[(d["text"],) for d in ROLL]), disable_tqdm=True)
    words = sum(len(d["text"].split()) for d in ROLL)
    return {"sz_mc": mc_accuracy(lm), "sz_ll": sum(g for _, g in ll) / len(ll),
            "sz_ll_ppl": math.exp(-sum(x for x, _ in ll) / len(ll)),
            "sz_gen": sum(g.strip() == d["answer"] for g, d in zip(gen, GEN)) / len(GEN),
            "sz_roll": math.exp(-sum(roll) / words)}


MODEL_ARGS = "window=5,loops=3,dtype=float64,device=cpu,batch_size=2"


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    for key, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets")), ("HF_HOME", str(tmp_path / "hf"))):
        monkeypatch.setenv(key, value)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    return tasks


def test_simple_evaluate_offline_on_local_yaml_tasks(folder, offline):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="sleepzoo", model_args=f"pretrained={folder},{MODEL_ARGS}",
                                  tasks=["sz_mc", "sz_ll", "sz_gen", "sz_roll"],
                                  task_manager=TaskManager(include_path=str(offline)))
    got = out["results"]
    want = by_hand(SleepzooLM(pretrained=str(folder), window=5, loops=3, dtype="float64", device="cpu"))
    assert got["sz_mc"]["acc,none"] == pytest.approx(want["sz_mc"], abs=1e-12)
    assert got["sz_ll"]["acc,none"] == pytest.approx(want["sz_ll"], abs=1e-12)
    assert got["sz_ll"]["perplexity,none"] == pytest.approx(want["sz_ll_ppl"], rel=1e-9)
    assert got["sz_gen"]["exact_match,none"] == pytest.approx(want["sz_gen"], abs=1e-12)
    assert got["sz_roll"]["word_perplexity,none"] == pytest.approx(want["sz_roll"], rel=1e-9)
    assert len(out["samples"]["sz_mc"]) == len(MC)


def test_the_command_line_runs_the_harness_with_the_model_registered(folder, offline, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "sleepzoo.harness", "--model", "sleepzoo", "--model_args",
           f"pretrained={folder},{MODEL_ARGS}", "--tasks", "sz_mc", "--include_path", str(offline),
           "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sz_mc" in done.stdout and "acc" in done.stdout
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    acc = json.loads(result.read_text())["results"]["sz_mc"]["acc,none"]
    want = mc_accuracy(SleepzooLM(pretrained=str(folder), window=5, loops=3, dtype="float64", device="cpu"))
    assert acc == pytest.approx(want, abs=1e-12)


def test_the_command_lines_bad_model_argument_is_one_line(folder, offline, capsys):
    from sleepzoo.harness import main

    with pytest.raises(SystemExit) as info:
        main(["--model", "sleepzoo", "--model_args", f"pretrained={folder},loops=0", "--tasks", "sz_mc",
              "--include_path", str(offline)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and last.startswith("error: ") and "loops=0" in last, last


def test_adaptive_sleep_reaches_the_harness(folder):
    """loops=auto with its bounds: the scores are the engine's under the same adaptive settings."""
    sleep = {"window": 5, "loops": "auto", "max_loops": 4, "tolerance": 0.2}
    lm = SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", **sleep)
    got = lm.loglikelihood(requests(*PAIRS), disable_tqdm=True)
    model = reference(folder)
    for (ctx, cont), (ll, _) in zip(PAIRS, got):
        k = encode(cont)
        lp, _ = direct_logprobs(model, encode(ctx) + k, **sleep)
        assert ll == pytest.approx(float(lp[-len(k):].sum()), rel=1e-10, abs=1e-10)
    with pytest.raises(SleepzooError, match="tolerance"):
        SleepzooLM(pretrained=str(folder), dtype="float64", device="cpu", window=5, loops=2, tolerance=0.2)
