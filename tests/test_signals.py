"""A stop signal (SIGTERM, SIGINT) ends any command with one line, exit code 128 + its number, and its cleanup run.

Every command's main is wrapped in rag_lightning.errors.exit_on_user_error; these cases wrap small functions in
this process and send it real signals (only while the wrapper's handler is installed, which each case checks
first). A real build_kb process stopped by a signal is in test_bad_input.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rag_lightning import errors
from rag_lightning.callbacks.stop_signals import StopTogether
from rag_lightning.errors import Interrupted, exit_on_user_error
from retrieval_workers.atomic_files import staged_directory


@pytest.fixture(autouse=True)
def default_handlers():
    """Each case starts from the default handlers, as a command does (a Ray another test module started in this
    process has its own SIGTERM handler installed), and leaves the ones it found."""
    saved = {signum: signal.getsignal(signum) for signum in errors.STOP_SIGNALS}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _send(signum: int) -> None:
    """Send this process signum, once the command's handler is the one that gets it (else it could end pytest)."""
    assert signal.getsignal(signum) is errors._stop
    os.kill(os.getpid(), signum)
    time.sleep(60)  # the handler raises within this sleep
    raise AssertionError("the signal did not stop the command")


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(
    "signum, inherited",
    [(signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN)],
    ids=["SIGTERM", "SIGINT", "SIGINT-inherited-ignored"],
)
def test_a_signal_stops_a_command_after_its_cleanup_with_one_line(capsys, signum, inherited):
    """Also where the process was started with SIGINT ignored, as a non-interactive shell starts `cmd &`."""
    if inherited is signal.SIG_IGN:
        signal.signal(signum, signal.SIG_IGN)
    cleaned = []

    @exit_on_user_error
    def main():
        try:
            _send(signum)
        finally:
            cleaned.append(True)

    before = {s: signal.getsignal(s) for s in errors.STOP_SIGNALS}
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 128 + signum and cleaned == [True]
    err = capsys.readouterr().err
    assert _lines(err) == [f"error: stopped by {signal.Signals(signum).name}; unfinished files were removed"], err
    assert "Traceback" not in err
    assert {s: signal.getsignal(s) for s in errors.STOP_SIGNALS} == before, "the handlers are put back after"


def test_a_second_signal_does_not_cut_the_cleanup_short(capsys):
    cleaned = []

    @exit_on_user_error
    def main():
        try:
            _send(signal.SIGTERM)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. a second `kill`, or Ctrl+C pressed twice
            time.sleep(0.1)
            cleaned.append(True)

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 128 + signal.SIGTERM and cleaned == [True]
    assert len(_lines(capsys.readouterr().err)) == 1


def test_a_handler_installed_before_the_command_is_left_alone():
    """A launcher's own handler (submitit's, say) stays in charge of its signal."""
    received = []

    def launchers(signum, frame):
        received.append(signum)

    seen = []

    @exit_on_user_error
    def main():
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))

    previous = signal.signal(signal.SIGTERM, launchers)
    try:
        main()
        assert seen == [(launchers, errors._stop)]
        assert signal.getsignal(signal.SIGTERM) is launchers and signal.getsignal(signal.SIGINT) is not errors._stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_lightning_fit_stops_the_command_with_one_line(capsys, tmp_path, signum):
    """SIGTERM: during fit Lightning installs its handler and calls the one it found after its own; the command's
    then only records the signal, Lightning stops after the step on every rank together (SIGTERMException, a
    SystemExit), and the command reports the stop like any other. SIGINT: the command's handler raises in the
    step, Lightning cleans up as after Ctrl+C and exits 1, and the command reports the stop. SIGUSR1, SLURM's
    requeue signal, is never touched by the command."""
    import lightning as L
    import torch

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
            self.steps = []

        def training_step(self, batch, batch_idx):
            self.steps.append(batch_idx)
            if batch_idx == 2:
                if signum == signal.SIGTERM:
                    assert signal.getsignal(signum) is not errors._stop, "Lightning's handler is in charge"
                    os.kill(os.getpid(), signum)
                else:
                    _send(signum)
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
    model = Model()
    usr1 = signal.getsignal(signal.SIGUSR1)

    @exit_on_user_error
    def main():
        assert signal.getsignal(signal.SIGUSR1) is usr1
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(model, data)

    with pytest.raises(SystemExit) as stopped:  # (after Ctrl+C Lightning ignores SIGINT; the fixture resets it)
        main()
    assert stopped.value.code == 128 + signum
    assert model.steps == [0, 1, 2], "no step began after the signal"
    name = signal.Signals(signum).name
    assert _lines(capsys.readouterr().err) == [f"error: stopped by {name}; unfinished files were removed"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGUSR1) is usr1


