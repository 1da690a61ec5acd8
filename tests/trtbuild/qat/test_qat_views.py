"""QAT on fresh augmented views (trtbuild/qat/qat_views.py) and the cosine lr schedule (train.py), on the
tiny real conv net: views are new every step and labeled by the teacher, the seed fixes them, a resumed
run equals an uninterrupted one, the schedule decays to zero, and bad options are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from qat_models import Interrupt, checkpoint_state, stop_at, tiny_data, tiny_net

from trtbuild.core.errors import TrtbuildError
from trtbuild.qat.fake_quant import ActivationQuantizer, QuantHooks
from trtbuild.qat.losses import kind_loss
from trtbuild.qat.qat_views import AugmentedViews, augmented_views
from trtbuild.qat.train import TrainConfig, Trainer, distillation_loss


def _samples(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    x = tiny_data(count, seed=seed)
    return [{"x": x[i : i + 1]} for i in range(count)]


def test_views_are_fresh_teacher_labeled_and_seeded(one_thread: None) -> None:
    teacher = tiny_net()
    train = _samples(16, seed=2)
    views = augmented_views("auto", teacher, train, ["x"], distillation_loss, 4, seed=5)
    assert isinstance(views, AugmentedViews)
    stream = iter(views)
    (x1, t1), (x2, _) = next(stream), next(stream)
    assert x1.shape == (4, 3, 16, 16) and not torch.equal(x1, x2)  # new views every step
    pool = torch.from_numpy(np.concatenate([s["x"] for s in train]))
    assert not any(torch.equal(v, p) for v in x1 for p in pool)  # augmented, not the samples themselves
    with torch.no_grad():
        torch.testing.assert_close(t1[0], teacher(x1))  # the teacher labels the same views
    again = next(iter(augmented_views("auto", teacher, train, ["x"], distillation_loss, 4, seed=5)))  # type: ignore[arg-type]
    assert torch.equal(again[0], x1)  # same seed, same views
    # Not images, or asked off: the fixed samples (None), and a bad mode is a one-line error.
    ids = [{"ids": np.zeros((1, 8), np.int64)}]
    assert augmented_views("auto", teacher, ids, ["ids"], distillation_loss, 4, 0) is None
    assert augmented_views("off", teacher, train, ["x"], distillation_loss, 4, 0) is None
    with pytest.raises(TrtbuildError, match="--augment"):
        augmented_views("always", teacher, train, ["x"], distillation_loss, 4, 0)
    with pytest.raises(TrtbuildError, match="--schedule"):
        TrainConfig(schedule="linear")


def _trainer(model: torch.nn.Module, config: TrainConfig, on_step=None) -> Trainer:  # type: ignore[no-untyped-def]
    student, teacher = copy.deepcopy(model), copy.deepcopy(model)
    quantizers = [ActivationQuantizer("a", 3.0), ActivationQuantizer("b", 3.0)]
    hooks = QuantHooks()
    hooks.quantize_input(student.pw[0], quantizers[0])
    hooks.quantize_input(student.expand, quantizers[1])
    hooks.quantize_weight(student.pw[0])
    hooks.quantize_weight(student.expand)
    train, held = _samples(16, seed=2), tiny_data(8, seed=3)
    loss = kind_loss({}, ["y"])
    views = augmented_views("auto", teacher, train, ["x"], loss, config.batch_size, config.seed)
    return Trainer(
        student,
        teacher,
        [q.step for q in quantizers],
        train,
        [{"x": held}],
        ["x"],
        ["y"],
        {},
        config,
        torch.device("cpu"),
        loss,
        views,
        on_step,
    )


def test_augmented_cosine_resume_equals_uninterrupted(tmp_path: Path, one_thread: None) -> None:
    model = tiny_net()
    config = TrainConfig(
        steps=4,
        batch_size=4,
        lr=1e-3,
        eval_every=2,
        checkpoint_every=2,
        patience=10,
        seed=3,
        schedule="cosine",
    )

    lrs: list[float] = []
    full = _trainer(model, config, on_step=lambda *_: lrs.append(full.optimizer.param_groups[0]["lr"]))
    full.fit(tmp_path / "a.ckpt")
    # cosine from the set lr toward 0: lr x (1 + cos(pi step / steps)) / 2 at steps 0..3
    assert lrs == pytest.approx([1e-3 * (1 + np.cos(np.pi * s / 4)) / 2 for s in range(4)])
    a = checkpoint_state(tmp_path / "a.ckpt")
    assert not torch.equal(a["student.pw.0.weight"], model.state_dict()["pw.0.weight"])  # it trained

    with pytest.raises(Interrupt):
        _trainer(model, config, on_step=stop_at(3)).fit(tmp_path / "c.ckpt")
    result = _trainer(model, config).fit(tmp_path / "c.ckpt", resume=True)
    assert result.resumed_from == 2 and result.steps_run == 4
    c = checkpoint_state(tmp_path / "c.ckpt")
    assert all(torch.equal(a[k], c[k]) for k in a)  # the views after resume are the uninterrupted ones
    # Without the views' generator in the checkpoint, steps 3-4 draw other views and the weights differ.
    other = _trainer(model, config)
    assert other.labeled is not None
    with pytest.raises(Interrupt):
        _trainer(model, config, on_step=stop_at(3)).fit(tmp_path / "d.ckpt")
    state = torch.load(tmp_path / "d.ckpt", weights_only=False)
    state["loader_rng"] = None
    torch.save(state, tmp_path / "d.ckpt")
    _trainer(model, config).fit(tmp_path / "d.ckpt", resume=True)
    d = checkpoint_state(tmp_path / "d.ckpt")
    assert not torch.equal(a["student.pw.0.weight"], d["student.pw.0.weight"])
