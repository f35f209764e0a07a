"""DDP's rendezvous store, listening on the job's address only.

torch's TCPStore, which global rank 0 serves for init_process_group, listens on every interface of the machine.
So before the first Trainer call starts the ranks, the process that will be rank 0 serves the store itself, on a
socket bound to the job's main address and port (MASTER_ADDR, MASTER_PORT: a free port unless set), and keeps
it; torch's init_process_group then reuses it, as a store is multi-tenant (one server per port in a process).
Only where rank 0 is this process: Lightning's `ddp` (which starts the other ranks as scripts), torchrun or
srun; not `ddp_spawn`, whose ranks are new processes.
"""

from __future__ import annotations

import socket

import lightning as L
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch.distributed import TCPStore

from rag_lightning.training.setup import is_first_process

_served: list[TCPStore] = []  # kept for the life of the process: torch finds the server by its port


def serve_rendezvous_on_job_address(trainer: L.Trainer) -> None:
    """Serve the trainer's rendezvous store on its main address alone, if this process is to be its rank 0."""
    launcher = trainer.strategy.launcher
    if trainer.world_size < 2 or not is_first_process() or _served:
        return
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        return
    environment = trainer.strategy.cluster_environment
    address, port = environment.main_address, environment.main_port
    listener = socket.create_server((address, port))
    _served.append(
        TCPStore(
            address,
            port,
            is_master=True,
            multi_tenant=True,
            wait_for_workers=False,
            master_listen_fd=listener.fileno(),
            use_libuv=True,
        )
    )
    listener.detach()  # the store owns the socket now
