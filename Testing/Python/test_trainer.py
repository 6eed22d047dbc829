"""Trainer: determinism, checkpoint/resume, EMA, and two-process DDP on the CPU (gloo)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.engine.schedule import NoiseSchedule
from DiffusionMICLib.engine.trainer import Batch, TrainConfig, Trainer
from DiffusionMICLib.errors import DiffusionMICError

from conftest import TINY_NETWORK


def batches(seed=0, n=4, size=16):
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.rand((n, 1, size, size), generator=g) * 2 - 1
        yield Batch(target=x, cond=-x)


def make(tmp=None, steps=6, seed=0):
    torch.manual_seed(seed)
    net = build_network(network_config(2, 1, **TINY_NETWORK))
    cfg = TrainConfig(max_steps=steps, batch_size=4, seed=seed, checkpoint_every=3, ema_start=2)
    return Trainer(net, NoiseSchedule(prediction_type="v_prediction"), cfg, torch.device("cpu"), checkpoint_dir=tmp)


def test_same_seed_same_weights():
    a, b = make(), make()
    a.fit(batches())
    b.fit(batches())
    for p, q in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        assert torch.equal(p, q)


def test_resume_continues_where_it_stopped(tmp_path):
    full = make(tmp_path / "full", steps=6)
    full.fit(batches())
    part = make(tmp_path / "part", steps=3)
    part.fit(batches())
    part.save_checkpoint()
    resumed = make(tmp_path / "part", steps=6)
    assert resumed.resume() and resumed.step == 3
    assert resumed.seconds == pytest.approx(part.seconds) and part.seconds > 0   # the first run's time is kept
    data = batches()
    for _ in range(3):       # the batch stream is the caller's: skip what was consumed
        next(data)
    resumed.fit(data)
    assert resumed.step == 6 and resumed.seconds > part.seconds
    for p, q in zip(full.network.parameters(), resumed.network.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_cosine_learning_rate_decays_to_a_hundredth_and_resumes_by_step(tmp_path):
    tr = make(steps=100)
    assert tr.learning_rate(50) == tr.config.lr          # constant is the default
    tr.config.lr_schedule = "cosine"
    lrs = [tr.learning_rate(s) for s in (0, 50, 100)]
    assert lrs[0] == tr.config.lr and abs(lrs[1] - 0.505 * tr.config.lr) < 1e-12
    assert abs(lrs[2] - 0.01 * tr.config.lr) < 1e-12
    tr.config.max_steps = 3
    tr.fit(batches())
    assert tr.optimizer.param_groups[0]["lr"] == tr.learning_rate(2)
    with pytest.raises(DiffusionMICError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_fast_ddpm_trains_on_sampler_timesteps():
    s = NoiseSchedule(train_steps=10)
    t = s.training_timesteps()
    assert len(t) == 10 and int(t.max()) == 999
    sampler = s.sampler("dpm++2m")
    sampler.set_timesteps(10)
    assert torch.equal(sampler.timesteps.long(), t)


DDP_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {testdir!r})
from conftest import TINY_NETWORK
from DiffusionMICLib.engine.network import build_network, network_config
from DiffusionMICLib.engine.schedule import NoiseSchedule
from DiffusionMICLib.engine.trainer import Batch, TrainConfig, Trainer
torch.manual_seed(0)
net = build_network(network_config(2, 1, **TINY_NETWORK))
tr = Trainer(net, NoiseSchedule(), TrainConfig(max_steps=3, batch_size=2), torch.device("cpu"))
g = torch.Generator().manual_seed(tr.rank)
def data():
    while True:
        yield Batch(torch.rand((2, 1, 16, 16), generator=g), torch.rand((2, 1, 16, 16), generator=g))
tr.fit(data())
w = torch.cat([p.detach().flatten() for p in tr.network.parameters()])
out = [None] * tr.world
dist.all_gather_object(out, w.sum().item())
if tr.rank == 0:
    print(json.dumps({{"world": tr.world, "sums": out}}))
tr.close()
"""


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(testdir=str(Path(__file__).parent)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: torchrun picks a free port itself (no race between choosing one and binding it)
    def launch() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script)], capture_output=True, text=True, timeout=300, env=env)
    proc = launch()
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # gloo's teardown once aborted a rank (SIGABRT) while the full suite loaded both cores;
        # 5 of 5 runs alone passed. One retry; a second failure fails the test.
        proc = launch()
    causes = [line for line in proc.stderr.splitlines() if "Error" in line or "what()" in line or "terminate" in line]
    assert proc.returncode == 0, "\n".join(causes[:10]) + proc.stderr[-1500:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world"] == 2
    # DDP averages gradients, so both ranks hold identical weights after every step
    assert abs(result["sums"][0] - result["sums"][1]) < 1e-4


def test_resumed_training_lists_every_run_in_the_card(phantom_dir, tmp_path):
    """A card trained in two runs records both commands and the total wall time."""
    from DiffusionMICLib.engine.pipeline import train
    from DiffusionMICLib.models import read_card
    settings = {"network": TINY_NETWORK, "patch": [32, 32], "train": {"batch_size": 2, "checkpoint_every": 1000}}
    first = train("denoise", phantom_dir, tmp_path, max_steps=2, settings={**settings, "command": "first"})
    second = train("denoise", phantom_dir, tmp_path, max_steps=4,
                   settings={**settings, "command": "second", "train": {**settings["train"], "lr_schedule": "cosine"}})
    runs = read_card(tmp_path).training["runs"]
    assert [(r["command"], r["steps"], r["lr_schedule"]) for r in runs] == [("first", 2, "constant"),
                                                                             ("second", 4, "cosine")]
    assert runs[0]["wall_time_s"] == first.training["wall_time_s"] <= second.training["wall_time_s"]
    assert second.training["wall_time_s"] == runs[1]["wall_time_s"]
    lo, hi = read_card(tmp_path).input_range    # the training inputs' intensities / their robust scale
    assert 0.0 <= lo < 0.05 and 0.5 < hi < 2.0


def test_progress_of_a_resumed_run_starts_where_it_stopped(capsys):
    import io
    from DiffusionMICLib.progress import Progress
    stream = io.StringIO()
    p = Progress("tqdm", stream=stream)
    p.start("train", 10, done=4)
    p.advance()
    p.close()
    assert p.step == 5 and "5/10" in stream.getvalue()
    Progress("json").start("train", 10, done=4)
    assert '"step": 4' in capsys.readouterr().out
