"""DDP on 2 CPU processes (gloo): ZCA statistics and training loss equal those of one process.

The test runs this file as a script, ``python test_lightning_ddp.py OUT_DIR``; Lightning's ``ddp`` strategy
starts the second rank by running the same command again. Each rank trains a small network with a
:class:`covpool.ZCABatchNorm2d` and a :class:`covpool.CovPoolHead` for a few steps on its half of every
batch (a DistributedSampler without shuffling gives rank ``r`` the samples ``r, r + 2, ...``, so the two
halves of step ``k`` are exactly the block of the single process's step ``k`` at twice the batch size) and
saves its state and losses. Lightning's own sampler would shuffle the training set under DDP, hence the
explicit one. The run must not warn that gradient strides do not match DDP's bucket views.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from covpool import CovPoolHead, ZCABatchNorm2d
from lightning_modules import CovPoolClassifier, TrainingHistory

STEPS = 3
BATCH_PER_RANK = 8
WORLD_SIZE = 2
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_network() -> nn.Module:
    """ZCA batch norm, then an iSQRT-COV head on tokens, as after a ViT (``attach_head(head="isqrtcov")``).

    The head's 1x1 convolution then sees a channels-last view, whose weight gradient used to come out with
    channels-last strides and make DDP warn ``Grad strides do not match bucket view strides``. The head's
    BatchNorm, whose statistics are per process, is removed so that DDP equals one process.
    """
    head = CovPoolHead(8, 4, reduction_dim=4, input_format="NLC")
    head.reduce[1] = nn.Identity()
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False),
        ZCABatchNorm2d(8, group_size=4),
        nn.ReLU(),
        Rearrange("n c h w -> n (h w) c"),
        head,
    )


class SequentialShards(L.LightningDataModule):
    """Rank ``r`` of ``world_size`` gets samples ``r, r + world_size, ...`` in order, no shuffling."""

    def __init__(self, dataset: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


def train(
    out_dir: Path, *, devices: int, batch_size: int
) -> tuple[CovPoolClassifier, L.Trainer, TrainingHistory]:
    """Train from the saved initial weights on the saved data, without shuffling."""
    network = make_network()
    network.load_state_dict(torch.load(out_dir / "init.pt"))
    images, labels = torch.load(out_dir / "data.pt")
    model = CovPoolClassifier(network, num_classes=4, lr=0.1, weight_decay=0.0)
    history = TrainingHistory()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[history],
        use_distributed_sampler=False,
    )
    trainer.fit(model, datamodule=SequentialShards(TensorDataset(images, labels), batch_size))
    return model, trainer, history


def zca_layer(model: CovPoolClassifier) -> ZCABatchNorm2d:
    return next(m for m in model.modules() if isinstance(m, ZCABatchNorm2d))


@pytest.mark.ddp
def test_ddp_matches_single_process(tmp_path):
    torch.manual_seed(0)
    torch.save(make_network().state_dict(), tmp_path / "init.pt")
    samples = STEPS * BATCH_PER_RANK * WORLD_SIZE
    torch.save((torch.randn(samples, 3, 6, 6) * 2 + 1, torch.arange(samples) % 4), tmp_path / "data.pt")

    # 2 threads: with 1, the CPU convolution never returns the channels-last gradients DDP warns about.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "2"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in result.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    single, _, history = train(tmp_path, devices=1, batch_size=WORLD_SIZE * BATCH_PER_RANK)
    zca = zca_layer(single)
    for key in ("running_mean", "running_cov", "num_batches_tracked"):
        name = next(n for n in ranks[0]["state"] if n.endswith(f"1.{key}"))
        # identical on both ranks, and equal to one process that saw the union of their batches
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), key
        torch.testing.assert_close(ranks[0]["state"][name], getattr(zca, key), rtol=1e-5, atol=1e-6)
    # the training loss of the union batch is the mean of the ranks' losses, step by step
    ddp_losses = torch.tensor([[loss for _, loss in rank["losses"]] for rank in ranks]).mean(dim=0)
    single_losses = torch.tensor([loss for _, loss in history.steps])
    assert len(single_losses) == STEPS
    torch.testing.assert_close(ddp_losses, single_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["synced_loss"], single_losses[-1].item(), rtol=1e-5, atol=1e-6)
    # and the weights after the last step agree
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    model, trainer, history = train(out, devices=WORLD_SIZE, batch_size=BATCH_PER_RANK)
    torch.save(
        {
            "state": model.state_dict(),
            "losses": history.steps,
            "synced_loss": float(trainer.callback_metrics["train/loss_step"]),
        },
        out / f"rank{trainer.global_rank}.pt",
    )
