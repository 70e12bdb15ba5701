"""Evaluating during training (``eval_every``) leaves the run as it is: the study adds convergence points to runs
that pair by seed with runs made without them."""

from __future__ import annotations

import json

import torch

from pkd_offline.checkpoint import load_checkpoint
from stages.train import TrainConfig, train

SMALL = dict(student="retinanet", backbone="resnet18", variant="tiny", short_side=128, max_size=128, batch_size=4,
             workers=0, progress=False, optimizer="adamw", lr=1e-3, warmup_iters=1, iters=4, seed=5)


def test_a_run_that_evaluates_every_two_steps_ends_with_the_same_weights_and_losses(synth_data, tmp_path):
    plain = train(TrainConfig(data=synth_data, out=tmp_path / "plain", eval_every=0, **SMALL))
    evaluated = train(TrainConfig(data=synth_data, out=tmp_path / "evaluated", eval_every=2, val_split="val",
                                  **SMALL))
    evals = [json.loads(line) for line in (tmp_path / "evaluated" / "eval.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in evals] == [2, 4] and not (tmp_path / "plain" / "eval.jsonl").exists()
    losses = [[json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
              for run in (tmp_path / "plain", tmp_path / "evaluated")]
    assert losses[0] == losses[1]
    weights = [load_checkpoint(run / "model.pt")["model"] for run in (tmp_path / "plain", tmp_path / "evaluated")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
