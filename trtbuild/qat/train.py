"""Recovery training by distillation: the fake-quantized (and/or 2:4-pruned) student follows the FP32
teacher on unlabeled data, with held-out fidelity measured by the same metrics as the quantize gate,
early stopping, checkpoints and exact resume.

Determinism: the seed fixes parameter init of the step sizes (from ranges), the batch order (one
torch.Generator whose state is checkpointed) and torch's own RNG; torch's deterministic algorithms are
requested, so one seed gives one result and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from calibrators import fidelity
from calibrators.fidelity import FidelityReport
from calibrators.output_kinds import OutputKind
from trtbuild.core import atomic
from trtbuild.core.errors import TrtbuildError
from trtbuild.qat import graph_score, selection

log = logging.getLogger(__name__)
Batch = Mapping[str, np.ndarray]
LossFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]
CHECKPOINT_SCHEMA = 2  # 2: checkpoints record the run they belong to (``run``, checked on resume)
SCHEDULES = ("constant", "cosine")  # cosine: lr x (1 + cos(pi step / steps)) / 2, from the set lr to 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-6  # weights (Adam); small: AdaRound already left them near an optimum
    step_lr: float = 2e-6  # LSQ step sizes (Adam moves each by ~lr per step: 1e-3 is ~2 % of a typical one)
    eval_every: int = 25
    patience: int = 3  # evaluations without improvement before stopping
    checkpoint_every: int = 50
    seed: int = 0
    schedule: str = "constant"
    select: str = selection.DEFAULT_SELECTION  # how the best held-out step is ranked (selection.py)
    select_on: str = graph_score.DEFAULT_SELECT_ON  # where it is scored: torch student or shipped graph

    def __post_init__(self) -> None:
        selection.scorer(self.select)
        graph_score.check(self.select_on)
        if self.schedule not in SCHEDULES:
            raise TrtbuildError(f"unknown --schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "patience"):
            if getattr(self, name) < 1:
                raise TrtbuildError(
                    f"--{name.replace('_', '-')} must be at least 1", "pass a positive number"
                )
        if not (self.lr > 0 and self.step_lr > 0):
            raise TrtbuildError("learning rates must be positive", "pass --lr > 0")


@dataclass
class Evaluation:
    step: int
    loss: float
    score: float  # fidelity error (KL for classifiers, 1 - cosine otherwise): lower is better
    summary: str


@dataclass
class TrainResult:
    steps_run: int
    stopped_early: bool
    best_step: int
    history: list[Evaluation] = field(default_factory=list)
    resumed_from: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "steps_run": self.steps_run,
            "stopped_early": self.stopped_early,
            "best_step": self.best_step,
            "resumed_from": self.resumed_from,
            "history": [asdict(e) for e in self.history],
        }


def distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over outputs of the MSE normalised by the teacher's mean square (scale-free across outputs)."""
    total = torch.zeros(())
    for s, t in zip(student, teacher, strict=True):
        total = total + ((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp_min(1e-12)
    return total


def _tensors(value: Any) -> Any:
    """A loader's batch item with its numpy arrays as tensors (tensors, lists, tuples, dicts kept)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return type(value)(_tensors(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def as_outputs(value: Any) -> list[torch.Tensor]:
    """A module's return value (tensor, tuple/list, dict, HF ModelOutput) as a flat list of tensors."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [v for v in value.values() if isinstance(v, torch.Tensor)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in as_outputs(v)]
    raise TrtbuildError(f"the model returned a {type(value).__name__}", "return tensors from forward()")


class Trainer:
    """One training stage over in-memory samples (each a dict of batch-1 arrays)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        extra_params: Sequence[nn.Parameter],
        train: Sequence[Batch],
        held: Sequence[Batch],
        input_names: Sequence[str],
        output_names: Sequence[str],
        kinds: Mapping[str, OutputKind],
        config: TrainConfig,
        device: torch.device,
        loss_fn: LossFn | None = None,
        labeled: Iterable[tuple[Any, Any]] | None = None,
        on_step: Callable[[int, int, float, Evaluation | None], None] | None = None,
        graph_scorer: Callable[[], FidelityReport] | None = None,
        run: Mapping[str, Any] | None = None,
    ) -> None:
        self.student, self.teacher, self.config, self.device = student, teacher, config, device
        self.extra = list(extra_params)
        # What the checkpoint belongs to, beyond the training config: the caller's options that shape the
        # student (2:4, start, placement, ...) and the trained tensors' layout. Resuming a checkpoint of
        # another run either crashed (another number of step sizes) or silently mixed two runs.
        self.run = {
            **dict(run or {}),
            "layout": [(k, list(v.shape)) for k, v in student.state_dict().items()],
            "extra": [list(p.shape) for p in self.extra],
        }
        self.train_stack = {n: np.concatenate([s[n] for s in train]) for n in input_names} if train else {}
        self.train_count = len(train)
        self.held = list(held)
        self.input_names, self.output_names, self.kinds = list(input_names), list(output_names), kinds
        self.loss_fn = loss_fn or distillation_loss
        self.labeled = labeled
        self.on_step = on_step
        # --select-on graph: held-out evaluations score the shipped Q/DQ graph (graph_score.py)
        self.graph_scorer = graph_scorer if config.select_on == "graph" else None
        if config.select_on == "graph" and graph_scorer is None:
            raise TrtbuildError("--select-on graph needs the Q/DQ graph's scorer", "use --select-on student")
        self.score = selection.scorer(config.select)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = torch.optim.Adam(
            [
                {"params": [p for p in student.parameters() if p.requires_grad], "lr": config.lr},
                {"params": self.extra, "lr": config.step_lr},
            ]
        )
        self.reference = self._run(teacher, self.held)
        # Unlabeled data has no augmentation: the teacher's outputs are computed once, not every step.
        self.targets = (
            self._run(
                teacher,
                [{n: v[i : i + 8] for n, v in self.train_stack.items()} for i in range(0, len(train), 8)],
            )
            if train and labeled is None
            else {}
        )

    # ------------------------------------------------------------------------------------------ running

    def _feeds(self, batch: Batch) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(batch[n])).to(self.device) for n in self.input_names]

    def _run(self, model: nn.Module, batches: Sequence[Batch]) -> dict[str, np.ndarray]:
        outs: list[list[np.ndarray]] = [[] for _ in self.output_names]
        with torch.no_grad():
            for batch in batches:
                for i, t in enumerate(as_outputs(model(*self._feeds(batch)))):
                    outs[i].append(t.float().cpu().numpy())
        return {n: np.concatenate(v) for n, v in zip(self.output_names, outs, strict=True)}

    def evaluate(self, step: int, loss: float) -> Evaluation:
        if self.graph_scorer is not None:
            report = self.graph_scorer()
        else:
            report = fidelity.compare(self.reference, self._run(self.student, self.held), kinds=self.kinds)
        return Evaluation(step, loss, self.score(report), report.summary())

    def _next_batch(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if self.labeled is not None:
            inputs, labels = map(_tensors, next(self._labeled_iter))  # numpy batches taken too
            feeds = [t.to(self.device) for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
            return feeds, [t.to(self.device) for t in as_outputs(labels)]
        size = min(self.config.batch_size, self.train_count)
        index = torch.randperm(self.train_count, generator=self.generator)[:size].numpy()
        targets = [torch.from_numpy(self.targets[n][index]).to(self.device) for n in self.output_names]
        return self._feeds({n: v[index] for n, v in self.train_stack.items()}), targets

    def _labeled_cycle(self) -> Any:
        assert self.labeled is not None
        while True:
            empty = True
            for item in self.labeled:
                empty = False
                yield item
            if empty:
                raise TrtbuildError("the labeled loader yielded nothing", "pass a loader with batches")

    # ------------------------------------------------------------------------------------------ checkpoints

    def _state(self, step: int, best: dict[str, Any], history: list[Evaluation], bad: int) -> dict:
        loader_rng = self._loader_rng()
        return {
            "schema": CHECKPOINT_SCHEMA,
            "config": asdict(self.config),
            "run": self.run,
            "step": step,
            "student": self.student.state_dict(),
            "extra": [p.detach().clone() for p in self.extra],
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "loader_rng": None if loader_rng is None else loader_rng.get_state(),
            "best": best,
            "history": [asdict(e) for e in history],
            "bad_evals": bad,
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic.write_bytes(path, buffer.getvalue())

    def load(self, path: Path) -> dict[str, Any]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise TrtbuildError(f"cannot read checkpoint {path} ({exc})", "delete it to start over") from exc
        if state.get("schema") != CHECKPOINT_SCHEMA or state.get("config") != asdict(self.config):
            raise TrtbuildError(
                f"checkpoint {path} was written with other training settings ({state.get('config')})",
                "resume with the same options, or delete the checkpoint to start over",
            )
        if state.get("run") != self.run:
            changed = sorted(k for k in {*self.run, *state["run"]} if self.run.get(k) != state["run"].get(k))
            raise TrtbuildError(
                f"checkpoint {path} belongs to another run (differs in: {', '.join(changed)})",
                "resume with the same options, or delete the checkpoint to start over",
            )
        self.student.load_state_dict(state["student"])
        with torch.no_grad():
            for p, v in zip(self.extra, state["extra"], strict=True):
                p.copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        loader_rng = self._loader_rng()
        if loader_rng is not None and state.get("loader_rng") is not None:
            loader_rng.set_state(state["loader_rng"])
        return state

    def _loader_rng(self) -> torch.Generator | None:
        """A labeled loader's own generator (qat_views.AugmentedViews): checkpointed for exact resume."""
        rng = getattr(self.labeled, "generator", None)
        return rng if isinstance(rng, torch.Generator) else None

    def _set_lr(self, step: int) -> None:
        """The learning rates for ``step`` (0-based) under the schedule: stateless, so resume is exact."""
        factor = 1.0
        if self.config.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * step / self.config.steps))
        bases = (self.config.lr, self.config.step_lr)
        for group, base in zip(self.optimizer.param_groups, bases, strict=True):
            group["lr"] = base * factor

    # ------------------------------------------------------------------------------------------ training

    def fit(self, checkpoint: Path | None = None, resume: bool = False) -> TrainResult:
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return self._fit(checkpoint, resume)
        finally:
            torch.use_deterministic_algorithms(previous)

    def _fit(self, checkpoint: Path | None, resume: bool) -> TrainResult:
        cfg = self.config
        step, bad, history = 0, 0, []
        best: dict[str, Any] = {"score": math.inf, "step": 0, "student": None, "extra": None}
        resumed = None
        if resume and checkpoint is not None and checkpoint.is_file():
            state = self.load(checkpoint)
            step, bad, best = state["step"], state["bad_evals"], state["best"]
            history = [Evaluation(**e) for e in state["history"]]
            resumed = step
            log.info("resumed from %s at step %d", checkpoint, step)
        if self.labeled is not None:
            self._labeled_iter = self._labeled_cycle()
        stopped = bool(history) and bad >= cfg.patience
        if not history:
            first = self.evaluate(0, math.nan)
            history.append(first)
            best = self._snapshot(first)
        self.student.eval()  # BatchNorm statistics and dropout stay as trained: only weights and steps move
        loss_value = math.nan
        while step < cfg.steps and not stopped:
            feeds, labels = self._next_batch()
            outputs = as_outputs(self.student(*feeds))
            if labels is None:
                with torch.no_grad():
                    labels = as_outputs(self.teacher(*feeds))
            loss = self._loss(outputs, labels)
            if not torch.isfinite(loss):
                raise TrtbuildError(
                    f"the training loss became {float(loss)} at step {step + 1}", "lower --lr"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._set_lr(step)
            self.optimizer.step()
            step += 1
            loss_value = float(loss.detach())
            evaluation = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                evaluation = self.evaluate(step, loss_value)
                history.append(evaluation)
                if evaluation.score < best["score"] - 1e-9:
                    best, bad = self._snapshot(evaluation), 0
                else:
                    bad += 1
                    stopped = bad >= cfg.patience
            if self.on_step is not None:
                self.on_step(step, cfg.steps, loss_value, evaluation)
            if checkpoint is not None and (step % cfg.checkpoint_every == 0 or stopped or step == cfg.steps):
                self.save(checkpoint, self._state(step, best, history, bad))
        self._restore(best)
        return TrainResult(step, stopped, int(best["step"]), history, resumed)

    def _loss(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """The loss as one scalar tensor; a loss that fails on the outputs and targets, or returns anything
        else, is one TrtbuildError (a user's loss_fn / labels: a traceback from inside training before)."""
        try:
            loss = self.loss_fn(outputs, targets)
        except TrtbuildError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            shapes = f"outputs {[list(t.shape) for t in outputs]}, targets {[list(t.shape) for t in targets]}"
            raise TrtbuildError(
                f"the training loss fails on the model's {shapes} ({type(exc).__name__}: {first})",
                "with labels (train_loader) pass loss_fn(student_outputs, labels); the default distillation "
                "loss compares outputs with targets of the same shape",
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            got = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TrtbuildError(
                f"the training loss must be one scalar tensor, got {got}", "reduce it, e.g. .mean()"
            )
        return loss.reshape(())

    def _snapshot(self, evaluation: Evaluation) -> dict[str, Any]:
        return {
            "score": evaluation.score,
            "step": evaluation.step,
            "student": copy.deepcopy(self.student.state_dict()),
            "extra": [p.detach().clone() for p in self.extra],
        }

    def _restore(self, best: dict[str, Any]) -> None:
        if best.get("student") is None:
            return
        self.student.load_state_dict(best["student"])
        with torch.no_grad():
            for p, v in zip(self.extra, best["extra"], strict=True):
                p.copy_(v)
