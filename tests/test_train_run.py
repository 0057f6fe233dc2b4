"""`press train` end to end on the tiny preset: it trains and exports a model other commands load,
SIGTERM saves and exits cleanly, a run killed with -9 and rerun gives exactly the losses of one
never stopped, a NaN stops the run with the last good checkpoint kept, and two processes on
localhost give the losses of one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from compress import config as cfg
from compress.checkpoint import Checkpointer
from compress.errors import InputError
from compress.pretrained import load_decoder
from compress.train.loop import TrainConfig, TrainingDiverged, train
from compress.train.metrics import read_metrics
from tests.devices import xla_flags
from tests.processes import run_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "train-tiny.yaml")
# Short runs: 8 updates of 4 rows of 32 tokens, a checkpoint every 2, metrics every step.
SHORT = ["steps=8", "optimizer.learning_rate=1e-2", "optimizer.total_steps=8", "optimizer.warmup_steps=2", "data.batch_size=8", "data.seq_len=32",
         "save_every=2", "log_every=1", "eval_every=0", "progress=false"]


def _config(out, *overrides) -> TrainConfig:
    return cfg.load(TrainConfig, TINY, [*SHORT, f"out={out}", *overrides])


def _losses(out) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(str(out)).items()}


def _press_train(out, *overrides) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the same 8 simulated devices as this process (conftest)
    return subprocess.Popen([sys.executable, "-m", "serve.cli", "train", TINY, *SHORT, f"out={out}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(process: subprocess.Popen | None, out, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = os.path.join(out, "metrics.jsonl")
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, process.communicate()[0]
        if os.path.exists(path) and any(json.loads(line)["step"] >= step for line in open(path) if line.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "whole"
    result = train(_config(out))
    return out, result


def test_the_tiny_preset_trains_and_exports_a_model_press_loads(uninterrupted):
    out, result = uninterrupted
    losses = _losses(out)
    assert list(losses) == list(range(1, 9)) and result.stopped == "done" and result.steps == 8
    assert losses[8] < losses[1] - 0.5, losses  # from ~10.8 (uniform over 49k tokens) it learns something
    model = load_decoder(result.exported)  # what every press command loads
    with Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
        assert ckpt.all_steps()[-1] == 8
    assert model.config.num_layers == 2 and model.config.embed_dim == 64
    assert os.listdir(os.path.join(out, "tensorboard")), "no TensorBoard event file"


def test_sigterm_then_kill_9_then_a_rerun_give_the_losses_of_an_uninterrupted_run(uninterrupted, tmp_path):
    want = _losses(uninterrupted[0])
    out = tmp_path / "stopped"

    def sigterm_at_step_3():  # a pod's pre-emption: the run finishes its step, saves, and returns
        _wait_for_step(None, out, 3)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=sigterm_at_step_3, daemon=True).start()
    result = train(_config(out))
    assert result.stopped == "sigterm" and 3 <= result.steps < 8, result
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.latest_step() == result.steps

    second = _press_train(out)  # resumes, and is killed with -9 (no handler runs) two steps later
    _wait_for_step(second, out, result.steps + 2)
    second.kill()
    assert "resumed from step" in second.communicate(timeout=60)[0]

    assert train(_config(out)).stopped == "done"
    assert _losses(out) == want  # exactly: the same state, the same batches, the same compiled step


def test_a_second_run_into_a_directory_in_use_is_refused(tmp_path):
    out = tmp_path / "busy"
    first = _press_train(out, "steps=100000")  # another process, long enough to be running throughout
    try:
        _wait_for_step(first, out, 2)
        with pytest.raises(InputError, match="in use by another training run"):
            train(_config(out))  # two at once had both run to the end, each step logged twice
        assert sorted(_losses(out)) == list(range(1, max(_losses(out)) + 1))  # the refused one wrote nothing
    finally:
        first.kill()  # -9: the kernel drops its lock
        first.communicate(timeout=60)
    with Checkpointer(out / "checkpoints") as ckpt:
        saved = ckpt.latest_step() or 0  # a save in flight at the kill is not committed
    assert train(_config(out, f"steps={saved + 1}")).stopped == "done"  # free again: it resumes


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "diverge"
    # Adam moves every weight by about the learning rate: 1e30 leaves nothing finite after one update.
    config = _config(out, "optimizer.learning_rate=1e30", "optimizer.warmup_steps=0", "save_every=1")
    with pytest.raises(TrainingDiverged, match=r"the loss is (nan|inf|-inf) at step") as caught:
        train(config)
    message = str(caught.value)
    bad = int(re.search(r"at step (\d+)", message).group(1))
    assert f"The last good checkpoint, step {bad - 1}, is kept in {out / 'checkpoints'}" in message
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps()[-1] == bad - 1  # the diverged state was never saved
    assert bad <= 4


def test_resuming_with_other_data_is_refused(uninterrupted, tmp_path):
    out, _ = uninterrupted
    with pytest.raises(InputError, match="other data"):
        train(_config(out, "data.seed=7", "steps=9"))


def test_a_mesh_that_cannot_split_a_parameter_is_an_error_naming_it(tmp_path):
    # embed_dim 64 over an fsdp axis of 8 splits; 60 does not (nor do 6 heads of 10 over tensor=8)
    config = _config(tmp_path / "bad", "model_overrides.embed_dim=60", "model_overrides.head_dim=10",
                     "model_overrides.num_heads=6", "model_overrides.num_kv_heads=2")
    with pytest.raises(InputError, match=r"embed"):
        train(config)


@pytest.mark.slow
def test_two_processes_of_4_devices_give_the_losses_of_one_process_of_8(uninterrupted, tmp_path):
    assert jax.device_count() == 8
    want = _losses(uninterrupted[0])
    out = tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "PYTHONUNBUFFERED": "1"}
    codes, logs = run_job(["train", TINY, *SHORT, f"out={out}"], 2, env)
    assert codes == [0, 0], logs
    got = _losses(out)
    assert list(got) == list(want)
    np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=1e-5)
    assert os.path.isfile(out / "hf" / "model.safetensors")  # gathered from both and written once
