"""Multi-process training (torchrun, gloo on a CPU) and mixed precision in the trainer.

The multi-process tests start ``python -m torch.distributed.run --nproc_per_node=2 -m sleepzoo train`` as a
subprocess on a tiny Rule 110 recipe and compare it with the same recipe trained in this process: the
same global batch gives the same loss curve and weights, up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sleepzoo import distributed
from sleepzoo.checkpoint import list_checkpoints
from sleepzoo.config import RecipeError, load_recipe
from sleepzoo.registry import SleepzooError
from sleepzoo.precision import Precision
from sleepzoo.train import train

TIMING = ("tokens_per_s", "elapsed_s", "train_time_s")
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# slicing the global batch, weighting the slices


@pytest.mark.parametrize("total,world", [(6, 2), (5, 2), (7, 3), (3, 3), (64, 8), (10, 4)],
                         ids=lambda v: str(v))
def test_slices_cover_the_global_batch_exactly_once(total, world):
    bounds = [distributed.shard_bounds(total, world, r) for r in range(world)]
    rows = [i for lo, hi in bounds for i in range(lo, hi)]
    assert rows == list(range(total))  # in rank order, each row once
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_batch_smaller_than_the_world_is_refused():
    with pytest.raises(SleepzooError, match=r"train.batch_size: 2 .* 3 processes"):
        distributed.shard_bounds(2, 3, 0)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 8):
        super().__init__()
        self.embed, self.mix, self.out = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab)

    def forward(self, ids, targets):
        logits = self.out(torch.tanh(self.mix(self.embed(ids))))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def test_uneven_slices_weighted_give_the_one_process_gradient():
    """3 ranks, 7 examples (slices of 2, 2, 3) with different numbers of targets per example: the
    weighted per-slice gradients, averaged as DDP averages them, equal the whole batch's gradient."""
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 7, (7, 10), generator=g)
    targets = torch.where(torch.rand(7, 10, generator=g) < 0.4, torch.randint(0, 7, (7, 10), generator=g), -100)
    targets[:, 0] = 3  # every example has a target

    def grads(rows: slice, weight: float) -> list[torch.Tensor]:
        model.zero_grad()
        (model(ids[rows], targets[rows]) * weight).backward()
        return [p.grad.clone() for p in model.parameters()]

    whole = grads(slice(None), 1.0)
    world, total = 3, int((targets != -100).sum())
    parts = []
    for r in range(world):
        lo, hi = distributed.shard_bounds(7, world, r)
        n = int((targets[lo:hi] != -100).sum())
        parts.append(grads(slice(lo, hi), distributed.loss_weight(n, total, world)))
    counts = [int((targets[slice(*distributed.shard_bounds(7, world, r))] != -100).sum()) for r in range(world)]
    assert len(set(counts)) > 1  # the ranks really hold different numbers of targets
    for w, *ps in zip(whole, *parts):
        torch.testing.assert_close(sum(ps) / world, w, rtol=1e-12, atol=1e-12)
    unweighted = [sum(ps) / world for ps in zip(*[grads(slice(*distributed.shard_bounds(7, world, r)), 1.0)
                                                  for r in range(world)])]
    assert not all(torch.allclose(u, w) for u, w in zip(unweighted, whole))  # plain averaging would be wrong


def test_helpers_alone_are_a_group_of_one():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_reduce_sum([1.5, 2.0]).tolist() == [1.5, 2.0]
    assert distributed.on_main(lambda: 42) == 42
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.device_for(torch.device("cpu")) == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# mixed precision


def test_bad_autocast_and_parallel_values_are_named():
    with pytest.raises(RecipeError, match=r"train.autocast: 'fp8' is not allowed; allowed: none, bf16, fp16"):
        tiny_recipe("train.autocast=fp8")
    with pytest.raises(RecipeError, match=r"train.parallel: 'zero3' is not allowed; allowed: ddp, fsdp"):
        tiny_recipe("train.parallel=zero3")
    with pytest.raises(RecipeError, match=r"stages\[0\] \(a\).train.autocast: a stage may not set it"):
        tiny_recipe("stages=[{name: a, steps: 1, train: {autocast: bf16}}]")


