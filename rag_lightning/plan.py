"""Plan a run at scale: `python -m rag_lightning.plan plan.passages=21e6 [experiment=...] [overrides]`.

Composes a training run's config as `python -m rag_lightning.train` does, with the plan's own keys (plan.*), and
prints what its retrieval costs at full size: memory per shard actor and per node with the actors' layout, disk,
refresh time, search capacity against the trainers' demand, every assumption made, and a warning wherever the
plan does not fit. Writes plan.json (all of it) and results.json (the headline figures and the warnings) into the
run dir. The model is rag_lightning/capacity/plan_model.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from rag_lightning.capacity.plan_model import Plan, duration, make_plan
from rag_lightning.command import command
from rag_lightning.config import PlanConfig
from retrieval_workers import atomic_write_bytes


def plan(cfg: PlanConfig) -> dict:
    """The plan of cfg, printed and written into the run dir; returns its headline figures."""
    made = make_plan(cfg)
    print(report(made), flush=True)
    run_dir = Path(cfg.paths.run_dir)
    results = headline(made)
    atomic_write_bytes(run_dir / "plan.json", json.dumps(made.as_dict(), indent=2).encode())
    atomic_write_bytes(run_dir / "results.json", json.dumps(results, indent=2).encode())
    return results


def headline(made: Plan) -> dict:
    return {
        "actor_rss_gib": made.actor["rss_gib"],
        "actor_peak_gib": made.actor["peak_gib"],
        "node_resident_gib": max(row["resident_gib"] for row in made.nodes),
        "disk_total_gib": made.disk["total_gib"],
        "disk_bytes_per_passage": made.disk["bytes_per_passage"],
        "refresh_wall_s": made.refresh["wall_s"],
        "search_capacity_qps": made.search["capacity_qps"],
        "search_demand_qps": made.search["demand_qps"],
        "warnings": made.warnings,
    }


def report(made: Plan) -> str:
    i, a, d, r, s = made.inputs, made.actor, made.disk, made.refresh, made.search
    lines = [
        f"Plan: {i['passages']:,} passages of dim {i['dim']}, index {i['factory']} ({made.index['parts']}), "
        f"{i['shards']} shards x {i['replicas']} replicas on {i['nodes']} nodes x "
        f"{i['trainer_ranks_per_node']} trainer ranks",
        "",
        f"Shard actor ({a['passages']:,} passages)",
        f"  base {a['base_gib']:.2f} GiB + index {a['index_gib']:.2f} GiB "
        f"({made.index['bytes_per_vector']:.1f} B a vector + {made.index['fixed_bytes'] / 2**20:.1f} MiB) "
        f"+ generator token ids {a['token_ids_gib']:.2f} GiB = {a['resident_gib']:.2f} GiB resident; "
        f"peak {a['peak_gib']:.2f} GiB (a second index during a version switch when refreshing)",
        f"  embeddings memory-mapped: {a['embeddings_gib']:.2f} GiB, page cache as searches touch them; RSS "
        f"once all are touched {a['rss_gib']:.2f} GiB",
        "",
        "Nodes (node memory {:g} GiB)".format(i["node_memory_gib"]),
    ]
    for row in made.nodes:
        lines.append(
            f"  node {row['node']}: shard actors {', '.join(row['actors']) or '-'} "
            f"({row['actors_gib']:.1f} GiB) + {row['trainer_ranks']} trainer rank(s) and "
            f"{row['encoder_actors']} encoder actor(s) ({row['torch_gib']:.1f} GiB) = "
            f"{row['resident_gib']:.1f} GiB resident; embeddings page cache up to "
            f"{row['page_cache_gib']:.1f} GiB"
        )
    lines += [
        "",
        "Disk",
        f"  an index version (indexes + embeddings) {d['version_gib']:.1f} GiB; passage table (text + token "
        f"ids) {d['passage_table_gib']:.1f} GiB; {d['bytes_per_passage']:.0f} B a passage",
        f"  with {d['versions_kept']} version(s) kept: {d['total_gib']:.1f} GiB, {d['peak_gib']:.1f} GiB "
        "while a refresh writes",
        "",
        "Refresh"
        + (
            ""
            if r["enabled"]
            else " (index_refresh.every_n_steps=null: none while training; this is a re-encoding of the knowledge base)"
        ),
        f"  {r['workers']} {r['device'].upper()} encoder actor(s) at {r['passages_per_s_per_worker']:,.1f} "
        f"passages/s: {duration(r['encode_s_per_shard'])} encoding + {duration(r['build_s_per_shard'])} "
        f"index build a shard; {duration(r['wall_s'])} in all"
        + (f", every {duration(r['interval_s'])}" if r["enabled"] else ""),
        "",
        "Search",
        f"  {s['ms_per_query']:.3f} ms a query, {s['ms_per_call']:.1f} ms a call; a replica answers "
        f"{s['replica_qps']:,.0f} queries/s, each shard {s['capacity_qps']:,.0f}/s; the trainers ask "
        f"{s['demand_qps']:,.0f}/s ({100 * s['utilisation']:.0f} %)",
        "",
        "Assumptions",
    ]
    lines += [f"  - {a}" for a in made.assumptions]
    lines += ["", "Warnings" if made.warnings else "Warnings: none, the plan fits"]
    lines += [f"  ! {w}" for w in made.warnings]
    return "\n".join(lines)


main = command("plan")(plan)  # python -m rag_lightning.plan, or rag-plan

if __name__ == "__main__":
    main()
