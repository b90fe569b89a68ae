"""More than one process: 2 CPU processes under torchrun (gloo, DDP) reach the same weights and
metrics as 1 process with the same global batch; files are written once; the sharded sampler
splits every global batch; FSDP is refused on CPU with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from deltatune.errors import ConfigError
from deltatune.train import TrainerConfig
from deltatune.train.distributed import ShardedSampler, resolve_mode

#: Weights and metrics of 2 processes vs 1 may differ only by float summation order: DDP sums
#: two half-batch mean gradients where one process sums one mean over the whole batch.
TOLERANCE = 1e-5

# The model, the data and the run live in one script that both the torchrun workers and the
# one-process reference execute, so the two sides cannot drift apart.
WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from torch import nn
    from torch.utils.data import Dataset
    from deltatune.errors import ConfigError
    from deltatune.train import ClassificationTask, TrainerConfig, fit
    from deltatune.train import distributed

    torch.set_num_threads(1)

    class Blobs(Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.y = torch.arange(n) % 3
            self.x = torch.randn(n, 8, generator=g) * 0.7
            self.x[torch.arange(n), self.y] += 2.0
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.frozen = nn.Linear(8, 16)
            self.frozen.requires_grad_(False)
            self.head = nn.Linear(16, 3)
            self.drop = nn.Dropout(0.0)
        def forward(self, x):
            return self.head(self.drop(torch.relu(self.frozen(x))))

    def run(out, batch_size, mode, checkpoint=3):
        model = MLP()
        cfg = TrainerConfig(epochs=2, batch_size=batch_size, learning_rate=0.05,
                            warmup_ratio=0.0, progress=False, device="cpu",
                            checkpoint_every_steps=checkpoint, distributed=mode, seed=3)
        result = fit(model, ClassificationTask(3), Blobs(48, 1), Blobs(24, 2), cfg, Path(out))
        return model, result

    if __name__ == "__main__":
        out, batch_size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        model, result = run(out, batch_size, mode)
        rank = distributed.rank()
        fsdp_error = None
        if distributed.is_distributed():
            try:
                run(out + "-fsdp", batch_size, "fsdp")
            except ConfigError as exc:
                fsdp_error = str(exc)
            # The FSDP code path itself (sharding, sharded clipping, gathering the weights back)
            # runs on CPU under gloo too; only the CUDA-only guard is bypassed here.
            distributed.resolve_mode = lambda mode, device: "fsdp"
            fsdp_model, _ = run(out + "-fsdp", batch_size, "fsdp", checkpoint=None)
            fsdp_weights = {n: p.tolist() for n, p in fsdp_model.state_dict().items()}
            fsdp_params = [n for n, p in fsdp_model.named_parameters()]
        else:
            fsdp_weights, fsdp_params = None, None
        record = {
            "rank": rank,
            "world_size": distributed.world_size(),
            "weights": {n: p.tolist() for n, p in model.state_dict().items()},
            "val": result.last_metrics,
            "losses": [row["loss"] for row in result.history],
            "steps": result.steps,
            "fsdp_error": fsdp_error,
            "fsdp_weights": fsdp_weights,
            "fsdp_params": fsdp_params,
        }
        with open(os.path.join(out, f"result-rank{rank}.json"), "w") as fh:
            json.dump(record, fh)
    """
)


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd() / "src")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # One process, global batch 8 (in this process: the same code, without a second start-up).
    namespace: dict[str, object] = {"__name__": "worker"}
    exec(compile(WORKER, str(script), "exec"), namespace)
    model, result = namespace["run"](str(one), 8, "none")  # type: ignore[operator]
    ref = {
        "world_size": 1,
        "weights": {n: p.tolist() for n, p in model.state_dict().items()},
        "val": result.last_metrics,
        "losses": [row["loss"] for row in result.history],
        "steps": result.steps,
    }
    # Two processes under torchrun (gloo), 4 per process: the same global batch of 8.
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(two),
            "4",
            "auto",
        ],
        tmp_path,
    )
    ranks = [json.loads((two / f"result-rank{r}.json").read_text()) for r in (0, 1)]
    assert ref["world_size"] == 1 and [r["world_size"] for r in ranks] == [2, 2]
    assert ref["steps"] == ranks[0]["steps"] == 12  # 48 examples / 8 per step * 2 epochs
    for r in ranks:
        for name, values in ref["weights"].items():
            diff = (torch.tensor(values) - torch.tensor(r["weights"][name])).abs().max()
            assert diff <= TOLERANCE, (name, float(diff))
        for key, value in ref["val"].items():
            assert abs(value - r["val"][key]) <= TOLERANCE, key
        # The logged loss is the mean over the processes = the one-process batch mean.
        assert r["losses"] == pytest.approx(ref["losses"], abs=TOLERANCE)
    # Training changed the head (the comparison is not between two untouched models).
    assert ref["val"]["accuracy"] > 0.7  # chance: 1/3
    # Files are written once, by rank 0: one log row per step, one checkpoint.
    rows = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines() if x.strip()]
    assert [row["step"] for row in rows] == list(range(1, 13))
    assert (two / "checkpoint" / "trainer_state.json").is_file()
    # FSDP on CPU is refused with a message naming the field and the fix...
    assert "fsdp" in ranks[0]["fsdp_error"] and "ddp" in ranks[0]["fsdp_error"]
    # ...but its code path, forced on CPU, trains to the same weights and hands back a plain
    # model (the parameter names of the unwrapped module, full shapes).
    for r in ranks:
        assert r["fsdp_params"] == ["frozen.weight", "frozen.bias", "head.weight", "head.bias"]
        for name, values in ref["weights"].items():
            diff = (torch.tensor(values) - torch.tensor(r["fsdp_weights"][name])).abs().max()
            assert diff <= TOLERANCE, ("fsdp", name, float(diff))


def test_sharded_sampler_splits_each_global_batch() -> None:
    shards = []
    for r in range(2):
        sampler = ShardedSampler(10, seed=5, batch_size=2, rank=r, world_size=2)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    order = ShardedSampler(10, seed=5, batch_size=2, rank=0, world_size=2).order(1)
    # Global batches of 4: rank 0 takes the first 2 of each, rank 1 the next 2.
    assert shards[0][:4] == order[0:2] + order[4:6]
    assert shards[1][:4] == order[2:4] + order[6:8]
    # The last short global batch (2 examples) is split one each.
    assert shards[0][4:] == [order[8]] and shards[1][4:] == [order[9]]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    # Resuming mid-epoch: start counts this process's examples.
    sampler = ShardedSampler(10, seed=5, batch_size=2, rank=1, world_size=2)
    sampler.set_epoch(1, start=2)
    assert list(sampler) == shards[1][2:]


def test_distributed_modes_need_a_process_group() -> None:
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "none"
    assert resolve_mode("none", cpu) == "none"
    for mode in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match="torchrun"):
            resolve_mode(mode, cpu)
    with pytest.raises(ConfigError, match=r"train\.distributed"):
        TrainerConfig(distributed="zero")  # type: ignore[arg-type]