def test_ray_init_keeps_the_commands_handler(monkeypatch):
    """ray.init replaces SIGTERM's handler with its own (sys.exit, or its node's cleanup and exit 1); connect()
    keeps a handler the process installed, so the command's cleanup and its one line still come."""
    import ray
    from ray._private import utils as ray_utils

    from retrieval_workers import ray_runtime

    class Context:
        gcs_address = "127.0.0.1:6379"

    def fake_init(**kwargs):
        ray_utils.set_sigterm_handler(lambda signum, frame: sys.exit(signum))  # as ray.init does
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # as anything else might

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.delenv(ray_runtime.RAY_ADDRESS_ENV, raising=False)
    seen = []

    @exit_on_user_error
    def main():
        ray_runtime.connect(num_cpus=1)
        seen.append(signal.getsignal(signal.SIGTERM))

    main()
    assert seen == [errors._stop]
    assert ray_utils.set_sigterm_handler.__module__ == "ray._private.utils", "Ray's own setter is put back"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("from_env", [False, True], ids=["config", "environment"])
def test_a_ray_address_where_nothing_answers_is_one_line_naming_where_it_came_from(capsys, monkeypatch, from_env):
    import ray

    from retrieval_workers import ray_runtime

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process that has not attached yet
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init must not be called"))
    if from_env:
        monkeypatch.setenv(ray_runtime.RAY_ADDRESS_ENV, "127.0.0.1:1")
    else:
        monkeypatch.delenv(ray_runtime.RAY_ADDRESS_ENV, raising=False)

    @exit_on_user_error
    def main():
        ray_runtime.connect(None if from_env else "127.0.0.1:1")

    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    key = ray_runtime.RAY_ADDRESS_ENV if from_env else "service.ray_address"
    [line] = _lines(capsys.readouterr().err)
    assert line.startswith(f"error: {key}: no Ray cluster answers at 127.0.0.1:1"), line


@pytest.mark.parametrize("address", ["not-an-address", "http://host:1", "host:port"])
def test_a_malformed_ray_address_is_refused(address):
    from retrieval_workers.ray_runtime import RayUnreachable, check_reachable

    with pytest.raises(RayUnreachable, match="is not a Ray address"):
        check_reachable(address)


def test_a_staging_folder_is_removed_when_its_writer_is_stopped(tmp_path):
    final = tmp_path / "v1"
    final.mkdir()
    (final / "kept").write_text("the folder it would replace")
    with pytest.raises(Interrupted), staged_directory(final) as staging:
        (staging / "half").write_text("half written")
        raise Interrupted(signal.SIGTERM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"] and (final / "kept").exists()


class SignalledAtStep3(L.LightningModule):
    """One weight; sends this process `signum` during its training step 3 and records the handler it finds then."""

    def __init__(self, signum: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.signum, self.handler_in_training = signum, None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == 3:
            self.handler_in_training = signal.getsignal(self.signum)
            os.kill(os.getpid(), self.signum)
        return ((self.weight - batch) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.ones(20, 1))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_during_training_a_signal_is_noted_and_acted_on_at_the_next_step(capsys, signum):
    """While fit runs, the handler of a stop signal only takes note of it (no collective, no exception in the
    middle of a step, where Lightning's own SIGTERM handler ran a broadcast); the next step's start stops
    training, on every rank together (the ranks agree on the signal by an all-reduce); the command ends as for
    any stop."""
    module = SignalledAtStep3(signum)
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StopTogether()],
    )

    @exit_on_user_error
    def main():
        trainer.fit(module)

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 128 + signum
    assert module.handler_in_training == StopTogether._take_note
    assert trainer.global_step == 4, "stopped at the start of the step after the signal"
    assert _lines(capsys.readouterr().err) == [
        f"error: stopped by {signal.Signals(signum).name}; unfinished files were removed"
    ]
