"""A trained model from a checkpoint, and its knowledge base served for it: what evaluate, generate and export share.

The checkpoint holds everything needed: the model, retriever and service settings it was
trained with (its hyperparameters, plain dicts), the weights, and the index version it
last trained against. Serving starts shard actors of its own (on a local Ray, or on the
cluster at service.ray_address) under a name of their own, so a training job using the
same knowledge base is never disturbed, and moves them to that index version if it is
still on disk (or, for a checkpoint that trained its context encoder, to a new version
encoded with it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from rag_lightning.config import ServiceConfig
from rag_lightning.errors import UserError
from rag_lightning.model.checkpoint_file import INDEX_VERSION_KEY, read_checkpoint
from rag_lightning.model.rag_module import RagModule
from retrieval_workers import (
    RAY_ADDRESS_ENV,
    Manifest,
    RefreshSpec,
    ServiceSpec,
    check_sparse_files,
    connect,
    launch_refresher,
    launch_service,
    local_ray_answers,
    read_manifest,
    read_version_step,
    shutdown_refresher,
    shutdown_service,
    switch_version,
)

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    module: RagModule  # on the CPU, in eval mode
    index_version: int | None  # the index version it last trained against (None: not recorded)
    global_step: int  # the optimizer steps its weights have had


def load_trained_model(ckpt_path: str) -> TrainedModel:
    """The checkpoint's RagModule (weights loaded with torch's weights_only) and its index version."""
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path: no checkpoint file at {ckpt_path}")
    checkpoint = read_checkpoint(ckpt_path)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"ckpt_path: {ckpt_path} is not a checkpoint of rag_lightning.train")
    module = RagModule(**checkpoint["hyper_parameters"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return TrainedModel(module.eval(), checkpoint.get(INDEX_VERSION_KEY), int(checkpoint.get("global_step", 0)))


def index_version_to_serve(trained: TrainedModel, manifest: Manifest) -> int:
    """The index version the checkpoint last trained against if it is still on disk, else the active one."""
    version = trained.index_version
    if version is None or version == manifest.active_version:
        return manifest.active_version
    if version not in manifest.kept_versions():
        log.warning(
            "the checkpoint trained against index version %d, which is no longer on disk; using the active version %d",
            version,
            manifest.active_version,
        )
        return manifest.active_version
    return version


@contextmanager
def serving(trained: TrainedModel, service: ServiceConfig) -> Iterator[int]:
    """Shard actors of the module's knowledge base, for this process alone; yields the index version they serve.

    A checkpoint that trained its context encoder is served an index of that encoder: when the version it last
    trained against holds older embeddings, the knowledge base is re-encoded into a new version first."""
    module = trained.module
    with serving_knowledge_base(module.service_spec, service) as spec:
        manifest = read_manifest(spec.kb_dir)
        version = index_version_to_serve(trained, manifest)
        if version != manifest.active_version:
            switch_version(spec, version)
        module.service_spec = spec
        if (
            module.context_encoder is not None
            and read_version_step(spec.kb_dir, manifest, version) < trained.global_step
        ):
            version = encode_new_version(spec, module, trained.global_step)
        module.setup("predict")
        yield version


@contextmanager
def serving_knowledge_base(spec: ServiceSpec, service: ServiceConfig) -> Iterator[ServiceSpec]:
    """Shard actors of spec's knowledge base for this process alone (under a name of its own, on a local Ray or on
    the cluster at service.ray_address, with service's threads and CPUs, and its search_params unless empty); yields
    their spec."""
    spec = replace(
        spec,
        namespace=service.namespace,
        name_prefix=f"serve-{os.getpid()}",
        omp_threads=service.omp_threads,
        actor_cpus=service.actor_cpus,
        search_params=service.search_params or spec.search_params,
        failover_timeout_s=service.failover_timeout_s,
    )
    check_sparse_files(spec.kb_dir, read_manifest(spec.kb_dir))  # refused now, not by each shard actor as it starts
    owns_ray = not (service.ray_address or os.environ.get(RAY_ADDRESS_ENV))
    connect(
        service.ray_address,
        namespace=spec.namespace,
        host=service.host,
        dashboard=service.dashboard,
        num_cpus=service.num_cpus,
        temp_dir=service.temp_dir,
    )
    try:
        launch_service(spec)
        yield spec
    finally:
        if local_ray_answers():  # a signal to the whole process group may have ended a local Ray
            shutdown_refresher(spec)
            shutdown_service(spec)
        if owns_ray:  # and its address, recorded by connect(), names no cluster now (a multirun's next job starts one)
            ray.shutdown()
            os.environ.pop(RAY_ADDRESS_ENV, None)


def encode_new_version(spec: ServiceSpec, module: RagModule, global_step: int) -> int:
    """Re-encode the knowledge base with the module's context encoder into a new index version, served from now
    on; no version is pruned (a training job may be using one). Returns the new version."""
    log.info(
        "the index is older than the checkpoint's context encoder (step %d): re-encoding the knowledge base",
        global_step,
    )
    kept = len(read_manifest(spec.kb_dir).kept_versions())
    coordinator = launch_refresher(spec, RefreshSpec(keep_versions=kept + 1))
    assert module.context_encoder is not None  # called for a checkpoint that trained its context encoder
    report = ray.get(coordinator.refresh.remote([ray.put(module.context_encoder.snapshot(global_step))], global_step))
    if report.error is not None:
        raise RuntimeError(f"re-encoding {spec.kb_dir} with the checkpoint's context encoder failed: {report.error}")
    log.info(
        "index version %d (weights of step %d): %d passages in %.1fs",
        report.version,
        global_step,
        report.passages,
        report.wall_s,
    )
    return report.version