def test_fp16_on_a_cpu_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(RecipeError, match=r"train.autocast: 'fp16' needs a CUDA device.*train.autocast=bf16"):
        train(tiny_recipe("train.autocast=fp16"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_bf16_autocast_casts_the_forward_and_keeps_the_loss_float32():
    recipe = tiny_recipe()
    import sleepzoo

    torch.manual_seed(0)
    model = sleepzoo.build_model(recipe)
    batch = sleepzoo.build_task(recipe).generate(4, seed=0)
    with Precision("bf16", torch.device("cpu")).autocast():
        out = model(batch["input_ids"], batch["targets"])
    assert out.logits.dtype == torch.bfloat16  # the head ran in bfloat16
    assert out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights themselves are not cast
    reference = model(batch["input_ids"], batch["targets"]).loss
    assert out.loss.item() != reference.item()
    assert out.loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_bf16_training_on_a_cpu_follows_float32(tmp_path):
    recipe = tiny_recipe("train.steps=2")
    train(recipe, tmp_path / "fp32", progress=False)
    train(tiny_recipe("train.steps=2", "train.autocast=bf16"), tmp_path / "bf16", progress=False)
    fp32, bf16 = train_lines(tmp_path / "fp32"), train_lines(tmp_path / "bf16")
    assert bf16[0]["loss"] != fp32[0]["loss"]
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())


# ---------------------------------------------------------------------------------------------------------
# two processes against one


def tiny_recipe(*overrides: str):
    return load_recipe({
        "model": {"name": "hybrid", "d_model": 32, "layers": ["attention", "gated_deltanet"],
                  "mixers": {"attention": {"num_heads": 2, "head_dim": 16},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 16, "expand_v": 1.0}}},
        "sleep": {"window": 8, "loops": 2},
        "task": {"name": "rule110", "steps": 1, "states": 2, "bits": 8},
        # AdamW: Muon orthogonalises in bfloat16, which turns float32 summation-order noise into ~1e-5
        # differences after a few steps; AdamW keeps the comparison at float32 precision.
        "train": {"steps": 4, "batch_size": 6, "optimizer": "adamw", "adamw_lr": 0.003, "warmup_steps": 1,
                  "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 0, "threads": 1},
        "eval": {"every": 0, "num_examples": 8, "batch_size": 8},
    }, overrides=list(overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(recipe_yaml: Path, out: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "sleepzoo", "train", str(recipe_yaml), "--out", str(out), "--no-progress", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_lines(run: Path) -> list[dict]:
    return [r for r in lines(run) if "split" not in r]


def assert_same_curve(a: Path, b: Path) -> float:
    """Same steps, tokens and rates; losses and grad norms to float tolerance. Returns the worst relative
    loss difference."""
    la, lb = train_lines(a), train_lines(b)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["tokens"] for r in la] == [r["tokens"] for r in lb]
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=LOSS_RTOL), ra["step"]
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]
    return max(abs(ra["loss"] - rb["loss"]) / abs(ra["loss"]) for ra, rb in zip(la, lb))


def assert_same_weights(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def drop_after_step_2(run: Path) -> None:
    """Make a finished run look like one killed right after its step-2 checkpoint."""
    for ckpt in list_checkpoints(run / "checkpoints"):
        if ckpt.name != "step_0000002":
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    (run / "eval.json").unlink()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process and two-process (DDP) runs of the same recipe, each trained once for the module."""
    root = tmp_path_factory.mktemp("ddp")
    recipe = tiny_recipe()
    yaml_path = root / "tiny.yaml"
    yaml_path.write_text(recipe.to_yaml())
    train(recipe, root / "one", progress=False)
    done = torchrun(yaml_path, root / "two")
    return {"root": root, "yaml": yaml_path, "recipe": recipe, "one": root / "one", "two": root / "two",
            "stdout": done.stdout}


def test_two_processes_match_one_process(runs):
    worst_loss = assert_same_curve(runs["one"], runs["two"])
    worst_weight = assert_same_weights(runs["one"] / "final" / "model.safetensors",
                                       runs["two"] / "final" / "model.safetensors")
    print(f"2 processes vs 1: max relative loss difference {worst_loss:.2e}, max weight difference "
          f"{worst_weight:.2e}")
    # Every step saw the whole global batch: 6 examples of 2 x 8 bits + 2 query tokens.
    assert [r["tokens"] for r in train_lines(runs["two"])] == [(i + 1) * 6 * 18 for i in range(4)]
    one, two = (json.loads((runs[k] / "eval.json").read_text()) for k in ("one", "two"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    # The checkpoint holds the plain names (no "module." prefix) and the full optimizer state.
    step2 = "checkpoints/step_0000002"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(str(runs["one"] / step2 / name)), load_file(str(runs["two"] / step2 / name))
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-6) for k in a)


def test_only_rank_0_writes(runs):
    two = runs["two"]
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "eval.json", "final", "metrics.jsonl",
                                                    "recipe.yaml"]  # no lock left behind either
    records = lines(two)
    assert [(r["step"], r.get("split")) for r in records] == [(1, None), (2, None), (3, None), (4, None),
                                                             (4, "test")]
    assert [p.name for p in list_checkpoints(two / "checkpoints")] == [
        "step_0000002", "step_0000004"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert runs["stdout"].count("step 1/4") == 1  # one rank reports
    assert runs["stdout"].count("final evaluation") == 1


def test_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs["two"], run)
    drop_after_step_2(run)
    train(runs["recipe"], run, resume=True, progress=False)
    assert_same_curve(runs["one"], run)
    assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")


def test_one_process_checkpoint_resumes_under_torchrun(runs, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(runs["one"], run)
    drop_after_step_2(run)
    torchrun(runs["yaml"], run, "--resume")
    assert_same_curve(runs["one"], run)
    assert [(r["step"], r.get("split")) for r in lines(run)] == [(1, None), (2, None), (3, None), (4, None),
                                                                (4, "test")]
    assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")


def test_fsdp_matches_one_process_and_resumes_on_one(runs, tmp_path):
    """FSDP2 (fully_shard) runs on gloo: sharded parameters, gathered full checkpoints."""
    recipe = tiny_recipe("train.parallel=fsdp")
    yaml_path = tmp_path / "fsdp.yaml"
    yaml_path.write_text(recipe.to_yaml())
    run = tmp_path / "fsdp"
    torchrun(yaml_path, run)
    assert_same_curve(runs["one"], run)
    assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")
    a = load_file(str(runs["one"] / "checkpoints/step_0000002/optimizer.safetensors"))
    b = load_file(str(run / "checkpoints/step_0000002/optimizer.safetensors"))
    assert a.keys() == b.keys()  # full optimizer state in the plain layout
    drop_after_step_2(run)
    train(recipe, run, resume=True, progress=False)  # one process ignores train.parallel
    assert_same_curve(runs["one"], run)
    assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")


# ---------------------------------------------------------------------------------------------------------
# micro-batches (gradient accumulation) and FSDP for every model (issue 11)


def test_micro_batches_match_one_batch(runs, tmp_path):
    """batch 6 as micro-batches of 4 + 2 (uneven) and of 1: the same loss curve and weights."""
    for micro in (4, 1):
        recipe = tiny_recipe(f"train.micro_batch_size={micro}")
        run = tmp_path / f"micro{micro}"
        train(recipe, run, progress=False)
        assert_same_curve(runs["one"], run)
        assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")
    drop_after_step_2(run)  # a micro-batched run resumes exactly
    train(tiny_recipe("train.micro_batch_size=1"), run, resume=True, progress=False)
    assert_same_curve(runs["one"], run)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_micro_batches_under_torchrun_match_one_process(runs, tmp_path, parallel):
    recipe = tiny_recipe(f"train.parallel={parallel}", "train.micro_batch_size=2")
    yaml_path = tmp_path / "micro.yaml"
    yaml_path.write_text(recipe.to_yaml())
    run = tmp_path / "micro"
    torchrun(yaml_path, run)  # 3 rows per rank, micro-batches of 2 + 1
    assert_same_curve(runs["one"], run)
    assert_same_weights(runs["one"] / "final" / "model.safetensors", run / "final" / "model.safetensors")


def test_fsdp_resumes_on_fsdp_with_muon_and_adamw(tmp_path):
    """Two optimizers (Muon; AdamW with its decayed and not-decayed groups): every optimizer's state goes
    back to its own parameters when a checkpoint is scattered into the sharded model (the indices of a
    state dict count one optimizer's parameters, not all of them)."""
    recipe = tiny_recipe("train.parallel=fsdp", "train.optimizer=muon", "train.muon_lr=0.01")
    yaml_path = tmp_path / "muon.yaml"
    yaml_path.write_text(recipe.to_yaml())
    torchrun(yaml_path, tmp_path / "straight")
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", run)
    drop_after_step_2(run)
    torchrun(yaml_path, run, "--resume")
    assert_same_curve(tmp_path / "straight", run)
    assert_same_weights(tmp_path / "straight" / "final" / "model.safetensors", run / "final" / "model.safetensors")


OURO_TINY = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 41, "hidden_size": 16,
    "intermediate_size": 24, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 4, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "total_ut_steps": 3, "early_exit_threshold": 1.0, "max_position_embeddings": 64, "torch_dtype": "float32",
}


@pytest.mark.parametrize("wake_passes,sleep_layers", [(1, None), (3, None), (1, [1, 3])],
                         ids=["wake1", "wake3", "wake1-jet-layers"])
def test_fsdp_trains_ouro_and_matches_one_process(tmp_path, wake_passes, sleep_layers):
    model = {"name": "ouro", "hf_config": OURO_TINY, "wake_passes": wake_passes,
             "mixers": {"jet": {"num_heads": 2, "head_dim": 4, "expand_v": 2.0, "dconv_generator_reduction": 2}}}
    if sleep_layers is not None:
        model["sleep_layers"] = sleep_layers
    recipe = load_recipe({
        "model": model, "sleep": {"window": 8, "loops": 2},
        "task": {"name": "rule110", "steps": 1, "states": 2, "bits": 8},
        "train": {"steps": 3, "batch_size": 4, "optimizer": "adamw", "adamw_lr": 0.003, "log_every": 1,
                  "checkpoint_every": 0, "keep_checkpoints": 0, "threads": 1, "parallel": "fsdp"},
        "eval": {"every": 0, "num_examples": 4, "batch_size": 4}})
    train(recipe, tmp_path / "one", progress=False)
    yaml_path = tmp_path / "ouro.yaml"
    yaml_path.write_text(recipe.to_yaml())
    torchrun(yaml_path, tmp_path / "two")
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one" / "final" / "model.safetensors",
                        tmp_path / "two" / "final" / "model.safetensors")


def test_micro_batches_with_stages_and_bf16_autocast(tmp_path):
    """Two stages (the second with its own micro-batch size) under bf16 autocast: micro-batched == one batch."""
    base = tiny_recipe("train.autocast=bf16").to_yaml()
    import yaml

    data = yaml.safe_load(base)
    data["stages"] = [{"name": "a", "steps": 2, "train": {"micro_batch_size": 4}},
                      {"name": "b", "steps": 2, "train": {"micro_batch_size": 2}}]
    micro = load_recipe(data)
    for stage in data["stages"]:
        stage["train"].pop("micro_batch_size")
    whole = load_recipe(data)
    train(whole, tmp_path / "whole", progress=False)
    train(micro, tmp_path / "micro", progress=False)
    la, lb = train_lines(tmp_path / "whole"), train_lines(tmp_path / "micro")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == [1, 2, 3, 4]
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-3)  # bf16 matmuls of other shapes round apart


def test_uneven_slices_in_micro_batches_under_fsdp(tmp_path):
    """Batch 5 over 2 ranks (3 + 2 rows) in micro-batches of 2: rank 0 needs 2, rank 1 one real and one
    zero-weight micro-batch, so the FSDP collectives pair up; the update is the one-process update."""
    recipe = tiny_recipe("train.batch_size=5", "train.micro_batch_size=2", "train.parallel=fsdp")
    train(tiny_recipe("train.batch_size=5"), tmp_path / "one", progress=False)
    yaml_path = tmp_path / "uneven.yaml"
    yaml_path.write_text(recipe.to_yaml())
    torchrun(yaml_path, tmp_path / "two")
    assert_same_curve(tmp_path / "one", tmp_path / "two")
    assert_same_weights(tmp_path / "one" / "final" / "model.safetensors", tmp_path / "two" / "final" / "model.safetensors")
