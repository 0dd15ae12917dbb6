"""Logits only where needed (issue 11): the loss and evaluation take the head at target positions only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sleepzoo
from sleepzoo import engine
from sleepzoo.benchmarks.core import peak_bytes


def model_with(vocab=13, seed=0, **sleep):
    torch.manual_seed(seed)
    r = sleepzoo.load_recipe({
        "model": {"d_model": 16, "layers": ["attention", "gated_deltanet"], "vocab_size": vocab,
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8, "chunk_size": 4}}},
        "sleep": {"window": 5, "loops": 2, **sleep}})
    return sleepzoo.build_model(r).double()


def batch(vocab=13, B=3, T=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    tg = torch.randint(0, vocab, (B, T), generator=g)
    tg[torch.rand(B, T, generator=g) < 0.6] = -100
    return ids, tg


def reference_loss(model, ids, tg):
    """Every position's logits, then the mean CE over targets: what the trainer computed before."""
    logits = model(ids, return_logits=True).logits
    return F.cross_entropy(logits.flatten(0, 1), tg.flatten(), ignore_index=-100)


@pytest.mark.parametrize("piece_elements", [None, 13, 40])  # one piece; one row a piece; 3 rows a piece
@pytest.mark.parametrize("checkpoint", [False, True])
def test_loss_and_gradients_equal_the_full_logits_path(monkeypatch, piece_elements, checkpoint):
    if piece_elements is not None:
        monkeypatch.setattr(engine, "LOSS_PIECE_ELEMENTS", piece_elements)
    model = model_with(checkpoint=checkpoint)
    ids, tg = batch()
    out = model(ids, tg, return_logits=False)
    assert out.logits is None
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model, ids, tg)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=0, atol=1e-12, msg=n)


def test_target_logits_are_the_full_logits_at_the_targets():
    model = model_with()
    ids, tg = batch()
    full = model(ids, tg).logits
    out = model(ids, tg, return_logits="targets")
    mask = tg != -100
    assert out.logits.shape == (int(mask.sum()), 13)
    assert torch.equal(out.target_positions, mask.nonzero())  # row-major over (B, T)
    torch.testing.assert_close(out.logits, full[mask], rtol=0, atol=1e-12)
    with pytest.raises(sleepzoo.SleepzooError, match="needs targets"):
        model(ids, return_logits="targets")
    with pytest.raises(sleepzoo.SleepzooError, match="return_logits"):
        model(ids, tg, return_logits="all")


def test_evaluation_from_target_logits_equals_evaluation_from_full_logits():
    r = sleepzoo.load_recipe("recipes/rule110-tiny.yaml", overrides=["sleep.loops=2", "task.states=2"])
    torch.manual_seed(0)
    model, task = sleepzoo.build_model(r), sleepzoo.build_task(r)

    class Full(torch.nn.Module):  # the same model seen as a foreign one: logits for every position
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids, tg, **kw):
            return self.m(ids, tg, **kw)

    a = task.evaluate(model, num_examples=40, batch_size=16)
    b = task.evaluate(Full(model), num_examples=40, batch_size=16)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for key in ("token_accuracy", "exact_accuracy", "label_accuracy"):
        assert a[key] == b[key]


def test_a_paper_scale_step_needs_far_less_than_one_btv_tensor():
    """V = 151,936, T = 2,048, 4 targets per example: far below one (B, T, V) float32 tensor (1.16 GiB)."""
    V, T, B = 151_936, 2048, 1
    torch.manual_seed(0)
    r = sleepzoo.load_recipe({
        "model": {"d_model": 16, "layers": ["attention", "gated_deltanet"], "vocab_size": V,
                  "mixers": {"attention": {"num_heads": 2, "num_kv_heads": 1},
                             "gated_deltanet": {"num_heads": 2, "head_dim": 8}}},
        "sleep": {"window": 1024, "loops": 2}})
    model = sleepzoo.build_model(r)
    ids = torch.randint(0, V, (B, T))
    tg = torch.full_like(ids, -100)
    tg[:, -4:] = ids[:, -4:]

    def step():
        model(ids, tg, return_logits=False).loss.backward()

    peak = peak_bytes(step)
    assert peak < 0.05 * B * T * V * 4, peak
