"""Create (or remove) a knowledge base's shard actors on a running Ray cluster.

    python -m retrieval_workers.launch --address HOST:PORT --kb-dir KB --shards 2 --replicas 2
    python -m retrieval_workers.launch --address HOST:PORT --kb-dir KB --shards 2 --replicas 2 --teardown

S x R named, detached IndexShard actors; the R replicas of each shard in a placement group
spread over the cluster's nodes. Launching is idempotent: actors that exist are reused, so a script may run it on
every (re)start of a job. Training processes then attach by name (`service.ray_address`,
`service.namespace`). The teardown kills the actors and removes their placement groups.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from retrieval_workers.ray_runtime import RayUnreachable, connect
from retrieval_workers.service import launch_service, shutdown_service
from retrieval_workers.types import RetrievalWorkersError, ServiceSpec

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m retrieval_workers.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the Ray cluster's address, HOST:PORT")
    parser.add_argument("--kb-dir", required=True, help="the knowledge base directory (holds manifest.json)")
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--namespace", default=ServiceSpec.namespace, help="Ray namespace of the actors")
    parser.add_argument("--prefix", default=ServiceSpec.name_prefix, help="actor name prefix")
    parser.add_argument("--omp-threads", type=int, default=ServiceSpec.omp_threads, help="FAISS threads per actor")
    parser.add_argument("--actor-cpus", type=float, default=ServiceSpec.actor_cpus, help="CPUs Ray reserves per actor")
    parser.add_argument("--search-params", default=ServiceSpec.search_params, help='e.g. "efSearch=128" or "nprobe=16"')
    parser.add_argument("--teardown", action="store_true", help="kill the actors instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    spec = ServiceSpec(
        kb_dir=str(Path(args.kb_dir).resolve()),
        num_shards=args.shards,
        num_replicas=args.replicas,
        namespace=args.namespace,
        name_prefix=args.prefix,
        omp_threads=args.omp_threads,
        actor_cpus=args.actor_cpus,
        search_params=args.search_params,
    )
    try:
        connect(args.address, namespace=spec.namespace)
    except RayUnreachable as e:
        print(f"error: --address: {e}", file=sys.stderr)
        return 2
    if args.teardown:
        shutdown_service(spec)
        log.info("removed the %d x %d shard actors %r", spec.num_shards, spec.num_replicas, spec.actor_name(0, 0))
        return 0
    try:
        launch_service(spec)
    except RetrievalWorkersError as e:  # a knowledge base that does not fit, a shard that cannot be placed
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "%d x %d shard actors of %s ready in namespace %r",
        spec.num_shards,
        spec.num_replicas,
        spec.kb_dir,
        spec.namespace,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
